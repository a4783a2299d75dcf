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
    return model.rope_inv_freq.numpy()


class TorchBackend:
    name = "pytorch"

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
