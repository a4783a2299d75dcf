"""Integer arithmetic of the integer-only decoder, written once over the op vocabulary (ops.py).

Every function takes `ops` first and int64 tensors holding the values it documents; the same code
runs in numpy (the reference) and is emitted as ONNX operators (the exported graph).

- Requantization is gemmlowp's (runtime/quant/fixed_point.py, REQUANT_ROUNDING): a multiplier is a
  pair (m0, shift), m0 in [2^30, 2^31), applied by the saturating rounding doubling high multiply
  and the rounding divide by a power of two (ties away from zero).
- Activations entering a matmul are int8 with one scale per token (row), computed at run time from
  the row's largest magnitude: q = round(127 x / amax). The row's amax is normalised exactly into a
  Q31 mantissa (amax << (31 - bitlength)) so the per-token factor is applied with the same gemmlowp
  multiply as the per-channel weight scales.
- Non-linear functions are integer approximations (I-BERT, Kim et al. 2021, style): exp by range
  reduction to (-ln 2, 0], a degree-4 polynomial there and a right shift (relative error 3.6e-6);
  sigmoid and softmax from it with one integer division each; RMSNorm with an integer square root
  (Newton's method); RoPE as fixed-point products with Q14 tables.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
POW2 = np.array([1 << k for k in range(63)], dtype=np.int64)  # 2^0 .. 2^62

ACT_QMAX = 127  # int8 activations use the symmetric range [-127, 127]
ROPE_FRAC_BITS = 14  # cos/sin tables in Q14 (|value| <= 2^14 fits int16)
PROB_FRAC_BITS = 15  # softmax probabilities in Q15
EXP_FRAC_BITS = 30  # exp() results in Q30
NORM_BITS = 23  # RMSNorm rescales each row to 23-bit magnitudes: sums of squares stay below 2^61 for D < 2^15
NORM_SHIFTS = 64  # rows are rescaled by 2^-sh, sh in [-32, 31]: eps_table has one entry per shift
EPS_CAP = 1 << 61  # eps_table entries saturate here (rows so small that eps alone sets their scale)
ISQRT_STEPS = 6  # Newton steps from 2^ceil(L/2): enough for any n < 2^62 (tested against math.isqrt)
# exp(r) on [-ln 2, 0]: Chebyshev-node least-squares fit of degree 4, coefficients c0..c4 in Q30
EXP_POLY_Q30 = (1073739778, 1073592317, 535111426, 171614555, 31825890)


def pow2(ops, e):
    """2^e for an int64 tensor e in [0, 62] (a table lookup: ONNX has no signed shifts)."""
    return ops.gather(ops.const(POW2, name="pow2_table"), e)


def bitlength(ops, x):
    """Bits needed for x >= 0 (0 for 0): the count of powers of two <= x. x: [..., 1] -> [..., 1]."""
    above = ops.cast(ops.greater_equal(x, ops.const(POW2, name="pow2_table")), np.int64)  # [..., 63]
    return ops.reduce_sum(above, -1)


def rdpot(ops, x, e):
    """round(x / 2^e), ties away from zero; e a Python int or an int64 tensor in [0, 62]."""
    if isinstance(e, int):
        if e == 0:
            return x
        d, half = ops.const(np.int64(1 << e)), ops.const(np.int64(1 << (e - 1)))
    else:
        d = pow2(ops, e)
        half = ops.div(d, 2)
    return ops.div(ops.add(x, ops.mul(ops.sign(x), half)), d)


def round_div(ops, a, b):
    """round(a / b) for b > 0, ties away from zero."""
    return ops.div(ops.add(a, ops.mul(ops.sign(a), ops.div(b, 2))), b)


def srdhm(ops, a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values: round(a b / 2^31), ties up."""
    ab = ops.mul(a, b)
    nudge = ops.where(ops.greater_equal(ab, 0), ops.const(np.int64(1 << 30)), ops.const(np.int64(1 - (1 << 30))))
    high = ops.div(ops.add(ab, nudge), 1 << 31)
    overflow = ops.logical_and(ops.equal(a, INT32_MIN), ops.equal(b, INT32_MIN))
    return ops.where(overflow, INT32_MAX, high)


