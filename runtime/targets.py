"""Device target profiles (targets/*.toml): what a device runs, and the budgets it must meet.

A request (an export or a recipe) is checked against its target before any compute, and an
unsupported setting is named in the error.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import PocketLMError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
KEYS = {
    "": {"name", "description", "backend", "delegate", "backends", "threads", "cache", "quantization", "budgets", "parity"},
    "cache": {"sink_size", "window_size", "chunk"},
    "quantization": {"default", "supported"},
    "budgets": {"max_file_bytes", "max_peak_rss_bytes", "max_ttft_ms", "min_decode_tok_s"},
    "parity": {"max_logits_abs", "min_cosine", "min_top1", "max_ppl_delta_pct"},
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    backends: tuple[str, ...]
    threads: int
    cache: dict
    quantization: dict
    budgets: dict
    parity: dict
    delegate: str = ""

    def check_request(self, backends=(), quantization: str | None = None) -> None:
        """Refuse, before any compute, what this device cannot run."""
        for b in backends:
            if b not in self.backends:
                raise PocketLMError(
                    f"target '{self.name}' does not support backend '{b}'; it runs {', '.join(self.backends)}"
                )
        if quantization and quantization not in self.quantization.get("supported", ()):
            raise PocketLMError(
                f"target '{self.name}' does not support quantization '{quantization}'; "
                f"supported: {', '.join(self.quantization.get('supported', ()))}"
            )


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    path = Path(name_or_path)
    if not path.suffix:
        path = TARGETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise PocketLMError(f"target '{name_or_path}' does not exist; known targets: {', '.join(available())}")
    data = tomllib.loads(path.read_text())
    for table, allowed in KEYS.items():
        section = data if not table else data.get(table, {})
        extra = sorted(set(section) - allowed)
        if extra:
            where = f"[{table}]" if table else "top level"
            raise PocketLMError(f"target file '{path}': unknown key '{extra[0]}' at {where}; allowed: {', '.join(sorted(allowed))}")
    try:
        return Target(
            name=data["name"], description=data.get("description", ""), backend=data["backend"],
            backends=tuple(data.get("backends", [data["backend"]])), threads=int(data["threads"]),
            cache=data["cache"], quantization={"default": "fp32", "supported": ["fp32"], **data.get("quantization", {})}, budgets=data.get("budgets", {}),
            parity=data.get("parity", {}), delegate=data.get("delegate", ""),
        )
    except KeyError as e:
        raise PocketLMError(f"target file '{path}' is missing the required key {e}") from None


def budget_checks(target: Target, profile: dict, file_bytes: int) -> list[dict]:
    """Each budget met or missed, from a profile result of one backend."""
    b, out = target.budgets, []

    def add(name, value, limit, ok, unit):
        out.append({"check": name, "value": value, "limit": limit, "passed": bool(ok), "unit": unit})

    if "max_file_bytes" in b:
        add("file size", file_bytes, b["max_file_bytes"], file_bytes <= b["max_file_bytes"], "bytes")
    if "max_peak_rss_bytes" in b:
        add("peak memory", profile["peak_rss_bytes"], b["max_peak_rss_bytes"], profile["peak_rss_bytes"] <= b["max_peak_rss_bytes"], "bytes")
    if "max_ttft_ms" in b:
        add("time to first token", profile["ttft_ms"], b["max_ttft_ms"], profile["ttft_ms"] <= b["max_ttft_ms"], "ms")
    if "min_decode_tok_s" in b:
        add("decode speed", profile["decode_tok_s"], b["min_decode_tok_s"], profile["decode_tok_s"] >= b["min_decode_tok_s"], "tok/s")
    return out
