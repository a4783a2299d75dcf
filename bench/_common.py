"""Shared bits for benchmarks: JSON out, RSS probes, the default prompt text."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from pocketlm.runtime.profile import anon_rss_bytes, peak_rss_bytes, rss_bytes  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(name: str, data: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(f"wrote {path}")
    return path


def prompt_ids(tokenizer, n: int) -> list[int]:
    from pocketlm.runtime.text import load_text

    return tokenizer.encode(load_text(None, "eval"))[:n]
