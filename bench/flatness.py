"""The product's promise: decode time per token and memory stay flat however long the conversation.

Generates N tokens (default 16,384) through a bundle's sink-window cache, recording each step's time
and the process RSS; compares the last 256 tokens against the first 256 after the cache fills, and
plots both over time (SVG). Usage: python bench/flatness.py BUNDLE [--backend onnx] [--tokens 16384]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, prompt_ids, rss_bytes, write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.sampling import Sampling, choose
from pocketlm.runtime.svg import line_chart


def run(bundle: Bundle, backend: str, n_tokens: int, threads: int) -> dict:
    gen = Generator(bundle, backend, threads)
    rng = np.random.default_rng(0)
    sampling = Sampling(temperature=0.8, top_k=40, seed=0)  # sampled: keeps the text from looping
    logits = gen.session.feed(prompt_ids(gen.tokenizer, 16))
    step_s = np.zeros(n_tokens)
    rss = np.zeros(n_tokens, dtype=np.int64)
    for i in range(n_tokens):
        token = choose(logits, sampling, rng)
        t0 = time.perf_counter()
        logits = gen.session.feed([token])
        step_s[i] = time.perf_counter() - t0
        if i % 16 == 0 or i == n_tokens - 1:
            rss[i] = rss_bytes()
        else:
            rss[i] = rss[i - 1]
        if i % 2048 == 0:
            print(f"{backend}: {i}/{n_tokens} tokens, {1 / np.median(step_s[max(0, i - 255):i + 1]):.1f} tok/s", flush=True)
    full = bundle.layout.cache_len
    first, last = slice(full, full + 256), slice(n_tokens - 256, n_tokens)
    first_tok_s, last_tok_s = 256 / step_s[first].sum(), 256 / step_s[last].sum()
    first_rss, last_rss = int(rss[first].max()), int(rss[last].max())
    return {
        "tokens": n_tokens,
        "first_256_after_fill": {"decode_tok_s": first_tok_s, "peak_rss_bytes": first_rss},
        "last_256": {"decode_tok_s": last_tok_s, "peak_rss_bytes": last_rss},
        "decode_ratio_last_vs_first": last_tok_s / first_tok_s,
        "rss_ratio_last_vs_first": last_rss / first_rss,
        "series": {"step_s": step_s.tolist(), "rss_bytes": rss.tolist()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--backend", action="append")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    results, tok_s_series, rss_series = {}, {}, {}
    for backend in args.backend or bundle.backends:
        r = run(bundle, backend, args.tokens, args.threads)
        steps, rss = np.asarray(r["series"]["step_s"]), np.asarray(r["series"]["rss_bytes"])
        bins = np.arange(0, args.tokens - 255, 256)
        tok_s_series[backend] = (bins.tolist(), [256 / steps[b:b + 256].sum() for b in bins])
        rss_series[backend] = (bins.tolist(), [rss[b:b + 256].max() / 2**20 for b in bins])
        r["series"] = {"bin_start": bins.tolist(), "decode_tok_s": tok_s_series[backend][1], "peak_rss_mib": rss_series[backend][1]}
        results[backend] = r
        print(backend, {k: v for k, v in r.items() if k != "series"}, flush=True)
    svg = line_chart(tok_s_series, f"decode tokens/s per 256-token bin (cache {bundle.layout.cache_len})", "tokens generated", "tok/s") + \
        line_chart(rss_series, "peak RSS per 256-token bin", "tokens generated", "MiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flatness.svg").write_text(_stack(svg))
    write_json("flatness", {"bundle": str(bundle.root), "cache": bundle.manifest["cache"], "threads": args.threads, "results": results})


def _stack(svgs: str) -> str:
    """Two charts one above the other in one SVG file."""
    parts = svgs.split("</svg>")[:-1]
    body = "".join(f'<g transform="translate(0,{320 * i})">{p.split(">", 1)[1]}</g>' for i, p in enumerate(parts))
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{320 * len(parts)}" font-family="sans-serif">{body}</svg>'


if __name__ == "__main__":
    main()
