"""ONNX export of the sink-window cached step: one graph, dynamic step length (1 for decode, up to
the prefill chunk), weights in one external data file, checked with the ONNX checker."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pocketlm.runtime.backends.onnx import STEP_INPUTS, past_names, present_names
from pocketlm.runtime.sink_cache import CacheLayout

from ..model.sink_cache import SinkCacheStateless, cache_shapes
from ..model.transformer import RMSNorm, Transformer

OPSET = 18


class FusableRMSNorm(nn.Module):
    """RMSNorm written as x / sqrt(mean(x^2) + eps) * w, the pattern ONNX Runtime fuses at load
    into one SimplifiedLayerNormalization node; the model's own form (x * rsqrt(..) over a 4-D view,
    which XNNPACK delegates whole) exports as nine nodes that ONNX Runtime leaves as they are."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@contextmanager
def fusable_norms(model: Transformer):
    """The model's RMSNorms swapped for FusableRMSNorm for the duration (the same weights), then put back."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, RMSNorm)]
    for parent, name, child in swapped:
        setattr(parent, name, FusableRMSNorm(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def example_inputs(model: Transformer, layout: CacheLayout, t: int):
    hd = model.config.head_dim
    rope = [torch.ones(t, hd) for _ in range(4)]
    mask = torch.zeros(t, layout.physical_len + t)
    past = [torch.zeros(s) for s in cache_shapes(model, layout) for _ in ("key", "value")]
    return (torch.zeros(1, t, dtype=torch.long), *rope, mask, past)


def export_onnx(model: Transformer, layout: CacheLayout, path: Path) -> Path:
    """Write model.onnx (+ model.onnx.data) at path."""
    import onnx

    n = model.config.n_layers
    steps = torch.export.Dim("steps", min=1, max=max(layout.chunk, 2))
    row = {0: steps}
    # the host binds the leading cache slots that hold tokens, not the whole ring (runtime.backends.onnx:
    # the cache rows are dynamic); the mask covers those slots and the step's own positions (torch.export
    # works out that sum)
    cache_rows = torch.export.Dim("cache_rows", min=1, max=layout.physical_len)
    dynamic = ({1: steps}, row, row, row, row, {0: steps, 1: torch.export.Dim.AUTO}, [{2: cache_rows}] * (2 * n))
    wrapper = SinkCacheStateless(model, layout).eval()
    with torch.no_grad(), fusable_norms(model):
        program = torch.onnx.export(
            wrapper,
            example_inputs(model, layout, max(layout.chunk, 2)),
            input_names=[*STEP_INPUTS, *past_names(n)],
            output_names=["logits", *present_names(n)],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    return path
