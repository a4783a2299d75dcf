"""Fused projections (q|k|v and gate|up as one linear each) against separate ones: the same source
exported twice, each program's export time, then decode/prefill speed in alternating rounds (each
measurement in a fresh process, the order reversed every round), medians and ratios fused / separate.

Usage: python bench/fused_projections.py SOURCE [--backend executorch] [--work DIR] [--threads 2] [--rounds 6] [--out FILE]
SOURCE: e.g. a `pocketlm quantize --scheme w4-rtn --group-size 64` folder. The bundles are kept in --work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.profile import file_sizes, measure_in_subprocess
from pocketlm.toolchain.export import export_bundle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--backend", default="executorch")
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pocketlm-fused-"))
    variants = {"separate": False, "fused": True}
    bundles = {}
    for name, fuse in variants.items():
        path = work / f"bundle-{name}"
        if not path.exists():
            export_bundle(args.source, path, (args.backend,), fuse_projections=fuse)
        bundles[name] = Bundle.open(path)
    samples = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            samples[name].append(measure_in_subprocess(bundles[name].root, args.backend, args.threads, prompt_tokens=args.prompt_tokens,
                                                       new_tokens=args.new_tokens, runs=args.runs))
            print(name, r, round(samples[name][-1]["decode_tok_s"], 1), flush=True)
    rows = {}
    for name, bundle in bundles.items():
        program = bundle.manifest["programs"][args.backend]
        points = samples[name]
        rows[name] = {"bundle": str(bundle.root), "weights": program.get("weights", "float32"), "export_s": program["export_s"],
                      "program_bytes": file_sizes(bundle)["programs"][args.backend],
                      **{k: statistics.median(p[k] for p in points) for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms")},
                      "decode_tok_s_rounds": [p["decode_tok_s"] for p in points]}
    ratio = {k: rows["fused"][k] / rows["separate"][k] for k in ("decode_tok_s", "prefill_tok_s", "export_s")}
    print("fused / separate:", {k: round(v, 3) for k, v in ratio.items()})
    write_json(f"fused_projections_{args.backend}", {"source": args.source, "backend": args.backend, "threads": args.threads,
                                                      "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
                                                      "new_tokens": args.new_tokens, "variants": rows, "fused_vs_separate": ratio}, args.out)


if __name__ == "__main__":
    main()
