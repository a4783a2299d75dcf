"""`pocketlm::grouped_query_attention`: ONNX Runtime's fused attention (com.microsoft
GroupQueryAttention, with its rotary embedding) as a torch op, so the ONNX step can be traced with it
and exported as one node per layer (toolchain/export/onnx_export.py translates it).

The semantics are those of ONNX Runtime's kernel given the projections packed as q|k|v, do_rotary
set, and the past and present caches sharing one buffer: the step's P queries and keys are rotated
(RoPE, half-split layout) by the rows [T - P, T) of cos_cache and sin_cache, where T is
total_sequence_length; its keys and values are written into the cache at those rows, and each query
i attends to rows [0, T - P + i] (causal within the step), scores scaled by 1/sqrt(head_dim) plus
attention_bias [1, 1, P, T], each KV head serving its group of query heads (no copy of the cache,
none expanded). The tables are indexed by cache row, not position: the host writes the step's own
angles at the rows its tokens go to (runtime.backends.onnx), so positions are never bounded by a
table. The eager version below computes the same thing on copies: tracing and tests run it,
ONNX Runtime's kernel runs the exported program.
"""

from __future__ import annotations

import math

import torch

from .rope import apply_rope

OP = "pocketlm::grouped_query_attention"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [P, heads, hd]; cos, sin [P, hd / 2]: rope.apply_rope with each angle in both halves of a head."""
    return apply_rope(x, torch.cat([cos, cos], dim=-1)[:, None], torch.cat([sin, sin], dim=-1)[:, None])


@torch.library.custom_op(OP, mutates_args=())
def grouped_query_attention(packed_qkv: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            attention_bias: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                            cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
                            kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """packed_qkv [1, P, (num_heads + 2 kv_num_heads) * hd], un-rotated; key_cache, value_cache
    [1, kv_num_heads, L, hd]; seqlens_k [1] int32 = T - 1; total_sequence_length [] int32 = T <= L;
    cos_cache, sin_cache [>= T, hd / 2]. Returns (out [1, P, num_heads * hd], the caches with the
    step's rows written)."""
    p, hd = packed_qkv.shape[1], key_cache.shape[-1]
    total = int(total_sequence_length)
    past = total - p
    heads = packed_qkv[0].view(p, num_heads + 2 * kv_num_heads, hd)
    cos, sin = cos_cache[past:total], sin_cache[past:total]
    q = _rotate(heads[:, :num_heads], cos, sin)
    k = _rotate(heads[:, num_heads : num_heads + kv_num_heads], cos, sin)
    v = heads[:, num_heads + kv_num_heads :]
    present_k, present_v = key_cache.clone(), value_cache.clone()
    present_k[0, :, past:total], present_v[0, :, past:total] = k.transpose(0, 1), v.transpose(0, 1)
    group = num_heads // kv_num_heads
    q = q.reshape(p, kv_num_heads, group, hd).permute(1, 2, 0, 3)  # [kv, group, P, hd]
    keys, values = present_k[0, :, None, :total], present_v[0, :, None, :total]  # [kv, 1, T, hd]
    causal = torch.arange(total)[None, :] > past + torch.arange(p)[:, None]
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(hd) + attention_bias[0, 0]
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    out = (probs @ values).permute(2, 0, 1, 3).reshape(1, p, num_heads * hd)
    return out, present_k, present_v


@grouped_query_attention.register_fake
def _(packed_qkv, key_cache, value_cache, attention_bias, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      num_heads, kv_num_heads):
    p = packed_qkv.shape[1]
    out = packed_qkv.new_empty((1, p, num_heads * key_cache.shape[-1]))
    return out, key_cache.new_empty(key_cache.shape), value_cache.new_empty(value_cache.shape)