def mbqm(ops, x, m0, shift):
    """x (m0 / 2^31) 2^-shift for int32 values x: a negative shift (>= -31) left-shifts x first
    (saturating), a positive one (<= 62) is the rounding right shift after the high multiply."""
    left = ops.maximum(ops.neg(shift), 0)
    right = ops.maximum(shift, 0)
    shifted = ops.clip(ops.mul(x, pow2(ops, left)), INT32_MIN, INT32_MAX)
    return rdpot(ops, srdhm(ops, shifted, m0), right)


def saturate(ops, x, dtype):
    """Clamp to the integer type's range, then narrow: the only way values leave int64."""
    info = np.iinfo(dtype)
    return ops.cast(ops.clip(x, int(info.min), int(info.max)), dtype)


def add_saturating(ops, a, b):
    """Residual additions: int32 + int32 held in int64, clamped back into int32's range."""
    return ops.clip(ops.add(a, b), INT32_MIN, INT32_MAX)


def quantize_per_token(ops, x):
    """x: int32 values [..., K] -> (int8 codes round(127 x / amax), amax [..., 1] >= 1)."""
    amax = ops.maximum(ops.reduce_max(ops.abs(x), -1), 1)
    return ops.cast(round_div(ops, ops.mul(x, ACT_QMAX), amax), np.int8), amax


def requantize_per_token(ops, acc, amax, m0, shift, pre_shift: int):
    """int32 accumulators of per-token int8 inputs -> int64 values (int32 range) at the output scale.

    The real output is acc * (amax_t / 2^31) * M[o] with M[o] = (m0[o] / 2^31) 2^-shift[o] =
    s_in s_w[o] 2^31 / (127 s_out): the multiplier is stated for an input row whose amax is 2^31, so
    it stays in a normal range however small the input scale. amax_t / 2^31 = (m_t / 2^31) 2^(L_t - 31)
    exactly, with L_t its bit length and m_t in [2^30, 2^31); the accumulator is left-shifted by
    pre_shift (staying below 2^31 by construction) so the per-token multiply keeps its bits. The
    combined shift is limited to [-31, 62]: beyond 62 bits every result is 0 anyway.
    """
    length = bitlength(ops, amax)
    m_t = ops.mul(amax, pow2(ops, ops.sub(31, length)))
    scaled = srdhm(ops, ops.mul(ops.cast(acc, np.int64), 1 << pre_shift), m_t)
    return mbqm(ops, scaled, m0, ops.clip(ops.add(ops.sub(shift, length), 31 + pre_shift), -31, 62))


def isqrt(ops, n):
    """floor(sqrt(n)) for 0 <= n < 2^62, n: [..., 1]. Newton from 2^ceil(L/2) >= sqrt(n) never goes
    below isqrt(n) and ends on it or one above; the last line takes the one above back."""
    x = pow2(ops, ops.div(ops.add(bitlength(ops, n), 1), 2))
    for _ in range(ISQRT_STEPS):
        x = ops.maximum(ops.div(ops.add(x, ops.div(n, x)), 2), 1)
    return ops.sub(x, ops.cast(ops.greater(ops.mul(x, x), n), np.int64))


