"""`pocketlm::grouped_query_attention`: ONNX Runtime's fused attention (com.microsoft
GroupQueryAttention) as a torch op, so the ONNX step can be traced with it and exported as one node
per layer (toolchain/export/onnx_export.py translates it).

The semantics are those of ONNX Runtime's kernel with the past and present caches sharing one
buffer: the step's P keys and values are written into the cache at rows [T - P, T), where T is
total_sequence_length, and each query i attends to rows [0, T - P + i] (causal within the step),
scores scaled by 1/sqrt(head_dim) plus attention_bias [1, 1, P, T], each KV head serving its group
of query heads (no copy of the cache, none expanded). The eager version below computes the same thing
on copies: tracing and tests run it, ONNX Runtime's kernel runs the exported program.
"""

from __future__ import annotations

import math

import torch

OP = "pocketlm::grouped_query_attention"


@torch.library.custom_op(OP, mutates_args=())
def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, attention_bias: torch.Tensor, seqlens_k: torch.Tensor,
                            total_sequence_length: torch.Tensor, num_heads: int,
                            kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [1, P, num_heads * hd]; key, value [1, P, kv_num_heads * hd] (keys already rotated);
    key_cache, value_cache [1, kv_num_heads, L, hd]; seqlens_k [1] int32 = T - 1;
    total_sequence_length [] int32 = T <= L. Returns (out [1, P, num_heads * hd], the caches with the
    step's rows written)."""
    p, hd = query.shape[1], key_cache.shape[-1]
    total = int(total_sequence_length)
    past = total - p
    present_k, present_v = key_cache.clone(), value_cache.clone()
    present_k[0, :, past:total] = key[0].view(p, kv_num_heads, hd).transpose(0, 1)
    present_v[0, :, past:total] = value[0].view(p, kv_num_heads, hd).transpose(0, 1)
    group = num_heads // kv_num_heads
    q = query[0].view(p, kv_num_heads, group, hd).permute(1, 2, 0, 3)  # [kv, group, P, hd]
    keys, values = present_k[0, :, None, :total], present_v[0, :, None, :total]  # [kv, 1, T, hd]
    causal = torch.arange(total)[None, :] > past + torch.arange(p)[:, None]
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(hd) + attention_bias[0, 0]
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    out = (probs @ values).permute(2, 0, 1, 3).reshape(1, p, num_heads * hd)
    return out, present_k, present_v


@grouped_query_attention.register_fake
def _(query, key, value, key_cache, value_cache, attention_bias, seqlens_k, total_sequence_length, num_heads, kv_num_heads):
    return query.new_empty(query.shape), key_cache.new_empty(key_cache.shape), value_cache.new_empty(value_cache.shape)
