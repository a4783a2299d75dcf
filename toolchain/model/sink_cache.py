"""pocketlm's Transformer running over the sink-window KV cache (semantics: pocketlm.runtime.sink_cache).

One step takes P token positions plus the host's RoPE tables, mask and slots; `attend` is the
attention every masked step shares (the query rotated twice: at its true position for the window, at
its in-cache position for the sinks). Two wrappers:
- SinkCacheProgram keeps the cache in buffers updated in place (the ExecuTorch program and the
  eager PyTorch reference); its decode form reads only the filled cache rows through ExecuTorch's
  fused attention (each KV head's query group as one block of rows), with the sinks re-rotated
  instead of a second query rotation, and its causal form serves prompt chunks while the cache
  still fills in order through the same kernel;
- SinkCacheShared takes the cache as inputs and returns it with the step's rows written, through
  one fused attention per layer over a buffer the host binds as both (the ONNX program).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pocketlm.runtime.sink_cache import CacheLayout

from .grouped_attention import grouped_query_attention
from .rope import apply_rope, rotate_half
from .transformer import Attention, Transformer


def _rotated_queries(attn: Attention, q, cos_win, sin_win, cos_sink, sin_sink):
    """q: un-rotated [1, n_heads, P, hd] -> (q_win, q_sink), each [n_kv_heads, group * P, hd]: the
    query rotated at its true position (for the window) and at its in-cache position (for the
    sinks), each KV head's query group folded into the rows, so the cache is never expanded."""
    q_rot = rotate_half(q)  # shared by both rotations of the query
    q_win = q * cos_win + q_rot * sin_win
    q_sink = q * cos_sink + q_rot * sin_sink
    rows = (attn.n_heads // attn.n_kv_heads) * q.shape[2]
    return q_win.reshape(attn.n_kv_heads, rows, attn.head_dim), q_sink.reshape(attn.n_kv_heads, rows, attn.head_dim)


def _masked_softmax(attn: Attention, scores, mask):
    """scores [n_kv, group * P, n_keys] -> probabilities, scaled by 1/sqrt(hd) and masked by [P, n_keys]."""
    n_kv, rows, n_keys = scores.shape
    group = attn.n_heads // n_kv
    scores = scores.view(n_kv, group, rows // group, n_keys) * (1.0 / math.sqrt(attn.head_dim)) + mask
    return torch.softmax(scores, dim=-1).view(n_kv, rows, n_keys)


def _heads_out(attn: Attention, out):
    """[n_kv, group * P, hd] -> the output projection [1, P, dim]."""
    p = out.shape[1] // (attn.n_heads // attn.n_kv_heads)
    return attn.o_proj(out.view(attn.n_heads, p, attn.head_dim).transpose(0, 1).reshape(1, p, attn.n_heads * attn.head_dim))


def attend(attn: Attention, q, keys_t, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size: int):
    """q: un-rotated [1, n_heads, P, hd]; keys_t (rotated at their true positions, transposed):
    [n_kv_heads, hd, n_keys]; values: [n_kv_heads, n_keys, hd]; mask: [P, n_keys].
    Returns the output projection [1, P, dim]."""
    q_win, q_sink = _rotated_queries(attn, q, cos_win, sin_win, cos_sink, sin_sink)
    scores = torch.bmm(q_win, keys_t)  # [n_kv, group * P, n_keys]; the sink slots are then rescored
    if sink_size:  # slicing the small score matrix, never the keys: nothing of the cache is copied
        scores = torch.cat([torch.bmm(q_sink, keys_t[:, :, :sink_size]), scores[:, :, sink_size:]], dim=-1)
    return _heads_out(attn, torch.bmm(_masked_softmax(attn, scores, mask), values))


def shared_cache_attention(attn: Attention, x, cos_cache, sin_cache, attention_bias, seqlens_k, total, k_cache, v_cache):
    """The ONNX step, one fused attention per layer (model.grouped_attention: ONNX Runtime's
    GroupQueryAttention with the past and present caches in one buffer). k_cache, v_cache
    [1, n_kv_heads, L, hd] are the host's ring, bound as both the past input and the present output:
    the step's keys and values are written at rows [T - P, T) and the queries attend to rows [0, T)
    (causal within the step, plus attention_bias [1, 1, P, T]). The kernel rotates the queries and
    keys itself, from the packed q|k|v projection, by cos_cache and sin_cache [>= T, hd / 2] at
    those rows, which hold the step's true positions: the query is rotated once, and the host keeps
    the sink rows re-rotated for it once the ring has wrapped (runtime.backends.onnx). Between the
    projection and the kernel there is no node at all. Returns (output [1, P, dim], present key,
    present value)."""
    out, k_cache, v_cache = grouped_query_attention(attn.project_qkv_packed(x), k_cache, v_cache, attention_bias, seqlens_k,
                                                    total, cos_cache, sin_cache, attn.n_heads, attn.n_kv_heads)
    return attn.o_proj(out), k_cache, v_cache


def chunk_attention(attn: Attention, x, cos_win, sin_win, cos_sink, sin_sink, mask, k_cache, v_cache, sink_keys,
                    sink_size: int):
    """A step of P positions over a program's own buffers, k_cache and v_cache [1, L, n_kv_heads, hd]
    and sink_keys [1, S + 1, n_kv_heads, hd] (the sinks as stored, rotated at their true positions;
    row S is a trash row). The chunk's K/V are appended for the step (mask: [P, L + P]); the caller
    writes them into their slots after the whole step, since a chunk's later tokens evict slots its
    earlier ones still see. Attention reads the sinks from sink_keys: decode (decode_attention)
    keeps k_cache's sink rows re-rotated for its own query. Returns (output [1, P, dim], k_new,
    v_new [1, P, n_kv_heads, hd])."""
    n_kv, hd = attn.n_kv_heads, attn.head_dim
    q, k, v = attn.project_qkv(x)
    k_new = apply_rope(k, cos_win, sin_win).transpose(1, 2)  # [1, P, n_kv, hd], at their true positions
    v_new = v.transpose(1, 2)
    keys = torch.cat([sink_keys[:, :sink_size], k_cache[:, sink_size:], k_new], dim=1)  # [1, L + P, n_kv, hd]
    keys_t = keys.permute(0, 2, 3, 1).reshape(n_kv, hd, -1)  # [n_kv, hd, L + P]
    values = torch.cat([v_cache, v_new], dim=1).permute(0, 2, 1, 3).reshape(n_kv, -1, hd)  # [n_kv, L + P, hd]
    out = attend(attn, q, keys_t, values, cos_win, sin_win, cos_sink, sin_sink, mask, sink_size)
    return out, k_new, v_new


def load_fused_attention() -> None:
    """Register llama::custom_sdpa, ExecuTorch's fused attention (its eager kernel too)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def decode_attention(attn: Attention, x, cos_win, sin_win, cos_d, sin_d, k_cache, v_cache, sink_keys, sink_and_slot,
                     slots, start_pos, sink_size: int):
    """One token at a position past the sinks, through ExecuTorch's fused attention (llama::custom_sdpa),
    which reads only the cache's first start_pos + 1 rows: the slots fill in order, and once full
    every slot is visible, so those rows are exactly what the token sees (runtime.sink_cache
    .decode_key_count). One query rotation (its true position) suits the window; the S sink keys are
    re-rotated from sink_keys by d = true - in-cache position (cos_d, sin_d) into k_cache's sink rows,
    written with the token's own K in one index_copy (sink_and_slot = [0..S-1, slot])."""
    n_kv, hd = attn.n_kv_heads, attn.head_dim
    q, k, v = attn.project_qkv(x)
    q = apply_rope(q, cos_win, sin_win).transpose(1, 2)  # [1, 1, n_heads, hd]
    k_new = apply_rope(k, cos_win, sin_win).transpose(1, 2)  # [1, 1, n_kv, hd]
    sinks = sink_keys[:, :sink_size]
    rotated = sinks * cos_d + rotate_half(sinks) * sin_d
    k_cache.index_copy_(1, sink_and_slot, torch.cat([rotated, k_new], dim=1))
    v_cache.index_copy_(1, slots, v.transpose(1, 2))
    # each KV head's query group rides in the query's sequence dimension, [1, group, n_kv, hd]: the
    # kernel then reads a KV head's rows once for its whole group (one gemm, not `group` gemvs). With
    # no causal mask every row sees the first start_pos + group keys, so start_pos moves back by group.
    group = attn.n_heads // n_kv
    q = q.reshape(1, n_kv, group, hd).transpose(1, 2)
    out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos + 1 - group, None, 0.0, False, None)
    return attn.o_proj(out.transpose(1, 2).reshape(1, 1, attn.n_heads * hd))


def causal_attention(attn: Attention, x, cos, sin, k_cache, v_cache, sink_keys, slots, sink_rows, start_pos):
    """A chunk while the cache still fills in order (start_pos + P <= cache_len): every token sits at
    its true position, sinks included, so plain causal attention over cache rows 0..start_pos + i is
    exactly the masked step's answer. The chunk's K/V go into their slots first (padding into the
    trash slot, past every row a real query reads), then llama::custom_sdpa reads the filled rows
    only, with the model's own GQA (no expanded cache, no copies of it). k_cache's sink rows are as
    stored: decode re-rotates them by d = true - in-cache position, which is 0 until the ring wraps."""
    n_heads, hd, p = attn.n_heads, attn.head_dim, x.shape[1]
    q, k, v = attn.project_qkv(x)
    q = apply_rope(q, cos, sin).transpose(1, 2)  # [1, P, n_heads, hd]
    k_new = apply_rope(k, cos, sin).transpose(1, 2)  # [1, P, n_kv, hd], at their true positions
    sink_keys.index_copy_(1, sink_rows, k_new)
    k_cache.index_copy_(1, slots, k_new)
    v_cache.index_copy_(1, slots, v.transpose(1, 2))
    out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos, None, 0.0, True, None)
    return attn.o_proj(out.reshape(1, p, n_heads * hd))


