"""The sink-window KV cache schedule (StreamingLLM), decided on the host, defined once.

Capacity C = S + W slots per layer: slots 0..S-1 hold the first S tokens forever (attention sinks),
slots S..C-1 hold the most recent W tokens as a ring. Slot C is a trash slot that padded positions
write to and nobody reads, so every step has static shapes.

Positions live inside the cache: sinks at 0..S-1, window tokens at S.. in age order. Keys are
stored rotated at their true positions. Because the window is contiguous, a query rotated at its
true position sees every window key at exactly its in-cache distance; only the sinks' distances
differ, so the query is rotated a second time at its in-cache position for the sink slots. No key
is ever re-rotated and no query-key distance exceeds C.

A chunk of P <= W tokens is processed at once, and query i sees exactly what it would have seen had
the tokens come one at a time: old window slots its own predecessors would already have evicted
are masked out. The new keys are written after attention, so that still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rope
from .errors import PocketLMError

MASKED = -1e9  # finite: a fully masked (padded) row softmaxes to uniform, never NaN
ROPE_BLOCK = 64  # decode steps take their RoPE rows from a table made for this many positions at once


@dataclass(frozen=True)
class CacheLayout:
    sink_size: int
    window_size: int
    chunk: int  # prefill chunk length P (decode steps take 1 token)

    def __post_init__(self):
        if self.sink_size < 0 or self.window_size < 1:
            raise PocketLMError(f"cache needs sink_size >= 0 and window_size >= 1, got {self}")
        if not 1 <= self.chunk <= self.window_size:
            raise PocketLMError(
                f"prefill chunk {self.chunk} must be between 1 and window_size {self.window_size}; "
                "a chunk longer than the window would evict its own tokens"
            )

    @property
    def cache_len(self) -> int:
        return self.sink_size + self.window_size

    @property
    def trash_slot(self) -> int:
        return self.cache_len

    @property
    def physical_len(self) -> int:
        return self.cache_len + 1


@dataclass
class StepInputs:
    """Everything one program call takes besides the cache. P = number of token positions."""

    tokens: np.ndarray  # [1, P] int64, padded with 0
    cos_win: np.ndarray  # [P, head_dim] float32: the query (and new key) at its true position
    sin_win: np.ndarray
    cos_sink: np.ndarray  # [P, head_dim]: the query at its in-cache position, for sink slots
    sin_sink: np.ndarray
    mask: np.ndarray  # [P, physical_len + P] float32 additive: old cache slots, then the new tokens
    slots: np.ndarray  # [P] int64: where each new K/V goes (trash slot for padding)
    n_valid: int
    # single-token steps: how many leading cache slots the token attends to once its K/V are written
    # (decode_key_count, in closed form), so a fused kernel reads the count without scanning the mask
    n_keys: int = 0
    # how many leading cache slots hold tokens before the step (min(position, cache_len)): slots fill
    # in order, so every slot the step may see lies among them and a program can read just those rows
    n_cached: int = 0

    def as_tuple(self):
        return (self.tokens, self.cos_win, self.sin_win, self.cos_sink, self.sin_sink, self.mask, self.slots)


INPUT_NAMES = ("tokens", "cos_win", "sin_win", "cos_sink", "sin_sink", "mask", "slots")


class SinkWindowSchedule:
    """Host-side bookkeeping: which true position each slot holds, and each step's inputs."""

    def __init__(self, layout: CacheLayout, freq: np.ndarray):
        self.layout = layout
        self.freq = freq
        # a query's in-cache position is one of the cache_len positions: its rotation is looked up
        self.cache_rope = rope.cos_sin(freq, np.arange(layout.cache_len))
        self._rope_rows = (0, *rope.cos_sin(freq, np.arange(ROPE_BLOCK)))  # (first position, cos, sin)
        self.reset()

    def reset(self) -> None:
        self.n_seen = 0  # tokens processed so far = next token's true position
        self.slot_pos = np.full(self.layout.physical_len, -1, dtype=np.int64)  # -1: empty

    def slot_of(self, pos: int) -> int:
        s, w = self.layout.sink_size, self.layout.window_size
        return pos if pos < s else s + (pos - s) % w

    def cache_position(self, pos: int) -> int:
        """Where a query at true position pos sits inside the cache (it is the newest token)."""
        s, w = self.layout.sink_size, self.layout.window_size
        return pos if pos < s + w else s + w - 1

    def step_inputs(self, token_ids, width: int) -> StepInputs:
        """Inputs for the next len(token_ids) tokens, padded to `width` positions."""
        n, s, w = len(token_ids), self.layout.sink_size, self.layout.window_size
        if not 1 <= n <= width <= w:
            raise PocketLMError(f"a step takes 1..{width} tokens (window {w}), got {n}")
        if width == 1:
            return self._decode_inputs(int(token_ids[0]))
        pos = self.n_seen + np.arange(width)
        tokens = np.zeros((1, width), np.int64)
        tokens[0, :n] = token_ids
        cos, sin = rope.cos_sin(self.freq, np.concatenate([pos, [self.cache_position(int(p)) for p in pos]]))
        cos_win, cos_sink, sin_win, sin_sink = cos[:width], cos[width:], sin[:width], sin[width:]
        slots = np.full(width, self.layout.trash_slot, np.int64)
        slots[:n] = [self.slot_of(int(p)) for p in pos[:n]]

        # old slots: sinks always visible; a window token only while it is among the last w
        old = self.slot_pos[None, :]
        q = pos[:, None]
        visible_old = (old >= 0) & ((old < s) | (old > q - w))
        # new tokens: causal, and (chunk <= w) never evicted by a later token of the same chunk
        kq = np.arange(width)
        visible_new = (kq[None, :] <= kq[:, None]) & (kq[None, :] < n)
        visible = np.concatenate([visible_old, visible_new], axis=1)
        visible[n:] = False
        visible[n:, self.layout.physical_len :] = np.eye(width, dtype=bool)[n:]  # padding sees itself
        mask = np.where(visible, 0.0, MASKED).astype(np.float32)
        return StepInputs(tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots, n,
                          n_cached=min(self.n_seen, self.layout.cache_len))

    def _decode_inputs(self, token: int) -> StepInputs:
        """step_inputs for one token, on the generation hot path (every line here runs between two
        program calls, with the caches cold, at several microseconds a numpy call): the same arrays,
        from the closed form of the mask. Slots fill in order, so before the ring wraps the token
        sees slots 0..pos-1; after it, every slot but the one it evicts (it holds pos - W, which has
        just left the window). RoPE rows are views into tables made ROPE_BLOCK positions at a time."""
        c, pos = self.layout.cache_len, self.n_seen
        first, cos, sin = self._rope_rows
        if not first <= pos < first + ROPE_BLOCK:
            first = pos
            self._rope_rows = (first, *rope.cos_sin(self.freq, np.arange(first, first + ROPE_BLOCK)))
            cos, sin = self._rope_rows[1:]
        row = pos - first
        at = self.cache_position(pos)
        cos_cache, sin_cache = self.cache_rope
        slot = self.slot_of(pos)
        mask = np.full((1, self.layout.physical_len + 1), np.float32(MASKED))
        mask[0, : min(pos, c)] = 0.0
        if pos >= c:
            mask[0, slot] = MASKED
        mask[0, -1] = 0.0  # the token itself
        return StepInputs(np.array([[token]], np.int64), cos[row : row + 1], sin[row : row + 1], cos_cache[at : at + 1],
                          sin_cache[at : at + 1], mask, np.array([slot], np.int64), 1, min(pos + 1, c), min(pos, c))

    def commit(self, step: StepInputs) -> None:
        """Record that the program wrote the step's valid tokens into their slots."""
        n = step.n_valid
        if n == 1:  # a decode step: one scalar store (the array form costs 10 us more, cache cold)
            self.slot_pos[int(step.slots[0])] = self.n_seen
        else:
            self.slot_pos[step.slots[:n]] = np.arange(self.n_seen, self.n_seen + n)
        self.n_seen += n


def decode_key_count(step: StepInputs) -> int:
    """How many leading cache slots a single-token step attends to once its K/V are in their slot,
    read off its mask (the definition that StepInputs.n_keys is checked against).
    Slots fill in order and, once the ring is full, every slot is visible (the new token's slot held
    exactly the token it evicts), so a token always sees slots 0..n-1: a fused attention kernel
    (ExecuTorch's decode method) reads just those n, not the whole cache."""
    if step.n_valid != 1 or step.tokens.shape[1] != 1:
        raise PocketLMError("decode_key_count() is for single-token steps")
    visible = step.mask[0, : step.mask.shape[1] - 1] == 0
    visible[step.slots[0]] = True
    n = int(visible.sum())
    if not visible[:n].all():
        raise PocketLMError("the visible cache slots are not a prefix of the cache; the schedule is inconsistent")
    return n
