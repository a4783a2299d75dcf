"""The integer-only decoder step over the sink-window KV cache: its parameters and its computation.

What flows where (every tensor is an integer; scales are constants folded into multipliers):
  token ids -> int8 embedding row (tied: the LM head's column) x per-row multiplier -> residual
             stream, int32 at one scale
  per layer: RMSNorm (integer) -> int8 per token -> q|k|v = int8 x int8 -> int32, requantized
             (w4a8-int: int4 weight groups, one int32 per group, weighted by its Q15 scale share)
             RoPE on q and k (Q14 tables from the host); K and V cached as int16 at calibrated scales
             scores: q as int8 per (head, token) x int16 keys -> int32 -> Q16; integer softmax -> Q15
             probabilities x int16 values (int32 matmul, exact: the probabilities sum to 2^15)
             int8 per token -> o_proj -> residual scale, saturating add
             RMSNorm -> int8 per token -> gate|up -> int32; integer SiLU(gate) x up -> int8 per
             token -> down_proj -> residual scale, saturating add
  final RMSNorm -> int8 per token -> LM head -> int32 logits at `logits_scale`
No operation runs in floating point; the host converts its RoPE tables to Q14 and reads logits as
int32 x logits_scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..sink_cache import StepInputs
from . import arith as A

# what the report says ran in integers; nothing inside the program runs in floating point
INTEGER_OPS = ["embedding lookup (int8 rows, per-row multiplier)", "RMSNorm (integer square root)",
               "linears: int8 x int8 (or int4 groups) -> int32, per-channel fixed-point requantization", "per-token int8 activation quantization",
               "RoPE (Q14 tables)", "attention scores (int8 q x int16 k -> int32)", "softmax (polynomial exp, Q15)",
               "probabilities x values (int32)", "SiLU (polynomial exp, integer division)", "SwiGLU product",
               "residual additions (saturating int32)", "LM head (int32 logits)"]
FLOAT_OPS: list[str] = []  # the host still works in float: RoPE angles -> Q14 tables, int32 logits x logits_scale
SCORE_FRAC_BITS = 16  # attention scores (already divided by sqrt(head_dim)) in Q16
SILU_FRAC_BITS = 24  # SiLU's exp() input in Q24
GROUP_FRAC_BITS = 15  # an int4 group's scale relative to its row's largest, in Q15
INT4_QMAX = 7  # symmetric int4 weight codes in [-7, 7]


@dataclass
class IntLinear:
    """x @ weight with int8 x (one scale per token) and int8 weight [in, out] (one scale per output
    channel): int32 accumulators requantized by (m0, shift) = s_in s_w[o] / (127 s_out).

    Group-wise int4 weights (w4a8-int) keep one scale per group of `group_size` inputs: the weight is
    [n_groups, group_size, out] (codes in [-7, 7]), each group's int32 accumulator is weighted by
    its integer share of the row's largest group scale, group_factor = round(2^GROUP_FRAC_BITS
    s[g, o] / max_g s[g, o]), summed in int64 and rounded down by group_shift bits into int32's
    range; s_w[o] in the multipliers is then max_g s[g, o] 2^(group_shift - GROUP_FRAC_BITS)."""

    weight: np.ndarray  # int8 [in, out], or [n_groups, group_size, out] with int4 codes
    m0: np.ndarray  # int32 [out]
    shift: np.ndarray  # int32 [out]
    pre_shift: int  # accumulators are < 2^(31 - pre_shift) for every int8 input
    bias: np.ndarray | None = None  # int32 [out] at the output scale
    group_factor: np.ndarray | None = None  # int32 [n_groups, 1, out], in [0, 2^GROUP_FRAC_BITS]
    group_shift: int = 0

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1]


@dataclass
class Multiplier:
    """One fixed-point multiplier M = (m0 / 2^31) 2^-shift, stored as int32 constants."""

    m0: int
    shift: int


@dataclass
class IntLayer:
    n_heads: int
    n_kv_heads: int
    input_norm: np.ndarray  # int32 [dim]: round(gamma 2^30 / max|gamma|)
    qkv: IntLinear  # outputs q | k | v, each at its own scale
    k_cache: Multiplier  # rotated k scale -> the int16 key cache's scale
    v_cache: Multiplier  # v scale -> the int16 value cache's scale
    score: Multiplier  # s_q s_kc / (127 sqrt(head_dim)) 2^SCORE_FRAC_BITS
    score_pre_shift: int
    o: IntLinear  # -> residual scale
    post_norm: np.ndarray
    gate_up: IntLinear  # outputs gate | up
    silu_in: Multiplier  # gate scale -> Q(SILU_FRAC_BITS)
    product_shift: int  # silu(gate) * up (scale s_g s_u) >> product_shift = the down input (int32)
    down: IntLinear  # -> residual scale


@dataclass
class IntegerModel:
    dim: int
    head_dim: int
    vocab_size: int
    embed: np.ndarray | None  # int8 [vocab, dim], one scale per row; None: the LM head's [dim, vocab] table (tied)
    embed_m0: np.ndarray  # int32 [vocab]: row scale / residual scale
    embed_shift: np.ndarray  # int32 [vocab]
    layers: list[IntLayer]
    final_norm: np.ndarray  # int32 [dim]
    head: IntLinear  # -> logits at logits_scale
    eps_table: np.ndarray  # int64 [NORM_SHIFTS]: every norm reads the residual stream, one scale
    logits_scale: float
    scales: dict = field(default_factory=dict)  # the float scales behind the multipliers, for the record

    def linears(self) -> dict[str, IntLinear]:
        named = {f"layers.{i}.{site}": getattr(lay, site) for i, lay in enumerate(self.layers) for site in ("qkv", "o", "gate_up", "down")}
        return {**named, "lm_head": self.head}

    def int8_weights_only(self) -> bool:
        """W8A8 (every linear int8 per output channel) as opposed to W4A8 (int4 groups)."""
        return all(lin.group_factor is None for lin in self.linears().values())

    def describe_weights(self) -> str:
        """What the manifest says of the weights, e.g. 'int4 groups of 64 in 120 matmuls, int8 per output channel in 1'."""
        kinds: dict[str, int] = {}
        for lin in self.linears().values():
            kind = "int8 per output channel" if lin.group_factor is None else f"int4 groups of {lin.weight.shape[1]}"
            kinds[kind] = kinds.get(kind, 0) + 1
        text = ", ".join(f"{k} in {n} matmul{'s' * (n != 1)}" for k, n in sorted(kinds.items()))
        return f"{text}; embedding int8 per row{' (the LM head table, shared)' if self.embed is None else ''}"


def integer_inputs(step: StepInputs) -> tuple[np.ndarray, ...]:
    """The host's step inputs as the integer program takes them: token ids, Q14 RoPE tables (int32)
    and the visibility of each (query, key) pair (bool) instead of an additive float mask."""
    q14 = lambda t: np.rint(t.astype(np.float64) * (1 << A.ROPE_FRAC_BITS)).astype(np.int32)  # noqa: E731
    return (step.tokens, q14(step.cos_win), q14(step.sin_win), q14(step.cos_sink), q14(step.sin_sink), step.mask == 0)


def _const(ops, array, name: str):
    """A stored constant (int8/int32 as the issue's "scales as int32 constants"), widened to int64
    for arithmetic unless it is a matmul operand."""
    c = ops.const(array, name=name)
    return c if c.dtype in (np.int8, np.int64) else ops.cast(c, np.int64)


def _multiplier(ops, m: Multiplier, name: str):
    return (_const(ops, np.int32(m.m0), f"{name}.m0"), _const(ops, np.int32(m.shift), f"{name}.shift"))


def _grouped_accumulators(ops, lin: IntLinear, codes, name: str):
    """int8 codes [P, in] x int4 group weights -> int64 [P, out], below 2^(31 - pre_shift): one
    MatMulInteger batched over the groups, then each group's int32 weighted by its Q15 share."""
    n_groups, group_size, out = lin.weight.shape
    x = ops.transpose(ops.reshape(codes, (-1, n_groups, group_size)), (1, 0, 2))  # [G, P, gs]
    acc = ops.matmul_integer(x, ops.const(lin.weight, name=f"{name}.weight", bits=4))  # [G, P, out] int32
    weighted = ops.mul(ops.cast(acc, np.int64), _const(ops, lin.group_factor, f"{name}.group_factor"))
    return A.rdpot(ops, ops.reshape(ops.reduce_sum(weighted, 0), (-1, out)), lin.group_shift)


def linear(ops, lin: IntLinear, codes, amax, name: str):
    """int8 codes [P, in] with per-token amax [P, 1] -> int64 values at the linear's output scales."""
    if lin.group_factor is None:
        acc = ops.matmul_integer(codes, ops.const(lin.weight, name=f"{name}.weight"))
    else:
        acc = _grouped_accumulators(ops, lin, codes, name)
    y = A.requantize_per_token(ops, acc, amax, _const(ops, lin.m0, f"{name}.m0"), _const(ops, lin.shift, f"{name}.shift"),
                               lin.pre_shift)
    return y if lin.bias is None else ops.add(y, _const(ops, lin.bias, f"{name}.bias"))


def _heads(ops, x, n: int, head_dim: int):
    """[P, n * head_dim] -> [n, P, head_dim]."""
    return ops.transpose(ops.reshape(x, (-1, n, head_dim)), (1, 0, 2))


def attention(ops, lay: IntLayer, x, rope_tables, visible, past_k, past_v, sink_size: int, head_dim: int,
              eps_table, name: str):
    """One attention sublayer. x: residual [P, dim]; past_k/past_v: int16 [1, n_kv, L, head_dim];
    visible: bool [P, L + P]. Returns (its output at the residual scale, k_new, v_new int16 [n_kv, P, hd])."""
    cos_win, sin_win, cos_sink, sin_sink = rope_tables
    h, kv, hd = lay.n_heads, lay.n_kv_heads, head_dim
    codes, amax = A.quantize_per_token(ops, A.rmsnorm(ops, x, _const(ops, lay.input_norm, f"{name}.input_norm"), eps_table))
    qkv = linear(ops, lay.qkv, codes, amax, f"{name}.qkv")
    q = _heads(ops, ops.slice(qkv, 0, h * hd, -1), h, hd)  # [h, P, hd]
    k = A.rope(ops, _heads(ops, ops.slice(qkv, h * hd, (h + kv) * hd, -1), kv, hd), cos_win, sin_win, hd)
    v = _heads(ops, ops.slice(qkv, (h + kv) * hd, (h + 2 * kv) * hd, -1), kv, hd)
    k_new = A.saturate(ops, A.mbqm(ops, k, *_multiplier(ops, lay.k_cache, f"{name}.k_cache")), np.int16)
    v_new = A.saturate(ops, A.mbqm(ops, v, *_multiplier(ops, lay.v_cache, f"{name}.v_cache")), np.int16)
    keys = ops.cast(ops.concat([ops.reshape(past_k, (kv, -1, hd)), k_new], 1), np.int32)  # [kv, L + P, hd]
    values = ops.cast(ops.concat([ops.reshape(past_v, (kv, -1, hd)), v_new], 1), np.int32)

    # the query rotated at its in-cache position scores the sinks, at its true position the window
    score_m0, score_shift = _multiplier(ops, lay.score, f"{name}.score")
    scores = []
    for cos, sin, first, last in ((cos_sink, sin_sink, 0, sink_size), (cos_win, sin_win, sink_size, None)):
        if first == last:
            continue
        q8, q_amax = A.quantize_per_token(ops, A.rope(ops, q, cos, sin, hd))  # [h, P, hd], [h, P, 1]
        q8 = ops.cast(ops.reshape(q8, (kv, -1, hd)), np.int32)  # each KV head's query group as rows
        keys_t = ops.transpose(ops.slice(keys, first, last if last is not None else 1 << 62, 1), (0, 2, 1))
        acc = ops.matmul(q8, keys_t)  # [kv, group * P, n_keys]
        scores.append(A.requantize_per_token(ops, acc, ops.reshape(q_amax, (kv, -1, 1)), score_m0, score_shift,
                                             lay.score_pre_shift))
    group_visible = ops.concat([visible] * (h // kv), 0)  # [group * P, L + P]
    probs = A.softmax(ops, ops.concat(scores, -1), group_visible, SCORE_FRAC_BITS)  # Q15
    out = ops.matmul(ops.cast(probs, np.int32), values)  # [kv, group * P, hd], |out| < 2^31
    out = ops.reshape(ops.transpose(ops.reshape(out, (h, -1, hd)), (1, 0, 2)), (-1, h * hd))
    codes, amax = A.quantize_per_token(ops, ops.cast(out, np.int64))
    return linear(ops, lay.o, codes, amax, f"{name}.o_proj"), k_new, v_new


def mlp(ops, lay: IntLayer, x, hidden_dim: int, eps_table, name: str):
    codes, amax = A.quantize_per_token(ops, A.rmsnorm(ops, x, _const(ops, lay.post_norm, f"{name}.post_norm"), eps_table))
    gate_up = linear(ops, lay.gate_up, codes, amax, f"{name}.gate_up")
    gate = ops.slice(gate_up, 0, hidden_dim, -1)
    up = ops.slice(gate_up, hidden_dim, 2 * hidden_dim, -1)
    act = A.silu(ops, gate, *_multiplier(ops, lay.silu_in, f"{name}.silu_in"), SILU_FRAC_BITS)
    product = ops.clip(A.rdpot(ops, ops.mul(act, up), lay.product_shift), A.INT32_MIN, A.INT32_MAX)
    codes, amax = A.quantize_per_token(ops, product)
    return linear(ops, lay.down, codes, amax, f"{name}.down_proj")


def decoder_step(ops, m: IntegerModel, sink_size: int, tokens, cos_win, sin_win, cos_sink, sin_sink, visible, past):
    """tokens [1, P] int64; RoPE tables int32 [P, hd] (Q14); visible bool [P, L + P]; past: per layer
    (k, v) int16 [1, n_kv, L, hd]. Returns logits int32 [1, P, vocab] and per layer (k_new, v_new)
    int16 [1, n_kv, P, hd] for the host to write into the cache's slots."""
    hd = m.head_dim
    rope_tables = [ops.cast(t, np.int64) for t in (cos_win, sin_win, cos_sink, sin_sink)]
    eps_table = ops.const(m.eps_table, name="rmsnorm.eps_table")
    ids = ops.reshape(tokens, (-1,))
    if m.embed is None:  # tied: column `id` of the head's int8 [dim, vocab] weight is the token's row
        rows = ops.transpose(ops.gather(ops.const(m.head.weight, name="lm_head.weight"), ids, axis=1), (1, 0))
    else:
        rows = ops.gather(ops.const(m.embed, name="embed_tokens.weight"), ids)
    rows = ops.cast(rows, np.int64)  # [P, dim]
    row_m0 = ops.reshape(ops.gather(_const(ops, m.embed_m0, "embed_tokens.m0"), ids), (-1, 1))
    row_shift = ops.reshape(ops.gather(_const(ops, m.embed_shift, "embed_tokens.shift"), ids), (-1, 1))
    x = A.mbqm(ops, rows, row_m0, row_shift)
    new_kv = []
    for i, (lay, (past_k, past_v)) in enumerate(zip(m.layers, past)):
        name = f"layers.{i}"
        out, k_new, v_new = attention(ops, lay, x, rope_tables, visible, past_k, past_v, sink_size, hd, eps_table, name)
        x = A.add_saturating(ops, x, out)
        x = A.add_saturating(ops, x, mlp(ops, lay, x, lay.gate_up.out_features // 2, eps_table, name))
        new_kv.append(tuple(ops.reshape(t, (1, lay.n_kv_heads, -1, hd)) for t in (k_new, v_new)))
    codes, amax = A.quantize_per_token(ops, A.rmsnorm(ops, x, _const(ops, m.final_norm, "norm"), eps_table))
    logits = A.saturate(ops, linear(ops, m.head, codes, amax, "lm_head"), np.int32)
    return ops.reshape(logits, (1, -1, m.vocab_size)), new_kv


def dequantize_logits(logits: np.ndarray, scale: float) -> np.ndarray:
    """int32 logits -> float32, the one conversion every consumer of an integer program uses."""
    return logits.astype(np.float32) * np.float32(scale)
