"""Golden outputs written at export time, so a device can check parity without PyTorch.

For each golden prompt the PyTorch reference (same sink-window cache as the programs) records the
prompt ids, its greedy continuation and the logits at every continuation step (teacher-forced on
those tokens), plus the reference perplexity of the default text through the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pocketlm.runtime import perplexity as ppl_protocol
from pocketlm.runtime.session import CachedSession, fresh_window_logits
from pocketlm.runtime.sink_cache import CacheLayout
from pocketlm.runtime.text import load_text
from pocketlm.runtime.tokenizer import Tokenizer

from ..model.transformer import Transformer
from ..reference import reference_session

GOLDEN_STEPS = 32
PPL_CTX, PPL_MAX_TOKENS = 512, 2048


def golden_prompts(tokenizer_dir: Path, chat_template_ids=None) -> list[list[int]]:
    """A chat question (plain text for a model without a chat template), and a passage of the
    default text longer than one prefill chunk."""
    tokenizer = Tokenizer(tokenizer_dir)
    question = "What is the capital of France?"
    first = chat_template_ids(question) if chat_template_ids else tokenizer.encode(question)
    return [first, tokenizer.encode(load_text(None, "eval"))[:100]]


def write_golden(session: CachedSession, prompts: list[list[int]], path: Path) -> dict:
    """Record `session`'s logits and greedy continuation: the PyTorch reference's for float programs,
    the numpy integer reference's for an integer-only program (which must then match exactly)."""
    arrays = {}
    for k, ids in enumerate(prompts):
        session.reset()
        logits = [session.feed(ids)]
        tokens = []
        for _ in range(GOLDEN_STEPS - 1):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(session.feed([tokens[-1]]))
        tokens.append(int(np.argmax(logits[-1])))
        arrays[f"prompt_ids_{k}"] = np.asarray(ids, np.int64)
        arrays[f"greedy_{k}"] = np.asarray(tokens, np.int64)
        arrays[f"logits_{k}"] = np.stack(logits).astype(np.float32)  # [GOLDEN_STEPS, vocab]
    with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
        np.savez(f, **arrays)
    return {"file": path.name, "prompts": len(prompts), "steps": GOLDEN_STEPS}


def reference_perplexity(model: Transformer, layout: CacheLayout, tokenizer_dir: Path) -> dict:
    ids = np.asarray(Tokenizer(tokenizer_dir).encode(load_text(None, "eval")), np.int64)
    result = ppl_protocol.perplexity(fresh_window_logits(reference_session(model, layout)), ids, PPL_CTX, PPL_MAX_TOKENS)
    return {**result.to_dict(), "text": "default:eval", "max_tokens": PPL_MAX_TOKENS}
