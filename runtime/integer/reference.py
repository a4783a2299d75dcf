"""The numpy integer reference behind the runtime's Backend interface: the integers an exported
integer-only program must reproduce bit for bit, run through the same session and cache schedule."""

from __future__ import annotations

import numpy as np

from ..sink_cache import CacheLayout, StepInputs
from .model import IntegerModel, decoder_step, dequantize_logits, integer_inputs
from .ops import NumpyOps


class IntegerReferenceBackend:
    name = "integer-reference"
    decode_from = 0
    causal_until = 0  # every chunk takes the masked step
    chunk_break = None

    def __init__(self, model: IntegerModel, layout: CacheLayout):
        self.model, self.layout, self.ops = model, layout, NumpyOps()
        shape = lambda layer: (1, layer.n_kv_heads, layout.physical_len, model.head_dim)  # noqa: E731
        self.caches = [np.zeros(shape(layer), np.int16) for layer in model.layers for _ in ("key", "value")]
        self.last_logits: np.ndarray | None = None  # int32 [P, vocab] of the last step, for bit-exact checks

    def step(self, inputs: StepInputs) -> np.ndarray:
        past = list(zip(self.caches[0::2], self.caches[1::2]))
        logits, new_kv = decoder_step(self.ops, self.model, self.layout.sink_size, *integer_inputs(inputs), past)
        for cache, fresh in zip(self.caches, [t for kv in new_kv for t in kv]):
            cache[:, :, inputs.slots] = fresh
        self.last_logits = logits[0]
        return dequantize_logits(logits[0], self.model.logits_scale)

    def reset(self) -> None:
        for cache in self.caches:
            cache.fill(0)
