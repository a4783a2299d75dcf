"""The product's promise: decode time per token and memory stay flat however long the conversation.

Generates N tokens (default 16,384) through a bundle's sink-window cache, recording each step's time
and the process RSS (all of it, and the anonymous part alone: ONNX Runtime maps external weights from
the file, so an embedding row becomes resident when its token first appears and VmRSS creeps with the
vocabulary seen, bounded by the file, while allocated memory stays put); compares the last 256 tokens
against the first 256 after the cache fills, and plots both over time (SVG); then times the long
conversation against a fresh one in alternating rounds (see interleaved()).
Usage: python bench/flatness.py BUNDLE [--backend onnx] [--tokens 16384] [--rounds 6]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, anon_rss_bytes, prompt_ids, rss_bytes, write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.sampling import Sampling, choose
from pocketlm.runtime.svg import line_chart


class Stream:
    """One conversation through a bundle: sampled tokens fed back one at a time."""

    def __init__(self, bundle: Bundle, backend: str, threads: int):
        self.gen = Generator(bundle, backend, threads)
        self.rng = np.random.default_rng(0)
        self.sampling = Sampling(temperature=0.8, top_k=40, seed=0)  # sampled: keeps the text from looping
        self.logits = self.gen.session.feed(prompt_ids(self.gen.tokenizer, 16))

    def step(self) -> float:
        token = choose(self.logits, self.sampling, self.rng)
        t0 = time.perf_counter()
        self.logits = self.gen.session.feed([token])
        return time.perf_counter() - t0


def run(bundle: Bundle, backend: str, n_tokens: int, threads: int, rounds: int) -> dict:
    stream = Stream(bundle, backend, threads)
    step_s = np.zeros(n_tokens)
    rss = np.zeros(n_tokens, dtype=np.int64)
    anon = np.zeros(n_tokens, dtype=np.int64)
    for i in range(n_tokens):
        step_s[i] = stream.step()
        if i % 16 == 0 or i == n_tokens - 1:
            rss[i], anon[i] = rss_bytes(), anon_rss_bytes()
        else:
            rss[i], anon[i] = rss[i - 1], anon[i - 1]
        if i % 2048 == 0:
            print(f"{backend}: {i}/{n_tokens} tokens, {1 / np.median(step_s[max(0, i - 255):i + 1]):.1f} tok/s", flush=True)
    full = bundle.layout.cache_len
    first, last = slice(full, full + 256), slice(n_tokens - 256, n_tokens)
    # the median step: on a shared machine one stall in a window would otherwise decide the ratio
    first_tok_s, last_tok_s = 1 / np.median(step_s[first]), 1 / np.median(step_s[last])
    first_rss, last_rss = int(rss[first].max()), int(rss[last].max())
    first_anon, last_anon = int(anon[first].max()), int(anon[last].max())
    return {
        "tokens": n_tokens,
        "first_256_after_fill": {"decode_tok_s": float(first_tok_s), "peak_rss_bytes": first_rss, "peak_anon_rss_bytes": first_anon},
        "last_256": {"decode_tok_s": float(last_tok_s), "peak_rss_bytes": last_rss, "peak_anon_rss_bytes": last_anon},
        "decode_ratio_last_vs_first": float(last_tok_s / first_tok_s),
        "rss_ratio_last_vs_first": last_rss / first_rss,
        "anon_rss_ratio_last_vs_first": last_anon / first_anon,
        "interleaved": interleaved(stream, Stream(bundle, backend, threads), full, rounds),
        "series": {"step_s": step_s.tolist(), "rss_bytes": rss.tolist(), "anon_rss_bytes": anon.tolist()},
    }


def interleaved(long: Stream, fresh: Stream, cache_len: int, rounds: int) -> dict:
    """The first and last windows of one long run are minutes apart, and on a shared machine minutes
    apart is noise of +-20%. So also: a second conversation just past the fill and the long one (at
    n_tokens), 256 steps each in alternating rounds, same minute, same process."""
    for _ in range(cache_len):
        fresh.step()
    tok_s = {"long": [], "fresh": []}
    for r in range(rounds):
        for name in (("long", "fresh") if r % 2 == 0 else ("fresh", "long")):
            stream = long if name == "long" else fresh
            tok_s[name].append(float(1 / np.median([stream.step() for _ in range(256)])))
    long_med, fresh_med = float(np.median(tok_s["long"])), float(np.median(tok_s["fresh"]))
    return {"rounds": rounds, "decode_tok_s_rounds": tok_s, "long_decode_tok_s": long_med, "fresh_decode_tok_s": fresh_med,
            "decode_ratio_long_vs_fresh": long_med / fresh_med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--backend", action="append")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of the interleaved comparison")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    results, tok_s_series, rss_series = {}, {}, {}
    for backend in args.backend or bundle.backends:
        r = run(bundle, backend, args.tokens, args.threads, args.rounds)
        steps, rss = np.asarray(r["series"]["step_s"]), np.asarray(r["series"]["rss_bytes"])
        anon = np.asarray(r["series"]["anon_rss_bytes"])
        bins = np.arange(0, args.tokens - 255, 256)
        tok_s_series[backend] = (bins.tolist(), [1 / np.median(steps[b:b + 256]) for b in bins])
        rss_series[backend] = (bins.tolist(), [rss[b:b + 256].max() / 2**20 for b in bins])
        rss_series[f"{backend} (anonymous)"] = (bins.tolist(), [anon[b:b + 256].max() / 2**20 for b in bins])
        r["series"] = {"bin_start": bins.tolist(), "decode_tok_s": tok_s_series[backend][1], "peak_rss_mib": rss_series[backend][1],
                       "peak_anon_rss_mib": rss_series[f"{backend} (anonymous)"][1]}
        results[backend] = r
        print(backend, {k: v for k, v in r.items() if k != "series"}, flush=True)
    svg = line_chart(tok_s_series, f"decode tokens/s per 256-token bin, median step, cache {bundle.layout.cache_len}", "tokens generated", "tok/s") + \
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
