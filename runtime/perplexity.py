"""The one perplexity protocol every stage and backend is measured with.

Non-overlapping windows of `ctx` tokens over the first `max_tokens` tokens; inside each window every
token but the first is scored given the tokens before it. A trailing partial window of at least
two tokens is scored too, so no text is silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import PocketLMError

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids [T] int64 -> logits [T, vocab] float


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float
    tokens: int  # scored tokens
    windows: int
    ctx: int
    token_nll: np.ndarray = field(repr=False)  # [tokens], in stream order

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll_mean": self.nll_mean, "tokens": self.tokens, "windows": self.windows, "ctx": self.ctx}


def eval_windows(ids, ctx: int, max_tokens: int | None = None) -> list[np.ndarray]:
    if ctx < 2:
        raise PocketLMError(f"--ctx must be at least 2 tokens, got {ctx}")
    ids = np.asarray(ids, dtype=np.int64)[: max_tokens or None]
    windows = [ids[i : i + ctx] for i in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise PocketLMError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    return windows


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1]; exp in float32, sums in float64."""
    z = np.asarray(logits[:-1], dtype=np.float32)
    zmax = z.max(axis=-1, keepdims=True)
    sum_exp = np.exp(z - zmax).sum(axis=-1, dtype=np.float64)
    target = z[np.arange(len(z)), ids[1:]].astype(np.float64)
    return zmax[:, 0].astype(np.float64) + np.log(sum_exp) - target


def perplexity(logits_fn: LogitsFn, ids, ctx: int = 512, max_tokens: int | None = None, progress=None) -> PerplexityResult:
    windows = eval_windows(ids, ctx, max_tokens)
    nll = []
    for w in progress(windows) if progress else windows:
        nll.append(token_nll(logits_fn(w), w))
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    return PerplexityResult(math.exp(mean), mean, int(all_nll.size), len(windows), ctx, all_nll)
