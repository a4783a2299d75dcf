"""Shared bits for benchmarks: JSON out, RSS probes, the default prompt text."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from pocketlm.runtime.profile import anon_rss_bytes, peak_rss_bytes, rss_bytes  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).parent / "results"


def _cpu() -> dict:
    """The CPU's model name and SIMD level: kernels (XNNPACK, llama.cpp, MLAS) pick code paths by them,
    so figures from machines that differ here do not compare."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor()}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    return {"cpu": model, "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), **_cpu(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(name: str, data: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(f"wrote {path}")
    return path


def prompt_ids(tokenizer, n: int) -> list[int]:
    from pocketlm.runtime.text import load_text

    return tokenizer.encode(load_text(None, "eval"))[:n]


def bundle_backends(ap, bundles: list[str], backends: list[str], default: str) -> list[str]:
    """One backend per --bundle: --backend given once for all of them, once per bundle, or not (default)."""
    backends = backends or [default]
    if len(backends) == 1:
        backends = backends * len(bundles)
    if len(backends) != len(bundles):
        ap.error("give --backend once, or once per --bundle")
    return backends
