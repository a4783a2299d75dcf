"""Long-text perplexity through the sink-window cache (StreamingLLM's experiment, on this model).

For each capacity C: S=4 sinks + (C-4) window, and 0 sinks + C window, both through the cache
(PyTorch reference: the exported programs match it, see tests), against a sliding window with
recomputation of the last C tokens. Recomputation costs C forward positions per scored token, so on
a 2-core CPU it is scored at every `stride`-th position after the cache fills; the cache runs are
compared on exactly those positions too. Usage: python bench/streaming_ppl.py [--tokens 4096]"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from _common import RESULTS, write_json

from pocketlm.runtime.perplexity import token_nll
from pocketlm.runtime.sink_cache import CacheLayout
from pocketlm.runtime.svg import line_chart
from pocketlm.runtime.text import load_text
from pocketlm.runtime.tokenizer import Tokenizer
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.reference import reference_session


def cache_nll(model, ids, sink, window) -> np.ndarray:
    """NLL of ids[1:] with every token fed through the cache (chunked; same as one by one)."""
    session = reference_session(model, CacheLayout(sink, window, min(32, window)))
    logits = session.feed(ids, keep_logits=True)
    return token_nll(logits, np.asarray(ids))


@torch.no_grad()
def recompute_nll(model, ids, capacity, positions, batch=16) -> np.ndarray:
    """NLL of ids[t] given exactly the previous `capacity` tokens, recomputed from scratch."""
    out = []
    for i in range(0, len(positions), batch):
        ts = positions[i:i + batch]
        windows = torch.tensor(np.stack([ids[t - capacity:t] for t in ts]))
        h = model.model.embed_tokens(windows)
        cos, sin = model_rope(model, capacity)
        mask = torch.full((capacity, capacity), float("-inf")).triu(1)
        for layer in model.model.layers:
            h = layer(h, cos, sin, mask)
        logits = model.lm_head(model.model.norm(h[:, -1])).double()
        out.append((torch.logsumexp(logits, -1) - logits[torch.arange(len(ts)), torch.tensor([ids[t] for t in ts])]).numpy())
    return np.concatenate(out)


def model_rope(model, n):
    from pocketlm.toolchain.model import rope

    return rope.cos_sin(model.rope_inv_freq, torch.arange(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--capacity", type=int, action="append")
    ap.add_argument("--stride", type=int, default=0, help="recompute every n-th position (default: C // 16)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, source = load_model("default")
    ids = np.asarray(Tokenizer(source.path).encode(load_text(None, "eval"))[: args.tokens])
    results, plots = {}, {}
    for capacity in args.capacity or [64, 256]:
        stride = args.stride or max(1, capacity // 16)
        positions = np.arange(capacity, len(ids), stride)
        t0 = time.perf_counter()
        sinks = cache_nll(model, ids.tolist(), 4, capacity - 4)
        window_only = cache_nll(model, ids.tolist(), 0, capacity)
        t1 = time.perf_counter()
        recompute = recompute_nll(model, ids, capacity, positions)
        t2 = time.perf_counter()
        at = positions - 1  # token_nll[j] scores ids[j + 1]
        r = {
            "capacity": capacity, "stride": stride, "scored_positions": len(positions),
            "ppl_4_sinks_plus_window": math.exp(sinks[at].mean()),
            "ppl_window_only": math.exp(window_only[at].mean()),
            "ppl_sliding_window_recompute": math.exp(recompute.mean()),
            "ppl_4_sinks_all_tokens": math.exp(sinks.mean()),
            "ppl_window_only_all_tokens": math.exp(window_only.mean()),
            "cache_runs_s": t1 - t0, "recompute_s": t2 - t1,
        }
        r["sinks_vs_recompute"] = r["ppl_4_sinks_plus_window"] / r["ppl_sliding_window_recompute"]
        r["window_only_vs_recompute"] = r["ppl_window_only"] / r["ppl_sliding_window_recompute"]
        results[str(capacity)] = r
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        bins = np.arange(0, len(sinks) - 127, 128)
        for name, nll in (("4 sinks", sinks), ("0 sinks", window_only)):
            plots[f"C={capacity}, {name}"] = (bins.tolist(), [math.exp(nll[b:b + 128].mean()) for b in bins])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming_ppl.svg").write_text(
        line_chart(plots, "perplexity per 128-token bin through the sink-window cache", "token position", "PPL", log_y=True))
    write_json("streaming_ppl", {"tokens": int(len(ids)), "text": "pydoc_data.topics eval split", "results": results})


if __name__ == "__main__":
    main()
