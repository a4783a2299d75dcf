"""Program backends behind one small interface: step(StepInputs) -> logits [P, vocab]."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..sink_cache import StepInputs


class Backend(Protocol):
    name: str

    def step(self, inputs: StepInputs) -> np.ndarray:
        """Run one step (1 or `chunk` positions), update the cache, return float32 logits [P, vocab]."""

    def reset(self) -> None:
        """Empty the cache for a new conversation."""
