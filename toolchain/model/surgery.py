"""Shrinking one layer in place: keep a subset of KV-head groups or MLP channels.

A KV head is kept or dropped together with the query heads that share it and the matching input
columns of o_proj (the coupled group of LLM-Pruner); an MLP channel together with its gate row,
up row and down column. The result is a smaller dense layer, and the config says its new sizes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import LayerSpec
from .transformer import Transformer


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    out.weight.data = linear.weight.data[rows].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data[rows].clone()
    return out


def _keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(cols), linear.out_features, bias=linear.bias is not None)
    out.weight.data = linear.weight.data[:, cols].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone()
    return out


def _set_layer_spec(model: Transformer, layer: int, spec: LayerSpec) -> None:
    layers = list(model.config.layers)
    layers[layer] = spec
    model.config = dataclasses.replace(model.config, layers=tuple(layers))


def keep_kv_heads_(model: Transformer, layer: int, kv_heads: list[int]) -> None:
    """Keep these KV heads of `layer` (and their query-head groups); drop the rest."""
    attn = model.model.layers[layer].self_attn
    hd, group = attn.head_dim, attn.n_heads // attn.n_kv_heads
    kv = torch.tensor(sorted(kv_heads))
    q_heads = (kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    kv_rows = (kv[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    attn.q_proj = _keep_rows(attn.q_proj, q_rows)
    attn.k_proj = _keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = _keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = _keep_cols(attn.o_proj, q_rows)
    attn.n_heads, attn.n_kv_heads = len(q_heads), len(kv)
    old = model.config.layers[layer]
    _set_layer_spec(model, layer, LayerSpec(len(q_heads), len(kv), old.hidden_dim))


def keep_mlp_channels_(model: Transformer, layer: int, channels: list[int]) -> None:
    """Keep these intermediate channels of `layer`'s SwiGLU MLP; drop the rest."""
    mlp = model.model.layers[layer].mlp
    ch = torch.tensor(sorted(channels))
    mlp.gate_proj = _keep_rows(mlp.gate_proj, ch)
    mlp.up_proj = _keep_rows(mlp.up_proj, ch)
    mlp.down_proj = _keep_cols(mlp.down_proj, ch)
    old = model.config.layers[layer]
    _set_layer_spec(model, layer, LayerSpec(old.n_heads, old.n_kv_heads, len(ch)))
