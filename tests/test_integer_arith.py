"""The integer arithmetic of integer-only mode (runtime/integer/arith.py) in numpy: requantization
equal to the gemmlowp definition (runtime/quant/fixed_point.py), exact integer square roots and bit
lengths, and the integer approximations within stated bounds of the real functions."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pocketlm.runtime.integer import arith as A
from pocketlm.runtime.integer.ops import NumpyOps
from pocketlm.runtime.quant import fixed_point as F

ops = NumpyOps()
I64 = np.int64
RNG = np.random.default_rng(0)
EDGES = np.array([F.INT32_MIN, F.INT32_MIN + 1, -(1 << 30), -5, -3, -2, -1, 0, 1, 2, 3, 5, (1 << 30), F.INT32_MAX], I64)


def int32_values(n):
    return np.concatenate([EDGES, RNG.integers(F.INT32_MIN, F.INT32_MAX, n, endpoint=True)]).astype(I64)


def test_srdhm_equals_gemmlowp_on_int32_including_the_saturating_product():
    a, b = np.meshgrid(int32_values(60), int32_values(60))
    ours = A.srdhm(ops, a.ravel(), b.ravel())
    assert np.array_equal(ours, F.saturating_rounding_doubling_high_mul(a.ravel(), b.ravel()))


@pytest.mark.parametrize("e", [0, 1, 2, 7, 30, 31])
def test_rdpot_equals_gemmlowp_ties_away_from_zero(e):
    x = int32_values(3000)
    assert np.array_equal(A.rdpot(ops, x, e), F.rounding_divide_by_pot(x, e))
    assert np.array_equal(A.rdpot(ops, x, np.full_like(x, e)), F.rounding_divide_by_pot(x, e))


def test_mbqm_equals_gemmlowp_for_left_and_right_shifts():
    x = int32_values(4000)
    multipliers = [F.quantize_multiplier(m) for m in (1e-9, 3.1e-5, 0.0071, 0.5, 0.75, 1.0, 1.7, 1000.5)]
    for m0, shift in multipliers:
        ours = A.mbqm(ops, x, np.int64(m0), np.int64(shift))
        assert np.array_equal(ours, F.multiply_by_quantized_multiplier(x, m0, shift)), (m0, shift)


def test_bitlength_counts_bits():
    x = np.array([0, 1, 2, 3, 4, 255, 256, (1 << 31) - 1, 1 << 31, (1 << 62) - 1, 1 << 62], I64)
    assert A.bitlength(ops, x[:, None])[:, 0].tolist() == [int(v).bit_length() for v in x]


def test_isqrt_is_exact_below_2_to_the_62():
    small = np.arange(0, 70000, dtype=I64)
    squares = np.array([k * k + d for k in RNG.integers(1, 1 << 31, 2000).tolist() for d in (-1, 0, 1) if k * k + d < 1 << 62], I64)
    big = RNG.integers(0, 1 << 62, 20000, dtype=I64)
    for n in (small, squares, big, np.array([(1 << 62) - 1], I64)):
        assert A.isqrt(ops, n[:, None])[:, 0].tolist() == [math.isqrt(int(v)) for v in n]


def test_per_token_quantization_rounds_127_x_over_amax_half_away_from_zero():
    x = RNG.integers(-(1 << 31) + 1, 1 << 31, (64, 96)).astype(I64) >> RNG.integers(0, 31, (64, 1))
    x[0] = 0
    q, amax = A.quantize_per_token(ops, x)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    for row, qrow, a in zip(x, q, amax[:, 0]):
        a = max(int(np.abs(row).max()), 1)
        for v, qv in zip(row.tolist(), qrow.tolist()):
            exact = Fraction(127 * v, a)
            ref = math.floor(abs(exact) + Fraction(1, 2)) * (1 if v >= 0 else -1)
            assert qv == ref
    assert (np.abs(q[1:]).max(1) == 127).all()  # every non-zero row uses the whole range


def test_per_token_requantization_is_within_one_unit_of_the_exact_product():
    acc = RNG.integers(-(1 << 24), 1 << 24, (16, 40)).astype(np.int32)
    amax = RNG.integers(1, 1 << 31, (16, 1)).astype(I64)
    reals = np.exp(RNG.uniform(np.log(1e-16), np.log(1e-8), 40))  # outputs inside int32
    pairs = [F.quantize_multiplier(m * 2.0**31) for m in reals]  # stated per 2^31 of amax
    m0 = np.array([p[0] for p in pairs], I64)
    shift = np.array([p[1] for p in pairs], I64)
    out = A.requantize_per_token(ops, acc, amax, m0, shift, pre_shift=6)
    exact = acc.astype(np.float64) * (amax / 2.0**31) * (m0 / 2.0**31 * 2.0 ** -shift.astype(np.float64))
    assert np.abs(out - exact).max() <= 1.0


def test_exp_is_within_4e_6_relative_of_the_real_exp():
    frac = 20
    d = -RNG.integers(0, 30 << frac, 20000).astype(I64)
    ours = A.exp_negative(ops, d, frac) / 2.0**30
    ref = np.exp(d / 2.0**frac)
    assert np.all(np.abs(ours - ref) <= 4e-6 * ref + 1.5 / 2**30)
    assert A.exp_negative(ops, np.array([0, -(1 << 40)], I64), frac).tolist() == [A.EXP_POLY_Q30[0], 0]


def test_softmax_matches_the_real_softmax_and_zeroes_masked_keys():
    frac = 16
    scores = RNG.normal(0, 4, (8, 300))
    visible = RNG.random((8, 300)) < 0.7
    visible[:, 0] = True
    probs = A.softmax(ops, np.rint(scores * 2**frac).astype(I64), visible, frac) / 2.0**15
    ref = np.where(visible, np.exp(scores - np.where(visible, scores, -np.inf).max(1, keepdims=True)), 0)
    ref /= ref.sum(1, keepdims=True)
    assert np.abs(probs - ref).max() < 3e-5
    assert (probs[~visible] == 0).all()


def test_silu_matches_the_real_silu():
    scale = 3e-6
    x = RNG.normal(0, 4, 20000)
    x[:4] = [0.0, 200.0, -200.0, 1e-5]
    m0, shift = F.quantize_multiplier(scale * 2**24)
    ours = A.silu(ops, np.rint(x / scale).astype(I64), np.int64(m0), np.int64(shift), 24) * scale
    ref = x / (1 + np.exp(-x))
    assert np.all(np.abs(ours - ref) <= 1e-5 * np.abs(ref) + 2 * scale)


def test_rmsnorm_matches_the_real_rmsnorm_for_rows_of_any_magnitude():
    dim, eps, scale = 96, 1e-5, 2.0**-14
    gamma = RNG.normal(1, 0.5, dim)
    rows = RNG.normal(0, 1, (6, dim)) * np.array([1e-3, 1, 30, 3000, 1, 1])[:, None]
    rows[4, 7] = 5000.0  # a massive activation in one channel
    rows[5] = 0.0
    x = np.clip(np.rint(rows / scale), A.INT32_MIN, A.INT32_MAX).astype(I64)
    gmax = np.abs(gamma).max()
    gain = np.rint(gamma * 2**30 / gmax).astype(I64)
    eps_table = A.rmsnorm_eps_table(eps, dim, scale)
    y = A.rmsnorm(ops, x, gain, eps_table) * (gmax * math.sqrt(dim) / 2**30)
    xr = x * scale
    ref = xr * gamma / np.sqrt((xr**2).mean(1, keepdims=True) + eps)
    assert np.all(np.abs(y - ref) <= 1e-5 * np.abs(ref).max(1, keepdims=True) + 1e-6)


def test_rope_rotates_pairs_like_the_float_rope():
    hd, p = 16, 5
    x = RNG.integers(-(1 << 30), 1 << 30, (3, p, hd)).astype(I64)
    ang = RNG.uniform(0, 2 * np.pi, (p, hd // 2))
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    q = lambda t: np.rint(t * 2**14).astype(I64)
    ours = A.rope(ops, x, q(cos), q(sin), hd)
    xr = x.astype(np.float64)
    ref = xr * cos + np.concatenate([-xr[..., hd // 2:], xr[..., :hd // 2]], -1) * sin
    assert np.abs(ours - ref).max() <= 2 ** 30 * 2 * 2.0**-15 + 1
