"""Offline side of integer-only mode: turn a float model with int8- (or int4-) grid weights and its calibrated
activation ranges into the integers of runtime/integer/model.py (codes, fixed-point multipliers).

Scales chosen here (all float64 on the host; only the multipliers derived from them ship):
- weights: symmetric int8 per output channel, s_w = max|row| / 127, or for w4a8-int symmetric int4
  per group of inputs, s = max|group| / 7 (the grids the quantize stage put the weights on, so the
  codes are recovered exactly); a group's scale enters as a Q15 share of its row's largest;
- int32 intermediates (residual stream, q, k, v, gate, up, SwiGLU product): calibrated max x HEADROOM
  maps to 2^30, i.e. ~27 bits of resolution under the calibrated range, 8x headroom above it;
- KV cache, int16: calibrated max x CACHE_MARGIN maps to 32767 (values beyond saturate);
- RMSNorm outputs: max|gamma| sqrt(dim) / 2^30, a bound that holds for every row;
- attention scores Q16, probabilities Q15, logits Q16: fixed formats, no calibration.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.integer import arith as A
from pocketlm.runtime.integer.model import (
    GROUP_FRAC_BITS, INT4_QMAX, SCORE_FRAC_BITS, SILU_FRAC_BITS, IntegerModel, IntLayer, IntLinear, Multiplier,
)
from pocketlm.runtime.quant.fixed_point import quantize_multiplier

from ..model.transformer import Transformer
from .onnx_quant import grid_codes

HEADROOM = 8.0
CACHE_MARGIN = 1.1
LOGITS_FRAC_BITS = 16  # float32 holds every int32 logit exactly below 256, so float comparisons are exact
INT16_MAX = 32767


def int8_rows(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (int8 codes [out, in], float64 scales [out]), symmetric per row."""
    w = w.detach().to(torch.float64).numpy()
    scale = np.abs(w).max(1) / A.ACT_QMAX
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(m)) for m in np.atleast_1d(reals)]
    return np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32)


def multiplier(real: float) -> Multiplier:
    return Multiplier(*quantize_multiplier(float(real)))


def _pre_shift(in_features: int, input_max: int = A.ACT_QMAX, weight_max: int = 127) -> int:
    """Left shift that keeps every accumulator of this matmul below 2^31."""
    return 31 - (input_max * weight_max * in_features).bit_length()


def _int32_scale(calibrated_max: float) -> float:
    return max(calibrated_max, 1e-30) * HEADROOM / 2.0**30


def _norm(gamma: torch.Tensor) -> tuple[np.ndarray, float]:
    """(int32 gains, output scale) of an integer RMSNorm; see runtime/integer/arith.rmsnorm."""
    g = gamma.detach().to(torch.float64).numpy()
    gmax = float(np.abs(g).max()) or 1.0
    return np.rint(g * 2.0**30 / gmax).astype(np.int32), gmax * math.sqrt(g.size) / 2.0**30


