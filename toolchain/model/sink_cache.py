"""pocketlm's Transformer running over the sink-window KV cache (semantics: pocketlm.runtime.sink_cache).

One step takes P token positions plus the host's RoPE tables, mask and slots. Two wrappers share
`cached_forward`:
- SinkCacheProgram keeps the cache in buffers updated in place (the ExecuTorch program and the
  eager PyTorch reference);
- SinkCacheStateless takes the cache as inputs and returns only the new K/V (the ONNX program; the
  host writes them into its ring, so no step copies the whole cache).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pocketlm.runtime.sink_cache import CacheLayout

from .rope import apply_rope
from .transformer import Attention, Transformer


def attend(attn: Attention, q, keys, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size: int):
    """q: un-rotated [1, n_heads, P, hd]; keys (rotated at their true positions) and values:
    [n_kv_heads, n_keys, hd]; mask: [P, n_keys]. Returns the output projection [1, P, dim]."""
    q_win = apply_rope(q, cos_win, sin_win)
    q_sink = apply_rope(q, cos_sink, sin_sink)
    n_kv, hd, p = attn.n_kv_heads, attn.head_dim, q.shape[2]
    group = attn.n_heads // attn.n_kv_heads
    # 3-D batched matmuls over the KV heads (batch 1 dropped), each KV head's query group folded
    # into the rows, so the cache is never expanded: q: [1, n_heads, P, hd] -> [n_kv, group * P, hd]
    q_win = q_win.reshape(n_kv, group * p, hd)
    q_sink = q_sink.reshape(n_kv, group * p, hd)
    n_keys = keys.shape[1]
    scale = 1.0 / math.sqrt(hd)
    scores = torch.cat(
        [torch.bmm(q_sink, keys[:, :sink_size].transpose(1, 2)), torch.bmm(q_win, keys[:, sink_size:].transpose(1, 2))],
        dim=-1,
    )  # [n_kv, group * P, n_keys]
    scores = scores.view(n_kv, group, p, n_keys) * scale + mask
    probs = torch.softmax(scores, dim=-1).view(n_kv, group * p, n_keys)
    out = torch.bmm(probs, values).view(attn.n_heads, p, hd).transpose(0, 1).reshape(1, p, attn.n_heads * hd)
    return attn.o_proj(out)


def cached_attention(
    attn: Attention, x, cos_win, sin_win, cos_sink, sin_sink, mask, k_cache, v_cache, sink_size: int, slots=None
):
    """x: [1, P, dim]; k_cache/v_cache: [1, n_kv_heads, L, hd] (L = physical cache length).
    Returns (output [1, P, dim], k_new, v_new [1, n_kv_heads, P, hd]).

    Without `slots` the new K/V are appended after the cache for this step (mask: [P, L + P]) and the
    caller writes them afterwards, which a chunk needs (its later tokens evict slots its earlier ones
    still see). With `slots` (a single decode token) they are written into the cache first and
    attention reads the cache alone (mask: [P, L], the new token's slot visible): no copy of the cache.
    """
    q, k, v = attn.project_qkv(x)
    k_new = apply_rope(k, cos_win, sin_win)  # keys are stored at their true positions
    n_kv, hd = attn.n_kv_heads, attn.head_dim
    if slots is None:
        keys = torch.cat([k_cache, k_new], dim=2).view(n_kv, -1, hd)
        values = torch.cat([v_cache, v], dim=2).view(n_kv, -1, hd)
    else:
        k_cache.index_copy_(2, slots, k_new)
        v_cache.index_copy_(2, slots, v)
        keys, values = k_cache.view(n_kv, -1, hd), v_cache.view(n_kv, -1, hd)
    return attend(attn, q, keys, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size), k_new, v


def cached_forward(model: Transformer, layout: CacheLayout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches,
                   slots=None):
    """tokens: [1, P] -> logits [1, P, vocab], and each layer's (k_new, v_new); with `slots`, the new
    K/V are already written into `caches` (see cached_attention)."""
    x = model.model.embed_tokens(tokens)
    new_kv = []
    for layer, (k_cache, v_cache) in zip(model.model.layers, caches):
        h, k_new, v_new = cached_attention(
            layer.self_attn, layer.input_layernorm(x), cos_win, sin_win, cos_sink, sin_sink, mask,
            k_cache, v_cache, layout.sink_size, slots,
        )
        x = x + h
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_kv.append((k_new, v_new))
    return model.lm_head(model.model.norm(x)).float(), new_kv


def cache_shapes(model: Transformer, layout: CacheLayout) -> list[tuple[int, int, int, int]]:
    """Per-layer cache shape [1, n_kv_heads, physical_len, head_dim] (layers may differ)."""
    return [(1, spec.n_kv_heads, layout.physical_len, model.config.head_dim) for spec in model.config.layers]


class SinkCacheProgram(nn.Module):
    """Cache held in buffers and updated in place: forward(*StepInputs) -> logits [1, P, vocab].

    write_first: the single-token decode form, whose new K/V go into the cache before attention and
    whose mask covers the cache alone ([1, L]; see decode_mask): no step copies the cache."""

    def __init__(self, model: Transformer, layout: CacheLayout, write_first: bool = False):
        super().__init__()
        self.model, self.layout, self.write_first = model, layout, write_first
        for i, shape in enumerate(cache_shapes(model, layout)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def caches(self):
        return [(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")) for i in range(self.model.config.n_layers)]

    def reset_cache(self) -> None:
        for k, v in self.caches():
            k.zero_()
            v.zero_()

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots):
        caches = self.caches()
        if self.write_first:
            return cached_forward(self.model, self.layout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches, slots)[0]
        logits, new_kv = cached_forward(self.model, self.layout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches)
        for (k_cache, v_cache), (k_new, v_new) in zip(caches, new_kv):
            k_cache.index_copy_(2, slots, k_new)
            v_cache.index_copy_(2, slots, v_new)
        return logits


class SinkCacheStateless(nn.Module):
    """Cache in, new slots out: forward(tokens, ..., mask, past) -> (logits, k_new_0, v_new_0, ...)."""

    def __init__(self, model: Transformer, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, past: list[torch.Tensor]):
        caches = list(zip(past[0::2], past[1::2]))
        logits, new_kv = cached_forward(self.model, self.layout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches)
        return (logits, *[t for kv in new_kv for t in kv])
