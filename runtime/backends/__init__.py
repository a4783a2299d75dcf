"""Program backends behind one small interface: step(StepInputs) -> logits [P, vocab]."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import PocketLMError
from ..sink_cache import StepInputs

NAMES = ("onnx", "executorch")


class Backend(Protocol):
    name: str
    decode_from: int  # the first position its single-token step serves; earlier single tokens go as a chunk
    causal_until: int  # prefill_last serves chunks ending by this position (0: it has none)
    chunk_break: int | None  # a position no multi-token step may straddle (None: any step goes)

    def step(self, inputs: StepInputs) -> np.ndarray:
        """Run one step (1 or `chunk` positions), update the cache, return float32 logits [P, vocab]."""

    def prefill_last(self, inputs: StepInputs, start: int) -> np.ndarray:
        """A `chunk`-position step starting at position `start` while the cache still fills in order
        (start + chunk <= causal_until); updates the cache like step() and returns only the last real
        token's logits [vocab]. Backends with causal_until = 0 never get this call."""

    def reset(self) -> None:
        """Empty the cache for a new conversation."""


def load_backend(bundle, name: str, threads: int = 2) -> Backend:
    """The named backend over the bundle's program for it (imports its runtime only now)."""
    if name not in NAMES:
        raise PocketLMError(f"unknown backend '{name}'; choose from {', '.join(NAMES)}")
    path = bundle.program_path(name)
    if name == "onnx":
        from .onnx import OnnxBackend

        return OnnxBackend(path, bundle.cache_shapes(), threads, bundle.manifest["programs"][name], bundle.layout)
    from .executorch import ExecuTorchBackend

    return ExecuTorchBackend(path, threads, bundle.manifest["programs"][name])
