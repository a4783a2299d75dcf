"""Reference generation in PyTorch: greedy decoding with pocketlm's Transformer.

The phone-side loop lives in pocketlm.runtime; this one is the oracle it is compared against.
"""

from __future__ import annotations

from typing import Callable

import torch

from .model.transformer import Transformer


@torch.no_grad()
def greedy(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedy continuation of prompt_ids; recomputes the whole sequence each step (no cache)."""
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        token = int(logits.argmax())
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
        if on_token:
            on_token(token)
    return new


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
    """The model's own chat template around one user message, ready for the assistant's turn."""
    messages = [{"role": "user", "content": user_message}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def stop_token_ids(model: Transformer, tokenizer) -> tuple[int, ...]:
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
