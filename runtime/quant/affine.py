"""Affine quantization, real = scale · (q − zero_point), and the parameters pocketlm derives for it.

One rounding rule everywhere: q = clamp(rint(x / scale) + zero_point, qmin, qmax), computed in
float32 with ties to even. That is ONNX QuantizeLinear's definition (and torch's), so an exported
graph reproduces these integers bit for bit; dequantize is (q − zero_point) · scale in float32, as
DequantizeLinear computes it.

Parameter conventions, all float32 scales and int32 zero points:
  - symmetric: zero_point 0, scale = absmax / qmax, on the restricted range [−qmax, qmax]
    (int8 [−127, 127], int4 [−7, 7]) so that w and −w quantize alike;
  - asymmetric: the range is widened to include 0 (so 0 is exact and the zero point always lies in
    [qmin, qmax]); scale = (hi − lo) / (qmax − qmin), zero_point = rint(qmin − lo / scale), the order
    ONNX DynamicQuantizeLinear uses; asymmetric weights are unsigned ([0, 2^bits − 1]);
  - a range of width 0 (an all-zero row, group or tensor) gets scale 1.0: every value is then
    quantized exactly and no division by zero reaches a kernel.
Weights are [out, in] like nn.Linear; groups run along the input dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PocketLMError
from .fixed_point import storage_dtype

GROUP_SIZES = (32, 64, 128)  # the group sizes the design supports for int4 weights


def _float32(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("cannot quantize NaN")
    return x


def quantize(x, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """clamp(rint(x / scale) + zero_point, qmin, qmax) in float32; dtype: smallest int holding the range."""
    x = _float32(x)
    r = np.rint(x / np.asarray(scale, dtype=np.float32)) + np.asarray(zero_point, dtype=np.float32)
    return np.clip(r, qmin, qmax).astype(storage_dtype(qmin, qmax))


def dequantize(q, scale, zero_point) -> np.ndarray:
    """(q − zero_point) · scale in float32."""
    diff = np.asarray(q, dtype=np.int32) - np.asarray(zero_point, dtype=np.int32)
    return diff.astype(np.float32) * np.asarray(scale, dtype=np.float32)


def symmetric_range(bits: int) -> tuple[int, int]:
    """[−(2^(bits−1) − 1), 2^(bits−1) − 1]: int8 → [−127, 127], int4 → [−7, 7]."""
    top = (1 << (bits - 1)) - 1
    return -top, top


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, (1 << bits) - 1


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point for one tensor, broadcastable to it, plus its integer range.

    For group-wise weights (group_size set) scale and zero_point are [out, in // group_size] and are
    repeated along the last axis before use; otherwise they broadcast as they are ([out, 1] per
    channel, [..., 1] per token, [] per tensor).
    """

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int32, same shape as scale
    qmin: int
    qmax: int
    group_size: int | None = None

    def _expand(self, a: np.ndarray) -> np.ndarray:
        return np.repeat(a, self.group_size, axis=-1) if self.group_size else a

    def quantize(self, x) -> np.ndarray:
        return quantize(x, self._expand(self.scale), self._expand(self.zero_point), self.qmin, self.qmax)

    def dequantize(self, q) -> np.ndarray:
        return dequantize(q, self._expand(self.scale), self._expand(self.zero_point))


def range_params(lo, hi, qmin: int = -128, qmax: int = 127, symmetric: bool = False, group_size: int | None = None) -> QuantParams:
    """Parameters that map the real range [lo, hi] (arrays broadcast) onto [qmin, qmax]."""
    lo = _float32(lo)
    hi = _float32(hi)
    if np.any(lo > hi):
        raise ValueError("range with lo > hi")
    if symmetric:
        scale = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(qmax)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        return QuantParams(scale, np.zeros(scale.shape, np.int32), qmin, qmax, group_size)
    lo = np.minimum(lo, np.float32(0))
    hi = np.maximum(hi, np.float32(0))
    scale = (hi - lo) / np.float32(qmax - qmin)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zp = np.clip(np.rint(np.float32(qmin) - lo / scale), qmin, qmax).astype(np.int32)
    return QuantParams(scale, zp, qmin, qmax, group_size)


def _weight(w) -> np.ndarray:
    w = _float32(w)
    if w.ndim != 2:
        raise ValueError(f"weights must be [out, in], got shape {w.shape}")
    return w


def per_channel_symmetric_params(w, bits: int = 8) -> QuantParams:
    """One symmetric scale per output channel (row): scale [out, 1]."""
    w = _weight(w)
    qmin, qmax = symmetric_range(bits)
    return range_params(w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True), qmin, qmax, symmetric=True)


def check_group_size(width: int, group_size: int) -> None:
    """Refuse a group size that does not split the input width into whole groups, naming the fix."""
    if group_size > 0 and width % group_size == 0:
        return
    fits = [g for g in GROUP_SIZES if width % g == 0]
    if not fits:  # a width none of the usual sizes divides: offer its power-of-two divisors
        fits = [1 << k for k in range(2, 8) if width % (1 << k) == 0]
    names = [str(g) for g in fits]
    fix = f"use {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else f"use {names[0]}" if names else "use per-channel quantization instead"
    raise PocketLMError(f"group size {group_size} does not divide the layer width {width}; {fix}")


def groupwise_params(w, bits: int = 4, group_size: int = 32, symmetric: bool = True) -> QuantParams:
    """One scale (and zero point) per run of group_size input columns: scale [out, in // group_size].

    Symmetric groups use [−(2^(bits−1) − 1), 2^(bits−1) − 1] with zero point 0; asymmetric ones
    use [0, 2^bits − 1] with the range widened to include 0.
    """
    w = _weight(w)
    out, width = w.shape
    check_group_size(width, group_size)
    g = w.reshape(out, width // group_size, group_size)
    qmin, qmax = symmetric_range(bits) if symmetric else unsigned_range(bits)
    return range_params(g.min(axis=-1), g.max(axis=-1), qmin, qmax, symmetric, group_size)


def minmax_activation_params(x, qmin: int = -128, qmax: int = 127, symmetric: bool = False) -> QuantParams:
    """Static per-tensor parameters from the calibration data's extremes."""
    x = _float32(x)
    return range_params(x.min(), x.max(), qmin, qmax, symmetric)


def percentile_activation_params(x, percentile: float = 99.99, qmin: int = -128, qmax: int = 127, symmetric: bool = False) -> QuantParams:
    """Static per-tensor parameters from the [100 − p, p] percentiles, so rare outliers are clipped
    instead of stretching the scale for every other value."""
    if not 50.0 < percentile <= 100.0:
        raise PocketLMError(f"the calibration percentile must lie in (50, 100], got {percentile}")
    x = _float32(x).ravel()
    lo, hi = np.percentile(x, [100.0 - percentile, percentile])
    return range_params(lo, hi, qmin, qmax, symmetric)


def dynamic_per_token_params(x, qmin: int = -128, qmax: int = 127, symmetric: bool = False) -> QuantParams:
    """Parameters computed at run time for each token (row over the last axis): scale [..., 1]."""
    x = _float32(x)
    return range_params(x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True), qmin, qmax, symmetric)
