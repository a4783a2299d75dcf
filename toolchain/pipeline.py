"""`pocketlm run`: the main job. Today: load the source, answer a chat prompt, measure perplexity."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .evaluate import evaluate_perplexity
from .generate import chat_prompt_ids, greedy, stop_token_ids
from .load import load_model, load_tokenizer

DEMO_PROMPT = "What is the capital of France?"


def run(
    source: str = "default",
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 48,
    ppl_max_tokens: int = 8192,
    out: str | os.PathLike | None = None,
) -> dict:
    t0 = time.perf_counter()
    print(f"[1/3] loading {source}", flush=True)
    model, src = load_model(source)
    tokenizer = load_tokenizer(src)
    load_s = time.perf_counter() - t0

    print(f"[2/3] chat: {prompt}", flush=True)
    t1 = time.perf_counter()
    print("      ", end="", flush=True)
    new = greedy(
        model,
        chat_prompt_ids(tokenizer, prompt),
        max_new_tokens,
        stop_token_ids(model, tokenizer),
        on_token=lambda t: print(tokenizer.decode([t]), end="", flush=True),
    )
    print(flush=True)
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    chat_s = time.perf_counter() - t1

    print("[3/3] perplexity on the default text (eval split)", flush=True)
    ppl = evaluate_perplexity(src, max_tokens=ppl_max_tokens)
    summary = {
        "source": src.describe(),
        "parameters": model.num_parameters(),
        "prompt": prompt,
        "answer": answer,
        "perplexity": ppl.to_dict(),
        "timings_s": {"load": round(load_s, 2), "chat": round(chat_s, 2)},
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\nmodel      {src.name} ({model.num_parameters() / 1e6:.1f}M parameters)")
    print(f"answer     {answer}")
    print(f"perplexity {ppl.ppl:.3f} over {ppl.tokens} tokens (ctx {ppl.ctx})")
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "run.json").write_text(json.dumps(summary, indent=2))
        print(f"summary    {path / 'run.json'}", file=sys.stdout)
    return summary
