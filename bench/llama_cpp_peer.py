"""Peer benchmark: llama.cpp's llama-bench on GGUF files of the same weights, optionally against pocketlm
bundles measured in the same run (same threads, prompt and new-token counts), with the ratios
ours / llama.cpp for prefill and decode. llama.cpp is not a dependency: build it yourself, outside the
repo, and pass the binary; this script builds nothing.

Usage:
  python bench/llama_cpp_peer.py --llama-bench PATH/llama-bench --gguf model-Q4_0.gguf [--gguf model-Q8_0.gguf ...]
      [--bundle BUNDLE --backend onnx [--bundle BUNDLE2 --backend executorch ...]]
      [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--runs 3] [--depth 0] [--rounds 1] [--name llama_cpp_peer] [--out FILE]

--backend is given once for all bundles or once per bundle, in order. llama-bench times prefill (pp) and
decode (tg) as separate tests, both from an empty context by default; --depth N runs tg after N tokens of
context (llama-bench -d; pocketlm decodes after the prompt, so --depth 128 is the closer match).
llama-bench reports mean and stddev over --runs (pocketlm: the median); process_peak_rss_bytes is
llama-bench's whole process (all its tests, its default context). --rounds N measures everything N
times, alternating (peers then bundles, the order reversed every round), and reports each one's
median over the rounds with the ratios taken from those medians: on a shared machine minutes apart
can differ by 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import bundle_backends, write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.profile import file_sizes, measure_in_subprocess


def _llama_bench(cmd: list[str], threads: int) -> tuple[list[dict], int]:
    """llama-bench's JSON tests and this child's own peak RSS (its rusage, not all children's)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        return json.loads(out.read()), usage.ru_maxrss * 1024


def run_llama_bench(binary: str, gguf: str, threads: int, prompt: int, new: int, runs: int, depth: int) -> dict:
    """Prefill (pp) from an empty context; decode (tg) after `depth` tokens. llama-bench's -d applies to
    both tests, so with a depth the two run as separate commands."""
    base = [binary, "-m", gguf, "-t", str(threads), "-r", str(runs), "-o", "json"]
    cmds = [base + ["-p", str(prompt), "-n", str(new)]] if not depth else \
        [base + ["-p", str(prompt), "-n", "0"], base + ["-p", "0", "-n", str(new), "-d", str(depth)]]
    tests, peak = [], 0
    for cmd in cmds:
        t, rss = _llama_bench(cmd, threads)
        tests, peak = tests + t, max(peak, rss)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return {
        "gguf": str(gguf), "file_bytes": Path(gguf).stat().st_size, "model_type": pp["model_type"],
        "model_size_bytes": pp["model_size"], "build_commit": pp["build_commit"], "threads": pp["n_threads"],
        "prompt_tokens": pp["n_prompt"], "new_tokens": tg["n_gen"], "depth": tg.get("n_depth", 0), "runs": runs,
        "prefill_tok_s": pp["avg_ts"], "prefill_tok_s_stddev": pp["stddev_ts"], "prefill_tok_s_runs": pp["samples_ts"],
        "decode_tok_s": tg["avg_ts"], "decode_tok_s_stddev": tg["stddev_ts"], "decode_tok_s_runs": tg["samples_ts"],
        "process_peak_rss_bytes": peak, "commands": [" ".join(c) for c in cmds],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", action="append", required=True)
    ap.add_argument("--bundle", action="append", default=[])
    ap.add_argument("--backend", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="llama_cpp_peer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backends = bundle_backends(ap, args.bundle, args.backend, "onnx")

    jobs = [("gguf", g, None) for g in args.gguf] + [("bundle", b, be) for b, be in zip(args.bundle, backends)]
    samples = {i: [] for i in range(len(jobs))}
    for r in range(args.rounds):
        for i in (range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs)))):
            kind, path, backend = jobs[i]
            if kind == "gguf":
                point = run_llama_bench(args.llama_bench, path, args.threads, args.prompt_tokens, args.new_tokens, args.runs, args.depth)
            else:
                point = measure_in_subprocess(path, backend, args.threads, prompt_tokens=args.prompt_tokens,
                                              new_tokens=args.new_tokens, runs=args.runs)
            samples[i].append(point)
            print(f"round {r + 1}", Path(path).name, backend or "", {k: round(point[k], 1) for k in ("prefill_tok_s", "decode_tok_s")}, flush=True)

    def summary(points: list[dict]) -> dict:
        return {**points[-1], "prefill_tok_s": statistics.median(p["prefill_tok_s"] for p in points),
                "decode_tok_s": statistics.median(p["decode_tok_s"] for p in points),
                "decode_tok_s_rounds": [p["decode_tok_s"] for p in points], "prefill_tok_s_rounds": [p["prefill_tok_s"] for p in points]}

    peers = [summary(samples[i]) for i, (kind, _, _) in enumerate(jobs) if kind == "gguf"]
    ours = []
    for i, (kind, path, backend) in enumerate(jobs):
        if kind != "bundle":
            continue
        bundle = Bundle.open(path)
        row = {"bundle": str(bundle.root), "scheme": bundle.manifest["quantization"]["scheme"],
               "weights": bundle.manifest["programs"][backend].get("weights"), "cache": bundle.manifest["cache"],
               "program_bytes": file_sizes(bundle)["programs"][backend], **summary(samples[i])}
        row["vs_llama_cpp"] = {Path(p["gguf"]).name: {"decode": row["decode_tok_s"] / p["decode_tok_s"],
                                                     "prefill": row["prefill_tok_s"] / p["prefill_tok_s"],
                                                     "size": row["program_bytes"] / p["file_bytes"]} for p in peers}
        ours.append(row)
        print(row["scheme"], backend, {k: round(row[k], 1) for k in ("prefill_tok_s", "decode_tok_s")}, row["vs_llama_cpp"], flush=True)

    write_json(args.name, {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "runs": args.runs, "depth": args.depth, "rounds": args.rounds, "llama_cpp": peers, "pocketlm": ours}, args.out)


if __name__ == "__main__":
    main()
