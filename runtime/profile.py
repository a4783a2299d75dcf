"""Latency and memory of a bundle's programs on this machine: load time, time to first token, prefill
and decode tokens/s (median of several runs after a warm-up), peak RSS, file sizes, per thread count.

Each (backend, threads) point runs in its own process, so its peak RSS is its own and not the
high-water mark of whatever ran before it. Usage of the worker:
`python -m pocketlm.runtime.profile BUNDLE --backend B --threads N` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from .bundle import Bundle
from .errors import PocketLMError
from .text import load_text

DEFAULTS = {"prompt_tokens": 128, "new_tokens": 64, "runs": 3}


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    return _proc_status_bytes("VmRSS") or 0


def anon_rss_bytes() -> int:
    """Resident memory the process allocated itself, without pages of memory-mapped files (ONNX
    Runtime maps a program's external weights: an embedding row becomes resident the first time its
    token appears, so VmRSS creeps up with vocabulary coverage while nothing is allocated)."""
    return _proc_status_bytes("RssAnon") or 0


def peak_rss_bytes() -> int:
    """This process's own high-water mark. VmHWM starts afresh at exec; ru_maxrss would inherit the
    parent's peak from the fork, making every profiled child look as large as its parent."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _rss_after_runtime_imports(backend: str) -> int:
    """Resident memory once the backend's Python runtime is imported, before any program is loaded:
    the host's share of the peak (ExecuTorch's Python bindings pull in torch; a phone's C++ runner does not)."""
    if backend == "executorch":
        import executorch.runtime  # noqa: F401
        import torch  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    return rss_bytes()


def default_thread_sweep() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, min(2, cores), min(4, cores)})


def file_sizes(bundle: Bundle) -> dict:
    """Bytes on disk per program (an ONNX model counts its external data) and for the whole bundle."""
    programs = {b: sum((bundle.root / f).stat().st_size for f in p.get("files", [p["file"]]))
                for b, p in bundle.manifest["programs"].items()}
    total = sum(p.stat().st_size for p in bundle.root.iterdir() if p.is_file())
    return {"programs": programs, "bundle": total}


def measure(bundle_path, backend: str, threads: int, prompt_tokens: int = DEFAULTS["prompt_tokens"],
            new_tokens: int = DEFAULTS["new_tokens"], runs: int = DEFAULTS["runs"]) -> dict:
    """In this process: one warm-up, then `runs` timed generations of exactly new_tokens tokens."""
    from .generate import Generator

    imports_rss = _rss_after_runtime_imports(backend)
    t0 = time.perf_counter()
    gen = Generator(bundle_path, backend, threads)
    load_s = time.perf_counter() - t0
    prompt = gen.tokenizer.encode(load_text(None, "eval"))[:prompt_tokens]
    gen.stop_ids = set()  # exactly new_tokens decode steps in every run
    # the warm-up takes the timed runs' paths: a prompt longer than the cache wraps the ring, and
    # ExecuTorch loads its masked prefill on that first use (fp32 SmolLM2: about a second of weight
    # packing), a one-time cost reported as first_ttft_ms rather than inside every run's TTFT
    first = gen.generate(prompt, max_new_tokens=8)
    ttft, prefill, decode = [], [], []
    for _ in range(runs):
        gen.reset()
        out = gen.generate(prompt, max_new_tokens=new_tokens + 1)
        ttft.append(out.ttft_s)
        prefill.append(out.prefill_tok_s)
        decode.append(out.decode_tok_s)
    return {
        "backend": backend, "threads": threads, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "runs": runs,
        "load_s": load_s, "first_ttft_ms": 1000 * first.ttft_s, "ttft_ms": 1000 * statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
        "decode_tok_s_runs": decode,
        "peak_rss_bytes": peak_rss_bytes(),
        "runtime_imports_rss_bytes": imports_rss,
    }


def measure_in_subprocess(bundle_path, backend: str, threads: int, import_path: str | None = None, **kw) -> dict:
    """import_path: a folder holding a `pocketlm` package to measure with instead of this one (an
    earlier checkout, for a program form this runtime no longer runs)."""
    cmd = [sys.executable, "-m", "pocketlm.runtime.profile", str(bundle_path), "--backend", backend, "--threads", str(threads)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    # ExecuTorch computes on its own threadpool; OpenMP threads there only oversubscribe it (backends.executorch)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if backend == "executorch" else str(threads)}
    if import_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(import_path), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise PocketLMError(f"profiling {backend} with {threads} threads failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_bundle(bundle_path, backends=None, threads=None, on_result=None, **kw) -> dict:
    """Every backend at every thread count, each in a fresh process; plus file sizes."""
    bundle = Bundle.open(bundle_path)
    backends = list(backends or bundle.backends)
    for b in backends:
        bundle.program_path(b)  # refuse an absent backend before any work
    threads = list(threads or default_thread_sweep())
    if any(t < 1 for t in threads):
        raise PocketLMError(f"--threads must be at least 1, got {threads}")
    points = []
    for b in backends:
        for t in threads:
            point = measure_in_subprocess(bundle.root, b, t, **kw)
            points.append(point)
            if on_result:
                on_result(point)
    return {"bundle": str(bundle.root), "cache": bundle.manifest["cache"], "quantization": bundle.manifest.get("quantization"),
            "files": file_sizes(bundle), "points": points, "settings": {**DEFAULTS, **kw}}


def best_point(profile: dict, backend: str, threads: int | None = None) -> dict | None:
    """The point for this backend at `threads` (or its fastest decode when threads is None)."""
    pts = [p for p in profile["points"] if p["backend"] == backend]
    if threads is not None:
        pts = [p for p in pts if p["threads"] == threads] or pts
    return max(pts, key=lambda p: p["decode_tok_s"], default=None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pocketlm.runtime.profile")
    ap.add_argument("bundle")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    ap.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    ap.add_argument("--runs", type=int, default=DEFAULTS["runs"])
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.bundle, a.backend, a.threads, a.prompt_tokens, a.new_tokens, a.runs)))


if __name__ == "__main__":
    main()
