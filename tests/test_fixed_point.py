"""The integer requantization pocketlm's integer-only mode is defined by: golden vectors derived by
hand (ties, negatives, saturation, renormalised multipliers), and bit-for-bit agreement with an
independent arbitrary-precision reference written as plain roundings rather than gemmlowp's bit tricks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.quant import fixed_point as F

MIN, MAX = F.INT32_MIN, F.INT32_MAX


# -- independent reference on Python ints: the two roundings stated, not the mask/nudge tricks --


def ref_srdhm(a: int, b: int) -> int:
    """a·b / 2^31 rounded to nearest, ties toward +inf; the one overflow saturates."""
    if a == b == MIN:
        return MAX
    return (a * b + (1 << 30)) >> 31  # Python's >> is floor division by 2^31


def ref_rdpot(x: int, e: int) -> int:
    """x / 2^e rounded to nearest, ties away from zero."""
    if e == 0:
        return x
    q = (abs(x) + (1 << (e - 1))) >> e
    return q if x >= 0 else -q


def ref_mbqm(x: int, m0: int, shift: int) -> int:
    x = min(max(x << max(-shift, 0), MIN), MAX)
    return ref_rdpot(ref_srdhm(x, m0), max(shift, 0))


def srdhm(a, b) -> int:
    return int(F.saturating_rounding_doubling_high_mul(np.int32(a), np.int32(b)))


def rdpot(x, e) -> int:
    return int(F.rounding_divide_by_pot(np.int32(x), e))


def mbqm(x, m0, shift) -> int:
    return int(F.multiply_by_quantized_multiplier(np.int32(x), m0, shift))


# -- golden vectors ------------------------------------------------------------------------------

SRDHM_GOLDEN = [  # (a, b, a·b/2^31 as a real, expected)
    (1 << 30, 1 << 30, "2^29", 1 << 29),
    (0, MIN, "0", 0),
    (1, 1 << 30, "0.5", 1),
    (-1, 1 << 30, "-0.5", 0),
    (3, 1 << 30, "1.5", 2),
    (-3, 1 << 30, "-1.5", -1),
    (5, 1 << 30, "2.5", 3),
    (-5, 1 << 30, "-2.5", -2),
    (-5, 1 << 29, "-1.25", -1),
    (-7, 1 << 29, "-1.75", -2),
    (7, 1 << 29, "1.75", 2),
    (MIN, 1 << 30, "-2^30", -(1 << 30)),
    (MIN, MAX, "-(2^31-1)", -MAX),
    (MAX, MAX, "2^31-2+2^-31", MAX - 1),
    (MIN, MIN, "2^31, saturates", MAX),
]


@pytest.mark.parametrize("a,b,real,expected", SRDHM_GOLDEN)
def test_srdhm_rounds_to_nearest_with_ties_toward_plus_infinity(a, b, real, expected):
    assert srdhm(a, b) == expected, real
    assert srdhm(b, a) == expected  # commutative
    assert ref_srdhm(a, b) == expected  # the reference agrees with the hand derivation


def test_srdhm_saturates_only_int32_min_squared():
    out = F.saturating_rounding_doubling_high_mul(np.array([MIN, MIN, MIN + 1], np.int32), np.array([MIN, MIN + 1, MIN], np.int32))
    assert out.dtype == np.int32
    assert out.tolist() == [MAX, MAX, MAX]  # the last two are exact: (2^31 - 1)·2^31 / 2^31 = 2^31 - 1


RDPOT_GOLDEN = [  # (x, exponent, expected): x / 2^e rounded half away from zero
    (5, 1, 3),
    (-5, 1, -3),
    (3, 1, 2),
    (-3, 1, -2),
    (1, 1, 1),
    (-1, 1, -1),
    (6, 2, 2),
    (-6, 2, -2),
    (5, 2, 1),
    (-5, 2, -1),
    (7, 2, 2),
    (-7, 2, -2),
    (-1, 5, 0),
    (-3, 0, -3),
    (MAX, 0, MAX),
    (MAX, 31, 1),
    (MIN, 31, -1),
    (1 << 30, 31, 1),
    (-(1 << 30), 31, -1),
    ((1 << 30) - 1, 31, 0),
    (-(1 << 30) + 1, 31, 0),
]


@pytest.mark.parametrize("x,e,expected", RDPOT_GOLDEN)
def test_rdpot_rounds_to_nearest_with_ties_away_from_zero(x, e, expected):
    assert rdpot(x, e) == expected
    assert ref_rdpot(x, e) == expected


def test_rdpot_refuses_exponents_outside_0_to_31():
    with pytest.raises(ValueError):
        F.rounding_divide_by_pot(np.int32(5), 32)
    with pytest.raises(ValueError):
        F.rounding_divide_by_pot(np.int32(5), -1)


MULTIPLIER_GOLDEN = [  # (m, m0, shift) with m ≈ m0 / 2^31 · 2^-shift
    (0.5, 1 << 30, 0),
    (0.25, 1 << 30, 1),
    (0.75, 3 << 29, 0),
    (1.0, 1 << 30, -1),
    (3.0, 3 << 29, -2),
    (1 - 2.0**-31, MAX, 0),  # mantissa exactly 2^31 - 1: no rounding at all
    (1 - 2.0**-32, 1 << 30, -1),  # mantissa 2^31 - 0.5: the tie rounds up to 2^31, renormalised
    (1 - 2.0**-33, 1 << 30, -1),  # rounds to 2^31, renormalised: m0 = 2^30 and one more left shift
    (0.5 - 2.0**-34, 1 << 30, 0),
    (2.0**-32, 1 << 30, 31),  # the smallest power of two that keeps its pair
    (2.0**31 - 1, MAX, -31),  # the largest multiplier that fits
    (0.0, 0, 0),
    (2.0**-33, 0, 0),  # would need 32 right shifts: every int32 rounds to 0, flushed
    (1e-30, 0, 0),
]


@pytest.mark.parametrize("m,m0,shift", MULTIPLIER_GOLDEN)
def test_quantize_multiplier_golden_pairs(m, m0, shift):
    assert F.quantize_multiplier(m) == (m0, shift)


def test_quantize_multiplier_keeps_m0_in_the_int32_q31_range_and_within_half_an_ulp():
    rng = np.random.default_rng(1)
    for m in np.exp(rng.uniform(math.log(2.0**-31), math.log(2.0**30), 3000)):
        m0, shift = F.quantize_multiplier(float(m))
        assert (1 << 30) <= m0 < (1 << 31)
        assert -31 <= shift <= 31
        exact = Fraction(float(m)) * 2 ** (31 + shift)  # the ideal m0 for this shift
        assert abs(exact - m0) <= Fraction(1, 2), (m, m0, shift)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), 2.0**31])
def test_quantize_multiplier_refuses_degenerate_multipliers(bad):
    with pytest.raises(PocketLMError, match="multiplier"):
        F.quantize_multiplier(bad)


MBQM_GOLDEN = [  # (x, m, expected, why)
    (5, 0.5, 3, "2.5: tie rounds up in the high multiply"),
    (-5, 0.5, -2, "-2.5: tie rounds toward +inf in the high multiply"),
    (-5, 0.25, -1, "-2.5 -> -2, then -2/2 = -1"),
    (7, 13 / 16 / 4, 2, "5.6875 -> 6, then 6/4 = 1.5 -> 2; one rounding of 1.42 would give 1"),
    (-7, 13 / 16 / 4, -2, "-5.6875 -> -6, then -6/4 = -1.5 -> -2"),
    (3, 3.0, 9, "left shift 2 then 12 * 0.75"),
    (-7, 1.5, -10, "left shift 1 then -14 * 0.75 = -10.5 -> -10"),
    (1 << 30, 4.0, 1 << 30, "the left shift saturates to INT32_MAX; (2^31 - 1)/2 ties up"),
    (-(1 << 30), 4.0, -(1 << 30), "saturates to INT32_MIN"),
    (MAX, 2.0**-32, 1, "shift 31: SRDHM (2^31 - 1)/2 ties up to 2^30, then 2^30 / 2^31 = 0.5 -> 1 (the real product is 0.4999...)"),
    (123456, 0.0, 0, "zero multiplier"),
]


@pytest.mark.parametrize("x,m,expected,why", MBQM_GOLDEN)
def test_multiply_by_quantized_multiplier_golden(x, m, expected, why):
    m0, shift = F.quantize_multiplier(m)
    assert mbqm(x, m0, shift) == expected, why
    assert ref_mbqm(x, m0, shift) == expected, why


def test_the_two_roundings_differ_from_a_single_rounding_on_some_inputs():
    """The chosen variant is really gemmlowp's double rounding: a single exact rounding of x·M gives
    1 where it gives 2 (so a kernel that rounds once would fail the parity checks)."""
    m0, shift = 13 << 27, 2
    single = math.floor(Fraction(7 * m0, 2 ** (31 + shift)) + Fraction(1, 2))
    assert single == 1
    assert mbqm(7, m0, shift) == 2
    assert F.REQUANT_ROUNDING == "gemmlowp-srdhm-rdpot"


def test_per_channel_multipliers_broadcast_like_scalar_calls():
    rng = np.random.default_rng(2)
    acc = rng.integers(-(1 << 24), 1 << 24, (5, 4)).astype(np.int32)
    pairs = [F.quantize_multiplier(m) for m in (0.003, 0.7, 1.0 - 2.0**-33, 2.5)]
    m0 = np.array([p[0] for p in pairs], np.int32)
    shift = np.array([p[1] for p in pairs], np.int32)
    out = F.multiply_by_quantized_multiplier(acc, m0, shift)
    assert out.dtype == np.int32
    expected = [[ref_mbqm(int(acc[i, j]), *pairs[j]) for j in range(4)] for i in range(5)]
    assert out.tolist() == expected


# -- properties against the exact reference ------------------------------------------------------


def random_int32(rng, n):
    """Full-range int32 values, small ones, and the extremes: where rounding bugs live."""
    full = rng.integers(MIN, MAX, n, endpoint=True)
    small = rng.integers(-(1 << 12), 1 << 12, n)
    edges = np.array([MIN, MIN + 1, -1, 0, 1, MAX - 1, MAX] * (n // 70 + 1))[:n]
    return np.concatenate([full, small, edges]).astype(np.int32)


def test_srdhm_matches_the_exact_reference_bit_for_bit():
    rng = np.random.default_rng(3)
    a = random_int32(rng, 4000)
    b = rng.permutation(random_int32(rng, 4000))
    out = F.saturating_rounding_doubling_high_mul(a, b)
    assert out.tolist() == [ref_srdhm(int(x), int(y)) for x, y in zip(a, b)]


def test_rdpot_matches_the_exact_reference_bit_for_bit():
    rng = np.random.default_rng(4)
    x = random_int32(rng, 4000)
    e = rng.integers(0, 32, x.size)
    out = F.rounding_divide_by_pot(x, e)
    assert out.tolist() == [ref_rdpot(int(v), int(k)) for v, k in zip(x, e)]


def random_pairs(rng, n):
    """Multipliers from 2^-34 to 2^10 through quantize_multiplier, plus raw pairs over every shift."""
    ms = np.exp(rng.uniform(math.log(2.0**-34), math.log(2.0**10), n))
    pairs = [F.quantize_multiplier(float(m)) for m in ms]
    pairs += [(int(rng.integers(1 << 30, 1 << 31)), int(s)) for s in rng.integers(-31, 32, n)]
    return pairs


def test_requantization_matches_the_exact_reference_bit_for_bit():
    rng = np.random.default_rng(5)
    x = random_int32(rng, 4000)
    pairs = random_pairs(rng, x.size // 2)
    pairs = [pairs[i] for i in rng.integers(0, len(pairs), x.size)]
    m0 = np.array([p[0] for p in pairs], np.int64)
    shift = np.array([p[1] for p in pairs], np.int64)
    out = F.multiply_by_quantized_multiplier(x, m0, shift)
    assert out.dtype == np.int32
    assert out.tolist() == [ref_mbqm(int(v), a, s) for v, (a, s) in zip(x, pairs)]


def test_requantization_is_within_one_of_the_rounded_real_product():
    rng = np.random.default_rng(6)
    x = random_int32(rng, 4000)
    ms = np.exp(rng.uniform(math.log(2.0**-34), math.log(2.0**10), x.size))
    checked = 0
    for v, m in zip(x.tolist(), ms.tolist()):
        m0, shift = F.quantize_multiplier(m)
        if abs(v << max(-shift, 0)) > MAX:
            continue  # the left shift saturates: covered by the golden vectors
        exact = Fraction(m) * v
        assert abs(mbqm(v, m0, shift) - round(exact)) <= 1, (v, m, m0, shift)
        checked += 1
    assert checked > 3000


def test_requantize_adds_the_zero_point_and_clamps_to_the_output_range():
    m0, shift = F.quantize_multiplier(0.25)
    acc = np.array([0, 10, -10, 1000, -1000, 6], np.int32)  # / 4: 0, 2.5, -2.5, 250, -250, 1.5
    q = F.requantize(acc, m0, shift, zero_point=-3)
    assert q.dtype == np.int8
    assert q.tolist() == [-3, 0, -6, 127, -128, -1]
    u = F.requantize(acc, m0, shift, zero_point=128, qmin=0, qmax=255)
    assert u.dtype == np.uint8
    assert u.tolist() == [128, 131, 125, 255, 0, 130]
    q4 = F.requantize(acc, m0, shift, zero_point=0, qmin=-8, qmax=7)
    assert q4.dtype == np.int8 and q4.tolist() == [0, 3, -3, 7, -8, 2]


def test_inputs_outside_int32_are_refused_rather_than_wrapped():
    with pytest.raises(ValueError, match="int32"):
        F.multiply_by_quantized_multiplier(np.array([1 << 31], np.int64), 1 << 30, 0)
    with pytest.raises(TypeError):
        F.saturating_rounding_doubling_high_mul(np.float32(1.0), np.int32(1))
    with pytest.raises(ValueError):
        F.multiply_by_quantized_multiplier(np.int32(1), 1 << 30, -32)