def _layers_forward(model: Transformer, tokens, attention, rows=None) -> torch.Tensor:
    """Embedding, then per layer x += attention(i, layer, norm(x)) and the MLP, then the head (on the
    given rows of the sequence only, when given)."""
    x = model.model.embed_tokens(tokens)
    for i, layer in enumerate(model.model.layers):
        x = x + attention(i, layer.self_attn, layer.input_layernorm(x))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if rows is not None:
        x = x.index_select(1, rows)
    return model.lm_head(model.model.norm(x)).float()


def cache_shapes(model: Transformer, layout: CacheLayout) -> list[tuple[int, int, int, int]]:
    """Per-layer cache shape [1, n_kv_heads, physical_len, head_dim] (layers may differ)."""
    return [(1, spec.n_kv_heads, layout.physical_len, model.config.head_dim) for spec in model.config.layers]


class SinkCacheProgram(nn.Module):
    """Cache held in buffers and updated in place (the ExecuTorch program and the eager reference):
    k_cache_i, v_cache_i [1, L, n_kv_heads, hd] (the layout llama::custom_sdpa reads) and
    sink_keys_i [1, S + 1, n_kv_heads, hd].

    forward(tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots) -> logits [1, P, vocab] is a
    step of any P (chunk_attention). decode(tokens, cos_win, sin_win, cos_sink, sin_sink, slots,
    n_keys) is the single-token form for positions >= S (decode_attention): no mask, and attention
    reads n_keys cache rows, not the whole cache, for positions from decode_from() on.
    causal(tokens, cos, sin, slots, start, last) is a chunk at positions start.. while the cache still
    fills in order (causal_attention), returning only row `last`'s logits [1, 1, vocab]: what a
    prompt needs, without the masked step's whole-cache attention or P rows of the LM head."""

    def __init__(self, model: Transformer, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout
        s = layout.sink_size
        for i, (b, n_kv, length, hd) in enumerate(cache_shapes(model, layout)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(b, length, n_kv, hd), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(b, length, n_kv, hd), persistent=False)
            self.register_buffer(f"sink_keys_{i}", torch.zeros(b, s + 1, n_kv, hd), persistent=False)

    def buffers_of(self, i: int):
        return getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}"), getattr(self, f"sink_keys_{i}")

    def reset_cache(self) -> None:
        for i in range(self.model.config.n_layers):
            for buf in self.buffers_of(i):
                buf.zero_()

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots):
        rope, new_kv = (cos_win, sin_win, cos_sink, sin_sink), []

        def attention(i, attn, x):
            out, k_new, v_new = chunk_attention(attn, x, *rope, mask, *self.buffers_of(i), self.layout.sink_size)
            new_kv.append((k_new, v_new))
            return out

        logits = _layers_forward(self.model, tokens, attention)
        sink_rows = torch.clamp(slots, max=self.layout.sink_size)  # non-sink positions land in the trash row
        for i, (k_new, v_new) in enumerate(new_kv):  # after the whole step: see chunk_attention
            k_cache, v_cache, sink_keys = self.buffers_of(i)
            k_cache.index_copy_(1, slots, k_new)
            v_cache.index_copy_(1, slots, v_new)
            sink_keys.index_copy_(1, sink_rows, k_new)
        return logits

    def causal(self, tokens, cos, sin, slots, start, last):
        load_fused_attention()
        s, p = self.layout.sink_size, tokens.shape[1]
        start_pos = start[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + p <= self.layout.cache_len)
        sink_rows = torch.clamp(slots, max=s)  # non-sink positions land in sink_keys' trash row
        return _layers_forward(self.model, tokens, lambda i, attn, x: causal_attention(
            attn, x, cos, sin, *self.buffers_of(i), slots, sink_rows, start_pos), rows=last)

    def decode_from(self) -> int:
        """The first position decode serves: past the sinks (earlier tokens write them, which prefill
        does), and far enough in that every layer's query group fits before it (decode_attention)."""
        groups = [spec.n_heads // spec.n_kv_heads for spec in self.model.config.layers]
        return max(self.layout.sink_size, max(groups) - 1)

    def decode(self, tokens, cos_win, sin_win, cos_sink, sin_sink, slots, n_keys):
        load_fused_attention()
        s = self.layout.sink_size
        start_pos = n_keys[0].item() - 1
        torch._check(start_pos >= self.decode_from())
        torch._check(start_pos < self.layout.cache_len)
        # the sinks' rotation by d = p - c from the query's two tables: cos(a - b), sin(a - b)
        cos_d = cos_win * cos_sink + sin_win * sin_sink
        sin_d = sin_win * cos_sink - cos_win * sin_sink
        sink_and_slot = torch.cat([torch.arange(s), slots])
        return _layers_forward(self.model, tokens, lambda i, attn, x: decode_attention(
            attn, x, cos_win, sin_win, cos_d, sin_d, *self.buffers_of(i), sink_and_slot, slots, start_pos, s))


class ProgramMethod(nn.Module):
    """One method of a SinkCacheProgram ("forward", "causal" or "decode") as a module to export. All
    methods reach the buffers under the same names (program.k_cache_0, ...), so the exported program
    shares one cache between them."""

    def __init__(self, program: SinkCacheProgram, method: str):
        super().__init__()
        if method in ("decode", "causal"):
            load_fused_attention()
        self.program, self.method = program, method

    def forward(self, *inputs):
        return getattr(self.program, self.method)(*inputs)


class SinkCacheShared(nn.Module):
    """The ONNX program: forward(tokens, cos_cache, sin_cache, attention_bias, seqlens_k,
    total_sequence_length, past) -> (logits, present_0_key, present_0_value, ...), each present the
    past's buffer with the step's rows written (shared_cache_attention)."""

    def __init__(self, model: Transformer, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, tokens, cos_cache, sin_cache, attention_bias, seqlens_k, total, past: list[torch.Tensor]):
        present = []

        def attention(i, attn, x):
            out, k_cache, v_cache = shared_cache_attention(attn, x, cos_cache, sin_cache, attention_bias, seqlens_k, total,
                                                           past[2 * i], past[2 * i + 1])
            present.extend((k_cache, v_cache))
            return out

        logits = _layers_forward(self.model, tokens, attention)
        return (logits, *present)
