"""The exact integer requantization of integer-only mode (Jacob et al. 2018, as gemmlowp defines it).

A real multiplier M = s_in·s_w/s_out is stored as a pair (m0, shift): m0 is an int32 in [2^30, 2^31)
read as the Q0.31 fraction m0/2^31 in [0.5, 1), and `shift` is the paper's n, a right shift, so
M = (m0 / 2^31) · 2^-shift. A multiplier >= 1 gets a negative shift, which is applied as a left shift
of the accumulator *before* the high multiply (as TFLite does), so the multiply keeps all 31 bits of
m0. Shifts lie in [-31, 31]; a multiplier so small that it would need more than 31 right shifts maps
every int32 to 0 anyway, so it is flushed to (0, 0).

The product is rounded twice, and this module pins both roundings (the manifest names them by
REQUANT_ROUNDING); TFLite's newer single-rounding variant differs on a few percent of inputs:
  1. saturating_rounding_doubling_high_mul: round(a·b / 2^31), ties toward +infinity
     (gemmlowp's nudge then truncating division; ARM's VQRDMULH), INT32_MIN·INT32_MIN -> INT32_MAX;
  2. rounding_divide_by_pot: round(x / 2^e), ties away from zero.
The left shift saturates to int32 instead of wrapping: any accumulator it would overflow ends up far
beyond the int8 range, so the clamp in `requantize` gives the same answer it would without limits.

Everything is vectorised over numpy arrays (per-channel m0 and shift broadcast against the
accumulators) and computed in int64, so numpy never wraps silently; results are int32 (or int8).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import PocketLMError

REQUANT_ROUNDING = "gemmlowp-srdhm-rdpot"

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
MAX_SHIFT = 31


def quantize_multiplier(m: float) -> tuple[int, int]:
    """(m0, shift) with m ≈ (m0 / 2^31) · 2^-shift, m0 in [2^30, 2^31); m == 0 gives (0, 0).

    m0 is the mantissa rounded to nearest, ties up (it is positive). When that rounding carries to
    2^31 the pair is renormalised to (2^30, shift - 1) so m0 still fits an int32.
    """
    m = float(m)
    if not math.isfinite(m) or m < 0:
        raise PocketLMError(f"requantization multiplier {m!r} is not a finite non-negative number; a quantization scale is zero or not finite")
    if m == 0.0:
        return 0, 0
    frac, exp = math.frexp(m)  # m = frac · 2^exp, frac in [0.5, 1)
    scaled = frac * (1 << 31)  # exact: a double's 53-bit mantissa shifted by 31
    m0 = math.floor(scaled)
    if scaled - m0 >= 0.5:
        m0 += 1
    if m0 == 1 << 31:
        m0, exp = 1 << 30, exp + 1
    shift = -exp
    if shift > MAX_SHIFT:  # every int32 times m rounds to 0
        return 0, 0
    if shift < -MAX_SHIFT:
        raise PocketLMError(f"requantization multiplier {m:g} is too large (it must be below 2^31); the output scale is degenerate")
    return int(m0), int(shift)


def _int32_values(x, name: str) -> np.ndarray:
    """x as int64, refusing values an int32 cannot hold (the semantics are defined on int32)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    x = x.astype(np.int64)
    if x.size and (x.min() < INT32_MIN or x.max() > INT32_MAX):
        raise ValueError(f"{name} has values outside int32")
    return x


def _shifts(shift, lo: int, hi: int, name: str) -> np.ndarray:
    s = np.asarray(shift)
    if s.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got {s.dtype}")
    s = s.astype(np.int64)
    if s.size and (s.min() < lo or s.max() > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}]")
    return s


def _trunc_div_pow2(t: np.ndarray, e: int) -> np.ndarray:
    """t / 2^e rounded toward zero, like C's integer division (numpy's // and >> round down)."""
    return np.where(t >= 0, t >> e, -((-t) >> e))


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """round(a·b / 2^31) for int32 a, b, ties toward +inf; INT32_MIN·INT32_MIN saturates to INT32_MAX.

    Written as gemmlowp writes it: add 2^30 (or 1 - 2^30 when a·b < 0), then divide by 2^31
    truncating toward zero. The only product whose result leaves int32 is INT32_MIN², hence the one
    saturating case.
    """
    a = _int32_values(a, "a")
    b = _int32_values(b, "b")
    ab = a * b  # |ab| <= 2^62: exact in int64
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _trunc_div_pow2(ab + nudge, 31)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, np.int64(INT32_MAX), high).astype(np.int32)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """round(x / 2^exponent) for int32 x and exponent in [0, 31], ties away from zero.

    The floor quotient x >> e is bumped by one when the low bits (the floor remainder) exceed half
    the divisor, or reach it for non-negative x: that is the tie rule, expressed without a division.
    """
    x = _int32_values(x, "x")
    e = _shifts(exponent, 0, MAX_SHIFT, "exponent")
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return ((x >> e) + (remainder > threshold)).astype(np.int32)


def multiply_by_quantized_multiplier(x, m0, shift) -> np.ndarray:
    """x · (m0 / 2^31) · 2^-shift in int32 with the two roundings of REQUANT_ROUNDING.

    A negative shift (multiplier >= 1) left-shifts x first, saturating to int32; a positive one is
    the rounding right shift after the high multiply. m0 and shift broadcast against x.
    """
    x = _int32_values(x, "x")
    m0 = _int32_values(m0, "m0")
    s = _shifts(shift, -MAX_SHIFT, MAX_SHIFT, "shift")
    left = np.maximum(-s, 0)
    right = np.maximum(s, 0)
    shifted = np.clip(x << left, INT32_MIN, INT32_MAX)  # |x << 31| <= 2^62: no int64 wrap
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right)


def storage_dtype(qmin: int, qmax: int) -> np.dtype:
    """The smallest integer dtype that holds [qmin, qmax], unsigned when qmin >= 0 (uint4 -> uint8)."""
    for dt in (np.uint8, np.uint16, np.uint32) if qmin >= 0 else (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dt)
    raise ValueError(f"no integer type holds [{qmin}, {qmax}]")


def requantize(acc, m0, shift, zero_point, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """int32 accumulators -> quantized outputs: scale by (m0, shift), add the zero point, clamp.

    The result's dtype is storage_dtype(qmin, qmax): int8 for the default range.
    """
    if qmin > qmax:
        raise ValueError(f"qmin {qmin} > qmax {qmax}")
    y = multiply_by_quantized_multiplier(acc, m0, shift).astype(np.int64) + np.asarray(zero_point, dtype=np.int64)
    return np.clip(y, qmin, qmax).astype(storage_dtype(qmin, qmax))
