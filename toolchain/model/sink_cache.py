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

from .rope import apply_rope, rotate_half
from .transformer import Attention, Transformer


def attend(attn: Attention, q, keys_t, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size: int):
    """q: un-rotated [1, n_heads, P, hd]; keys_t (rotated at their true positions, transposed):
    [n_kv_heads, hd, n_keys]; values: [n_kv_heads, n_keys, hd]; mask: [P, n_keys].
    Returns the output projection [1, P, dim]."""
    q_rot = rotate_half(q)  # shared by both rotations of the query
    q_win = q * cos_win + q_rot * sin_win
    q_sink = q * cos_sink + q_rot * sin_sink
    n_kv, hd, p = attn.n_kv_heads, attn.head_dim, q.shape[2]
    group = attn.n_heads // attn.n_kv_heads
    # 3-D batched matmuls over the KV heads (batch 1 dropped), each KV head's query group folded
    # into the rows, so the cache is never expanded: q: [1, n_heads, P, hd] -> [n_kv, group * P, hd]
    q_win = q_win.reshape(n_kv, group * p, hd)
    q_sink = q_sink.reshape(n_kv, group * p, hd)
    n_keys = keys_t.shape[2]
    scale = 1.0 / math.sqrt(hd)
    scores = torch.bmm(q_win, keys_t)  # [n_kv, group * P, n_keys]; the sink slots are then rescored
    if sink_size:  # slicing the small score matrix, never the keys: nothing of the cache is copied
        scores = torch.cat([torch.bmm(q_sink, keys_t[:, :, :sink_size]), scores[:, :, sink_size:]], dim=-1)
    scores = scores.view(n_kv, group, p, n_keys) * scale + mask
    probs = torch.softmax(scores, dim=-1).view(n_kv, group * p, n_keys)
    out = torch.bmm(probs, values).view(attn.n_heads, p, hd).transpose(0, 1).reshape(1, p, attn.n_heads * hd)
    return attn.o_proj(out)


def cached_attention(
    attn: Attention, x, cos_win, sin_win, cos_sink, sin_sink, mask, k_cache, v_cache, sink_size: int, slots=None,
    keys_transposed: bool = False,
):
    """x: [1, P, dim]; v_cache: [1, n_kv_heads, L, hd] (L = physical cache length); k_cache the same,
    or [1, n_kv_heads, hd, L] with keys_transposed (a program's own buffers: attention then reads
    them as they lie). Returns (output [1, P, dim], k_new, v_new [1, n_kv_heads, P, hd]).

    Without `slots` the new K/V are appended after the cache for this step (mask: [P, L + P]) and the
    caller writes them afterwards, which a chunk needs (its later tokens evict slots its earlier ones
    still see). With `slots` (a single decode token) they are written into the cache first and
    attention reads the cache alone (mask: [P, L], the new token's slot visible): no copy of the cache.
    """
    q, k, v = attn.project_qkv(x)
    k_new = apply_rope(k, cos_win, sin_win)  # keys are stored at their true positions
    n_kv, hd = attn.n_kv_heads, attn.head_dim
    k_in, key_dim = (k_new.transpose(2, 3), 3) if keys_transposed else (k_new, 2)
    if slots is None:
        keys = torch.cat([k_cache, k_in], dim=key_dim)
        values = torch.cat([v_cache, v], dim=2).view(n_kv, -1, hd)
    else:
        k_cache.index_copy_(key_dim, slots, k_in)
        v_cache.index_copy_(2, slots, v)
        keys, values = k_cache, v_cache.view(n_kv, -1, hd)
    keys_t = keys.view(n_kv, hd, -1) if keys_transposed else keys.view(n_kv, -1, hd).transpose(1, 2)
    return attend(attn, q, keys_t, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size), k_new, v


def cached_forward(model: Transformer, layout: CacheLayout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches,
                   slots=None, keys_transposed: bool = False):
    """tokens: [1, P] -> logits [1, P, vocab], and each layer's (k_new, v_new); with `slots`, the new
    K/V are already written into `caches` (see cached_attention)."""
    x = model.model.embed_tokens(tokens)
    new_kv = []
    for layer, (k_cache, v_cache) in zip(model.model.layers, caches):
        h, k_new, v_new = cached_attention(
            layer.self_attn, layer.input_layernorm(x), cos_win, sin_win, cos_sink, sin_sink, mask,
            k_cache, v_cache, layout.sink_size, slots, keys_transposed,
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

    Keys are held transposed ([1, n_kv_heads, hd, L]), the layout q @ K reads without a copy.
    write_first: the single-token decode form, whose new K/V go into the cache before attention and
    whose mask covers the cache alone ([1, L]; see decode_mask): no step copies the cache."""

    def __init__(self, model: Transformer, layout: CacheLayout, write_first: bool = False):
        super().__init__()
        self.model, self.layout, self.write_first = model, layout, write_first
        for i, (b, n_kv, length, hd) in enumerate(cache_shapes(model, layout)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(b, n_kv, hd, length), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(b, n_kv, length, hd), persistent=False)

    def caches(self):
        return [(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")) for i in range(self.model.config.n_layers)]

    def reset_cache(self) -> None:
        for k, v in self.caches():
            k.zero_()
            v.zero_()

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots):
        caches = self.caches()
        step = (self.model, self.layout, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, caches)
        if self.write_first:
            return cached_forward(*step, slots, keys_transposed=True)[0]
        logits, new_kv = cached_forward(*step, keys_transposed=True)
        for (k_cache, v_cache), (k_new, v_new) in zip(caches, new_kv):
            k_cache.index_copy_(3, slots, k_new.transpose(2, 3))
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
