"""Prefill and decode speed of each exported backend against Hugging Face eager PyTorch (dense cache),
same run, same threads. Usage: python bench/generation_speed.py BUNDLE [--threads 2] [--out FILE]"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import peak_rss_bytes, prompt_ids, write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator


def bench_backend(bundle: Bundle, backend: str, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    gen = Generator(bundle, backend, threads)
    load_s = time.perf_counter() - t0
    gen.stop_ids = set()  # measure exactly new_tokens decode steps
    gen.generate(prompt[:32], max_new_tokens=8)  # warm-up
    prefill, decode, ttft = [], [], []
    for _ in range(repeats):
        gen.reset()
        out = gen.generate(prompt, max_new_tokens=new_tokens + 1)
        ttft.append(out.ttft_s)
        prefill.append(len(prompt) / out.ttft_s)
        decode.append(out.decode_tok_s)
    return {"load_s": load_s, "ttft_ms": 1000 * statistics.median(ttft), "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "runs": repeats}


def bench_hf(source_path: str, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    prefill, decode = [], []
    with torch.no_grad():
        model(ids[:, :32], use_cache=True)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode), "runs": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle)
    from pocketlm.runtime.tokenizer import Tokenizer

    prompt = prompt_ids(Tokenizer(bundle.root), args.prompt_tokens)
    results = {}
    for backend in bundle.backends:
        results[backend] = bench_backend(bundle, backend, prompt, args.new_tokens, args.threads, args.repeats)
        print(backend, results[backend], flush=True)
    from pocketlm.toolchain.sources import resolve

    results["hf_eager_dense"] = bench_hf(str(resolve(bundle.manifest["source"]["spec"]).path), prompt, args.new_tokens, args.repeats)
    print("hf_eager_dense", results["hf_eager_dense"], flush=True)
    base = results["hf_eager_dense"]
    ratios = {b: {"prefill_vs_hf": results[b]["prefill_tok_s"] / base["prefill_tok_s"],
                  "decode_vs_hf": results[b]["decode_tok_s"] / base["decode_tok_s"]} for b in bundle.backends}
    write_json("generation_speed", {
        "bundle": str(bundle.root), "cache": bundle.manifest["cache"], "threads": args.threads,
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "results": results, "ratios": ratios,
        "peak_rss_bytes": peak_rss_bytes(),
    }, args.out)


if __name__ == "__main__":
    main()
