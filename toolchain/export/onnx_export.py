"""ONNX export of the sink-window cached step: one graph, dynamic step length (1 for decode, up to
the prefill chunk) and cache length, one fused attention per layer (ONNX Runtime's
com.microsoft GroupQueryAttention), weights in one external data file, checked with the ONNX checker."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pocketlm.runtime.backends.onnx import STEP_INPUTS, past_names, present_names
from pocketlm.runtime.sink_cache import CacheLayout

from ..model.grouped_attention import grouped_query_attention
from ..model.sink_cache import SinkCacheShared, cache_shapes
from ..model.transformer import RMSNorm, Transformer

OPSET = 18
MS_DOMAIN = "com.microsoft"
GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
              "sin_cache", "position_ids", "attention_bias")


def _declare_grouped_query_attention() -> None:
    """The ONNX exporter builds a node from its operator's schema; ONNX Runtime's contrib operators
    have theirs inside ONNX Runtime, so the inputs, outputs and attributes this export uses are
    declared to the onnx package (once per process)."""
    from onnx import defs

    if defs.has("GroupQueryAttention", MS_DOMAIN):
        return
    param, option = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption
    kinds = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "I"}
    inputs = [param(name, kinds.get(name, "T"), "", param_option=option.Single if i in (0, 5, 6) else option.Optional)
              for i, name in enumerate(GQA_INPUTS)]
    defs.register_schema(defs.OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1, inputs=inputs,
        outputs=[param("output", "T", ""), param("present_key", "T", ""), param("present_value", "T", "")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[defs.OpSchema.Attribute("num_heads", defs.OpSchema.AttrType.INT, ""),
                    defs.OpSchema.Attribute("kv_num_heads", defs.OpSchema.AttrType.INT, ""),
                    defs.OpSchema.Attribute("do_rotary", defs.OpSchema.AttrType.INT, "")]))


def _grouped_query_attention_onnx(packed_qkv, key_cache, value_cache, attention_bias, seqlens_k, total_sequence_length,
                                  cos_cache, sin_cache, num_heads: int, kv_num_heads: int):
    """pocketlm::grouped_query_attention as the com.microsoft node: q|k|v packed in the query input
    (no key, value), rotated inside by the row tables (no position_ids: the kernel reads rows [T - P, T))."""
    import onnxscript

    msft = onnxscript.values.Opset(MS_DOMAIN, 1)
    return msft.GroupQueryAttention(packed_qkv, None, None, key_cache, value_cache, seqlens_k, total_sequence_length,
                                    cos_cache, sin_cache, None, attention_bias, num_heads=num_heads,
                                    kv_num_heads=kv_num_heads, do_rotary=1)


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
    past = [torch.zeros(s) for s in cache_shapes(model, layout) for _ in ("key", "value")]
    total = layout.physical_len
    return (torch.zeros(1, t, dtype=torch.long), torch.ones(total, hd // 2), torch.zeros(total, hd // 2), torch.zeros(1, 1, t, total),
            torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32), past)


def export_onnx(model: Transformer, layout: CacheLayout, path: Path) -> Path:
    """Write model.onnx (+ model.onnx.data) at path. The head size must be a multiple of 16 (ONNX
    Runtime's rotary kernel; export_bundle refuses other models before any work)."""
    import onnx

    _declare_grouped_query_attention()
    n = model.config.n_layers
    steps = torch.export.Dim("steps", min=1, max=max(layout.chunk, 2))
    # the host binds the rows a step reads and writes (runtime.backends.onnx: the cache rows are
    # dynamic; once the ring is full, spare rows after it hold each query's sink copies and the
    # step's own tokens), and the keys a step attends to are a prefix of them
    rows = layout.cache_len + layout.chunk * (layout.sink_size + 1)
    cache_rows = torch.export.Dim("cache_rows", min=1, max=rows)
    keys = torch.export.Dim("keys", min=1, max=rows)
    table = {0: torch.export.Dim("table_rows", min=1, max=rows)}  # RoPE by cache row: the host binds them at the capacity
    dynamic = ({1: steps}, table, table, {2: steps, 3: keys}, None, None, [{2: cache_rows}] * (2 * n))
    wrapper = SinkCacheShared(model, layout).eval()
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
            custom_translation_table={grouped_query_attention._opoverload: _grouped_query_attention_onnx},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    return path
