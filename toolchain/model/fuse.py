"""Linears that read the same input, run as one for export: q|k|v after the input norm, gate|up after
the post-attention norm.

One matmul instead of three (two) per site: a decode step then quantizes each shared input once
(XNNPACK's 8-bit dynamic activations, ONNX Runtime's MatMulNBits) and dispatches 4 linears per
layer instead of 7. Rows are stacked, so every row keeps its own weights, group scales and codes:
the fused weight lies on the same int4 or int8 grid and the product is the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformer import Transformer


def _stacked(linears: list[nn.Linear]) -> nn.Linear:
    biases = [lin.bias for lin in linears]
    fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears), bias=biases[0] is not None)
    fused.weight.data = torch.cat([lin.weight.data for lin in linears])
    if biases[0] is not None:
        fused.bias.data = torch.cat([b.data for b in biases])
    return fused.to(linears[0].weight.dtype)


def fuse_projections_(model: Transformer) -> Transformer:
    """In place: each layer's q/k/v and gate/up become one linear each (the separate ones are
    dropped). For a copy that is only exported; the model's own state dict names change."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = _stacked([attn.q_proj, attn.k_proj, attn.v_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = _stacked([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
    return model
