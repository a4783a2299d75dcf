"""Decode/prefill speed, peak RSS and program size of several bundles, same run, same threads;
ratios against the first bundle (the baseline, e.g. the float32 export). --rounds N measures every
bundle N times, alternating (the order reversed every round), and reports medians over the rounds.
--baseline-checkout DIR measures the baseline with the pocketlm checked out at DIR (e.g. `git worktree
add DIR COMMIT`), for a program form the current runtime no longer runs.
Usage: python bench/compare_bundles.py BASELINE_BUNDLE OTHER_BUNDLE... [--backend onnx] [--threads 2] [--rounds 1]
[--baseline-checkout DIR] [--out FILE]"""

from __future__ import annotations

import argparse
import statistics

import subprocess
import tempfile
from pathlib import Path

from _common import write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.profile import file_sizes, measure_in_subprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="compare_bundles")
    ap.add_argument("--baseline-checkout", default=None, help="a pocketlm checkout whose runtime measures the first bundle")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    samples = {path: [] for path in args.bundles}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {args.bundles[0]: _import_path(args.baseline_checkout, Path(tmp))} if args.baseline_checkout else {}
        for r in range(args.rounds):
            for path in (args.bundles if r % 2 == 0 else args.bundles[::-1]):
                samples[path].append(measure_in_subprocess(path, args.backend, args.threads, paths.get(path),
                                                           prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                                           runs=args.runs))
    rows = []
    for path in args.bundles:
        bundle, points = Bundle.open(path), samples[path]
        point = {**points[-1], **{k: statistics.median(p[k] for p in points) for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms")},
                 "peak_rss_bytes": max(p["peak_rss_bytes"] for p in points), "decode_tok_s_rounds": [p["decode_tok_s"] for p in points]}
        program = bundle.manifest["programs"][args.backend]
        rows.append({"bundle": str(bundle.root), "scheme": bundle.manifest["quantization"]["scheme"],
                     "program": {k: program[k] for k in ("weights", "activations") if k in program},
                     "program_bytes": file_sizes(bundle)["programs"][args.backend], **point})
        print(rows[-1]["scheme"], {k: rows[-1][k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "program_bytes", "peak_rss_bytes")}, flush=True)
    base = rows[0]
    for r in rows:
        r["vs_baseline"] = {"decode": r["decode_tok_s"] / base["decode_tok_s"], "prefill": r["prefill_tok_s"] / base["prefill_tok_s"],
                            "size": r["program_bytes"] / base["program_bytes"], "peak_rss": r["peak_rss_bytes"] / base["peak_rss_bytes"]}
    baseline = {"baseline_checkout": _describe(args.baseline_checkout)} if args.baseline_checkout else {}
    write_json(args.name, {"backend": args.backend, "threads": args.threads, "rounds": args.rounds, **baseline, "bundles": rows},
               args.out)


def _import_path(checkout: str, tmp: Path) -> str:
    """A folder in which `pocketlm` is the checkout (the package is the repository root)."""
    root = Path(checkout).resolve()
    if not (root / "runtime" / "profile.py").is_file():
        raise SystemExit(f"--baseline-checkout {checkout}: not a pocketlm checkout (no runtime/profile.py)")
    (tmp / "pocketlm").symlink_to(root, target_is_directory=True)
    return str(tmp)


def _describe(checkout: str) -> str:
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{checkout} at {commit}" if commit else checkout


if __name__ == "__main__":
    main()
