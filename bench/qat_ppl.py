"""QAT against PTQ at the same bits: perplexity of w4-rtn g64 after N QAT steps (distilled from the
float model on the default text's train split) vs plain round-to-nearest, same eval protocol.
Usage: python bench/qat_ppl.py [--steps 300] [--lr 5e-5] [--group-size 64] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from _common import write_json

from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.quantize import quantize_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="default")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="pocketlm-qat-")

    def ppl(src):
        return evaluate_perplexity(src, max_tokens=args.max_tokens, show_progress=False).ppl

    results = {"fp32": {"ppl": ppl(args.source)}}
    ptq = quantize_source(args.source, f"{root}/ptq", scheme="w4-rtn", group_size=args.group_size, head="float")
    results["w4-rtn (PTQ)"] = {"ppl": ppl(ptq)}
    print(results, flush=True)
    qat = quantize_source(args.source, f"{root}/qat", scheme="w4-rtn", group_size=args.group_size, head="float",
                          qat_steps=args.steps, qat_lr=args.lr, qat_batch=args.batch)
    stage = json.loads((qat / "pocketlm_model.json").read_text())["stages"][-1]
    losses = json.loads((qat / "qat_losses.json").read_text())
    results["w4-rtn + QAT"] = {"ppl": ppl(qat), "qat": stage["qat"]}
    print(results["w4-rtn + QAT"], flush=True)
    fp, p, q = results["fp32"]["ppl"], results["w4-rtn (PTQ)"]["ppl"], results["w4-rtn + QAT"]["ppl"]
    results["qat_gap_closed"] = (p - q) / (p - fp)
    write_json("qat_ppl", {"source": args.source, "group_size": args.group_size, "max_tokens": args.max_tokens,
                           "eval": "default text eval split, ctx 512", "head": "float", "train": "default text train split, 256-token windows",
                           "kl_per_25_steps": [sum(losses[i:i + 25]) / len(losses[i:i + 25]) for i in range(0, len(losses), 25)],
                           "results": results}, args.out)


if __name__ == "__main__":
    main()
