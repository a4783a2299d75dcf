"""The PyTorch reference backend: pocketlm's Transformer over the sink-window cache, eager.

It implements the runtime's Backend interface, so the runtime's session and generation loop run on
it unchanged; exported programs are checked against it on the same token stream.
"""

from __future__ import annotations

import numpy as np
import torch

from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.sink_cache import CacheLayout, StepInputs

from .model.sink_cache import SinkCacheProgram
from .model.transformer import Transformer


def rope_freq(model: Transformer) -> np.ndarray:
    """The float64 frequencies a bundle's runtime derives from its manifest, so host-side RoPE tables
    (and an integer program's Q14 tables) are the very same numbers here and on the device; the
    model's own buffer was cast to float32 with the rest of the model."""
    from pocketlm.runtime.rope import inv_freq

    c = model.config
    return inv_freq(c.head_dim, c.rope_theta, c.rope_scaling.__dict__ if c.rope_scaling else None)


class TorchBackend:
    name = "pytorch"
    decode_from = 0
    causal_until = 0  # every chunk takes the masked step
    chunk_break = None

    def __init__(self, model: Transformer, layout: CacheLayout):
        self.program = SinkCacheProgram(model, layout).eval()

    @torch.no_grad()
    def step(self, inputs: StepInputs) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.as_tuple()]
        return self.program(*args)[0].numpy()

    def reset(self) -> None:
        self.program.reset_cache()


def reference_session(model: Transformer, layout: CacheLayout) -> CachedSession:
    return CachedSession(TorchBackend(model, layout), layout, rope_freq(model))
