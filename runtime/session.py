"""A conversation's state over one backend: the host schedule plus the program's cache.

Prompts are prefilled chunk by chunk (a prompt longer than the whole cache just evicts as it goes),
through the backend's causal prefill while the cache still fills in order and only the last logits
are wanted (its causal_until), split where the backend's chunk_break says no step may straddle;
single tokens take the 1-position decode step (from the backend's decode_from position on). Memory and per-token work do not depend on how long
the conversation has been.
"""

from __future__ import annotations

import numpy as np

from .backends import Backend
from .errors import PocketLMError
from .sink_cache import CacheLayout, SinkWindowSchedule


class CachedSession:
    def __init__(self, backend: Backend, layout: CacheLayout, freq: np.ndarray):
        self.backend = backend
        self.layout = layout
        self.schedule = SinkWindowSchedule(layout, freq)

    @property
    def n_seen(self) -> int:
        return self.schedule.n_seen

    def reset(self) -> None:
        self.schedule.reset()
        self.backend.reset()

    def feed(self, ids, keep_logits: bool = False) -> np.ndarray:
        """Push tokens through the cache. Returns the last token's logits [vocab], or all [n, vocab]."""
        ids = list(ids)
        if not ids:
            raise PocketLMError("nothing to feed: the prompt encodes to zero tokens; pass a non-empty prompt")
        chunk, outs, start = self.layout.chunk, [], 0
        while start < len(ids):
            n = min(chunk, len(ids) - start)
            brk = self.backend.chunk_break
            if brk is not None and self.n_seen < brk < self.n_seen + n:  # a step may not straddle it
                n = brk - self.n_seen
            piece, start = ids[start : start + n], start + n
            # a backend's single-token method may not serve the first positions (ExecuTorch's: the sinks)
            width = 1 if len(piece) == 1 and self.n_seen >= self.backend.decode_from else chunk
            step = self.schedule.step_inputs(piece, width)
            if width > 1 and not keep_logits and self.n_seen + width <= self.backend.causal_until:
                logits = self.backend.prefill_last(step, self.n_seen)[None]  # a prompt needs only its last row
            else:
                logits = self.backend.step(step)[: step.n_valid]
            self.schedule.commit(step)
            if keep_logits:
                outs.append(logits)
            last = logits[-1]
        return np.concatenate(outs) if keep_logits else last


def fresh_window_logits(session: CachedSession):
    """A perplexity LogitsFn over the cache: each window starts a new conversation."""

    def logits(ids: np.ndarray) -> np.ndarray:
        session.reset()
        return session.feed(ids.tolist(), keep_logits=True)

    return logits
