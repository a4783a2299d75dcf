"""Perplexity cost of each LM head choice (SmolLM2's head is the tied embedding, 21% of the parameters,
and decode reads all of it every token): float, int8 per output channel, or the scheme's int4 groups,
on w4-rtn and w4-awq at one group size (pocketlm eval protocol, default text). The AWQ search runs once
and is re-applied for the other heads, so only the head differs between AWQ rows; under w4-awq the int4
head is clipped by that search (toolchain/quant/awq.py, step 4), under w4-rtn it is rounded to nearest.
Usage: python bench/head_ppl.py [--group-size 64] [--max-tokens 16384] [--keep DIR] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _common import write_json

from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.quant.awq import AwqConfig
from pocketlm.toolchain.quantize import quantize_source

HEADS = ("float", "int8", "same")


def head_bytes(head: str, folder: Path, group: int) -> int:
    """What decode reads of the head per token: codes plus scales (float32 per channel or per group)."""
    config = json.loads((folder / "pocketlm_model.json").read_text())["config"]
    vocab, dim = config["vocab_size"], config["dim"]
    if head == "float":
        return 4 * vocab * dim
    if head == "int8":
        return vocab * dim + 4 * vocab
    return vocab * dim // 2 + 4 * vocab * (dim // group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="default")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the quantized folders under this folder")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.keep or tempfile.mkdtemp(prefix="pocketlm-head-"))
    g = args.group_size

    def ppl(src):
        return evaluate_perplexity(src, max_tokens=args.max_tokens, show_progress=False).ppl

    fp32 = ppl(args.source)
    results = {"fp32": {"ppl": fp32}}
    print("fp32", fp32, flush=True)
    for scheme in ("w4-rtn", "w4-awq"):
        awq_results = None
        for head in HEADS:
            t0 = time.perf_counter()
            # the one AWQ search also clips the head (AwqConfig.head), which only the int4 head uses
            folder = quantize_source(args.source, root / f"{scheme}-g{g}-{head}", scheme=scheme, group_size=g, head=head,
                                     awq_results=awq_results, awq_config=AwqConfig(head=True))
            seconds = time.perf_counter() - t0
            if scheme == "w4-awq" and awq_results is None:
                awq_results = folder / "awq.json"
            p = ppl(folder)
            results[f"{scheme}-g{g}-head-{head}"] = {"ppl": p, "vs_fp32": p / fp32 - 1,
                                                     "head_bytes_per_token": head_bytes(head, folder, g),
                                                     "quantize_s": round(seconds, 1)}
            print(scheme, head, results[f"{scheme}-g{g}-head-{head}"], flush=True)
    write_json("head_ppl", {"source": args.source, "group_size": g, "max_tokens": args.max_tokens, "ctx": 512,
                            "threads": args.threads, "heads": {"float": "float32", "int8": "int8 per output channel",
                                                               "same": f"int4 groups of {g} (the scheme's own)"},
                            "results": results}, args.out)


if __name__ == "__main__":
    main()
