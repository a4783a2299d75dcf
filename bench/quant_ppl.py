"""Perplexity of weight-quantized models against fp32 on the default text (pocketlm eval protocol):
RTN vs AWQ at the same bits and group size, and how much of RTN's gap AWQ closes.
Usage: python bench/quant_ppl.py [--groups 64 32] [--max-tokens 16384] [--out FILE]"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import write_json

from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.quantize import quantize_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="default")
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the quantized folders under this folder")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.keep or tempfile.mkdtemp(prefix="pocketlm-quant-")

    def ppl(src):
        return evaluate_perplexity(src, max_tokens=args.max_tokens, show_progress=False).ppl

    results = {"fp32": {"ppl": ppl(args.source)}}
    print("fp32", results["fp32"], flush=True)
    for g in args.groups:
        for scheme in ("w4-rtn", "w4-awq"):
            t0 = time.perf_counter()
            folder = quantize_source(args.source, f"{root}/{scheme}-g{g}", scheme=scheme, group_size=g, head="float")
            seconds = time.perf_counter() - t0
            results[f"{scheme}-g{g}"] = {"ppl": ppl(folder), "quantize_s": round(seconds, 1)}
            print(scheme, g, results[f"{scheme}-g{g}"], flush=True)
        fp, rtn, awq = results["fp32"]["ppl"], results[f"w4-rtn-g{g}"]["ppl"], results[f"w4-awq-g{g}"]["ppl"]
        results[f"g{g}_gap_closed"] = (rtn - awq) / (rtn - fp) if rtn > fp else None
    folder = quantize_source(args.source, f"{root}/w8-rtn", scheme="w8-rtn", head="float")
    results["w8-rtn"] = {"ppl": ppl(folder)}
    write_json("quant_ppl", {"source": args.source, "max_tokens": args.max_tokens, "ctx": 512, "threads": args.threads,
                             "weights": "symmetric; LM head/embedding kept float", "results": results}, args.out)


if __name__ == "__main__":
    main()