def int4_groups(w: torch.Tensor, group_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """[out, in] float on a symmetric int4 grid of `group_size` inputs -> (codes [out, n_groups,
    group_size], float64 scales [out, n_groups]), or None when the weight is not on that grid."""
    found = grid_codes(w.detach().float().numpy(), group_size, 4)
    return None if found is None else (found[0], found[1].astype(np.float64))


def _grouped(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    """(weight [G, gs, out], group_factor [G, 1, out], group_shift, pre_shift, effective per-row scale)
    of int4 codes [out, G, gs] with scales [out, G]; see IntLinear."""
    row_max = scales.max(1)
    row_max = np.where(row_max > 0, row_max, 1.0)
    factor = np.rint(scales / row_max[:, None] * 2.0**GROUP_FRAC_BITS).astype(np.int64)
    bound = A.ACT_QMAX * INT4_QMAX * codes.shape[1] * codes.shape[2] << GROUP_FRAC_BITS  # sum_g |acc_g| f_g
    group_shift = max(0, bound.bit_length() - 31)
    pre_shift = 31 - ((bound >> group_shift) + 1).bit_length()
    weight = np.ascontiguousarray(codes.transpose(1, 2, 0))
    return weight, factor.T[:, None, :].astype(np.int32), group_shift, pre_shift, row_max * 2.0**(group_shift - GROUP_FRAC_BITS)


def _linear(weights: list[torch.Tensor], s_in: float, s_out: list[float], biases=None, group_size: int | None = None) -> IntLinear:
    """Consumers of one per-token int8 input, concatenated along their outputs, each with its own
    output scale. With group_size, weights that all lie on the int4 grid of that group size run as
    group-wise int4 (w4a8-int); any other weight is int8 per output channel."""
    groups = [int4_groups(w, group_size) for w in weights] if group_size else [None]
    int4 = all(g is not None for g in groups)
    codes, scales, outs = [], [], []
    for w, so, g in zip(weights, s_out, groups if int4 else [None] * len(weights)):
        c, s = g if int4 else int8_rows(w)
        codes.append(c)
        scales.append(s)
        outs.append(np.full(len(s), so))
    codes, s_w, s_o = np.concatenate(codes), np.concatenate(scales), np.concatenate(outs)
    factor, group_shift = None, 0
    if int4:
        weight, factor, group_shift, pre_shift, s_w = _grouped(codes, s_w)
    else:
        weight, pre_shift = np.ascontiguousarray(codes.T), _pre_shift(codes.shape[1])
    m0, shift = multipliers(s_in * s_w * 2.0**31 / (A.ACT_QMAX * s_o))  # per 2^31 of amax: see requantize_per_token
    bias = None
    if biases is not None and any(b is not None for b in biases):
        full = np.concatenate([np.zeros(len(s)) if b is None else b.detach().double().numpy() for b, s in zip(biases, scales)])
        bias = np.clip(np.rint(full / s_o), A.INT32_MIN, A.INT32_MAX).astype(np.int32)
    return IntLinear(weight, m0, shift, pre_shift, bias, factor, group_shift)


@torch.no_grad()
def build_integer_model(model: Transformer, ranges: dict, group_size: int | None = None) -> IntegerModel:
    """The integer model of `model`: weights on an int8 per-channel grid (or rounded to one here),
    or, with group_size (w4a8-int), the linears on that int4 grid as group-wise int4."""
    c = model.config
    if c.dim >= 1 << 15:
        raise PocketLMError(f"integer-only mode supports model widths below 32768, not {c.dim}")
    if len(ranges["layers"]) != c.n_layers:
        raise PocketLMError(f"activation ranges cover {len(ranges['layers'])} layers, the model has {c.n_layers}; recalibrate")
    hd = c.head_dim
    s_r = _int32_scale(ranges["residual"])
    embed, row_scale = int8_rows(model.model.embed_tokens.weight)
    embed_m0, embed_shift = multipliers(row_scale / s_r)
    layers, scales = [], {"residual": s_r, "logits": 2.0**-LOGITS_FRAC_BITS, "layers": []}
    for spec, layer, rng in zip(c.layers, model.model.layers, ranges["layers"]):
        attn, mlp = layer.self_attn, layer.mlp
        s_q, s_k, s_v = _int32_scale(rng["q"]), _int32_scale(rng["k"]), _int32_scale(rng["v"])
        s_kc, s_vc = rng["k"] * CACHE_MARGIN / INT16_MAX, rng["v"] * CACHE_MARGIN / INT16_MAX
        s_g, s_u = _int32_scale(rng["gate"]), _int32_scale(rng["up"])
        product_shift = max(0, math.floor(math.log2(_int32_scale(rng["down_in"]) / (s_g * s_u))))
        s_m = s_g * s_u * 2.0**product_shift
        in_gain, s_n1 = _norm(layer.input_layernorm.weight)
        post_gain, s_n2 = _norm(layer.post_attention_layernorm.weight)
        s_attn = s_vc * 2.0**-A.PROB_FRAC_BITS  # probabilities (Q15) x int16 values
        layers.append(IntLayer(
            n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads,
            input_norm=in_gain,
            qkv=_linear([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], s_n1, [s_q, s_k, s_v],
                        [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], group_size),
            k_cache=multiplier(s_k / s_kc), v_cache=multiplier(s_v / s_vc),
            score=multiplier(s_q * s_kc * 2.0**31 / (A.ACT_QMAX * math.sqrt(hd)) * 2.0**SCORE_FRAC_BITS),
            score_pre_shift=_pre_shift(hd, A.ACT_QMAX, INT16_MAX + 1),
            o=_linear([attn.o_proj.weight], s_attn, [s_r], group_size=group_size),
            post_norm=post_gain,
            gate_up=_linear([mlp.gate_proj.weight, mlp.up_proj.weight], s_n2, [s_g, s_u], group_size=group_size),
            silu_in=multiplier(s_g * 2.0**SILU_FRAC_BITS),
            product_shift=product_shift,
            down=_linear([mlp.down_proj.weight], s_m, [s_r], group_size=group_size),
        ))
        scales["layers"].append({"q": s_q, "k": s_k, "v": s_v, "k_cache": s_kc, "v_cache": s_vc, "gate": s_g,
                                 "up": s_u, "down_in": s_m, "input_norm": s_n1, "post_norm": s_n2})
    final_gain, s_nf = _norm(model.model.norm.weight)
    head = _linear([model.lm_head.weight], s_nf, [2.0**-LOGITS_FRAC_BITS], group_size=group_size)
    if head.group_factor is None and np.array_equal(head.weight.T, embed):
        embed = None  # tied and both int8 per row: the lookup reads the head's table (saves vocab x dim bytes)
    return IntegerModel(
        dim=c.dim, head_dim=hd, vocab_size=c.vocab_size,
        embed=embed, embed_m0=embed_m0, embed_shift=embed_shift, layers=layers,
        final_norm=final_gain, head=head,
        eps_table=A.rmsnorm_eps_table(c.norm_eps, c.dim, s_r), logits_scale=2.0**-LOGITS_FRAC_BITS, scales=scales,
    )
