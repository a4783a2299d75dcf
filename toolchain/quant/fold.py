"""Folding per-input-channel scales into a model without changing its float function: the consumers'
weight columns are multiplied by s, and whatever produced their input divides by s. Used by AWQ and
SmoothQuant alike."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_scales_(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """producer: an RMSNorm (its gain divides by s) or a linear (its output rows, and bias, divide)."""
    if isinstance(producer, nn.Linear):  # the producer's output rows are the consumers' input columns
        producer.weight.div_(s[:, None])
        if producer.bias is not None:
            producer.bias.div_(s)
    else:
        producer.weight.div_(s)
    for lin in consumers:
        lin.weight.mul_(s[None, :])