def rmsnorm(ops, x, gain, eps_table):
    """x * gamma / sqrt(mean(x^2) + eps) in integers; x: int32 values [..., D], D < 2^15.

    gain = round(gamma 2^30 / max|gamma|) (int64 [D]); eps_table[sh + 32] = min(round(eps D /
    (s_x 2^sh)^2), EPS_CAP). Each row is first rescaled by 2^-sh (left or right) to NORM_BITS-bit
    magnitudes, so its square root has ~26 significant bits whatever the row's size, and the sum of
    squares fits int64. Returns y with |y| <= 2^30 at scale max|gamma| sqrt(D) / 2^30: |x_c| <=
    sqrt(sum x^2) bounds every output by its gain.
    """
    shift = ops.sub(bitlength(ops, ops.reduce_max(ops.abs(x), -1)), NORM_BITS)  # [..., 1], in [-23, 8]
    xs = rdpot(ops, ops.mul(x, pow2(ops, ops.maximum(ops.neg(shift), 0))), ops.maximum(shift, 0))
    sum_sq = ops.add(ops.reduce_sum(ops.mul(xs, xs), -1), ops.gather(eps_table, ops.add(shift, NORM_SHIFTS // 2)))
    root = ops.maximum(isqrt(ops, sum_sq), 1)
    return round_div(ops, ops.mul(xs, gain), root)


def rmsnorm_eps_table(eps: float, dim: int, input_scale: float) -> np.ndarray:
    """The eps term of rmsnorm() for each row shift, in the units of the rescaled row's squares."""
    return np.array([min(round(eps * dim / (input_scale * 2.0**sh) ** 2), EPS_CAP)
                     for sh in range(-NORM_SHIFTS // 2, NORM_SHIFTS // 2)], dtype=np.int64)


def exp_negative(ops, d, frac_bits: int):
    """exp(d 2^-frac_bits) in Q30 for d <= 0, frac_bits <= 30: d = -z ln2 + p, p in (-ln2, 0],
    exp(p) by the polynomial, then >> z. The reduction runs in Q30 whatever frac_bits is, so ln 2's
    rounding (2^-31) stays negligible after z subtractions. Below -32 ln2 the result rounds to 0
    anyway, so d is clamped there first (which also keeps every product inside int64)."""
    ln2 = int(round(math.log(2) * (1 << frac_bits)))
    d = ops.mul(ops.maximum(d, -32 * ln2), 1 << (EXP_FRAC_BITS - frac_bits))
    ln2 = int(round(math.log(2) * (1 << EXP_FRAC_BITS)))
    z = ops.div(ops.neg(d), ln2)
    p = ops.add(d, ops.mul(z, ln2))
    acc = ops.const(np.int64(EXP_POLY_Q30[-1]))
    for c in EXP_POLY_Q30[-2::-1]:
        acc = ops.add(rdpot(ops, ops.mul(acc, p), EXP_FRAC_BITS), c)
    return rdpot(ops, acc, z)


def softmax(ops, scores, visible, frac_bits: int):
    """Integer softmax over the last axis; scores in Q(frac_bits), visible a broadcastable bool mask.
    Returns Q15 probabilities (masked ones exactly 0)."""
    masked = ops.where(visible, scores, -(1 << 40))
    e = exp_negative(ops, ops.sub(masked, ops.reduce_max(masked, -1)), frac_bits)
    e = ops.where(visible, e, 0)
    return round_div(ops, ops.mul(e, 1 << PROB_FRAC_BITS), ops.reduce_sum(e, -1))


def silu(ops, x, to_q_m0, to_q_shift, frac_bits: int):
    """x sigmoid(x) at x's own scale; (to_q_m0, to_q_shift) convert |x| into Q(frac_bits).

    sigmoid from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below, each one division in Q30.
    |x| saturates at 2^31 / 2^frac_bits, where e is 0 to Q30 precision anyway.
    """
    e = exp_negative(ops, ops.neg(mbqm(ops, ops.abs(x), to_q_m0, to_q_shift)), frac_bits)
    den = ops.add(e, 1 << EXP_FRAC_BITS)
    sig = ops.where(ops.greater_equal(x, 0), round_div(ops, ops.const(np.int64(1 << 2 * EXP_FRAC_BITS)), den),
                    round_div(ops, ops.mul(e, 1 << EXP_FRAC_BITS), den))
    return rdpot(ops, ops.mul(x, sig), EXP_FRAC_BITS)


def rope(ops, x, cos, sin, head_dim: int):
    """Half-split rotary embedding: x [..., P, head_dim] (int32 values), cos/sin [P, head_dim] in Q14."""
    half = head_dim // 2
    rotated = ops.concat([ops.neg(ops.slice(x, half, 2 * half, -1)), ops.slice(x, 0, half, -1)], -1)
    return rdpot(ops, ops.add(ops.mul(x, cos), ops.mul(rotated, sin)), ROPE_FRAC_BITS)
