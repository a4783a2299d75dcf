"""Round-to-nearest (RTN) weight quantization, its straight-through twin for QAT, and BitNet ternary.

Conventions follow DESIGN.md ("Quantization semantics"): real = scale * (q - zero_point). Weights are
[out, in] as nn.Linear stores them. A *group* is `group_size` consecutive input columns of one output
row, so every group lives in a single row and `group_size=None` (one group spanning the row) is plain
per-output-channel quantization. Because groups never cross rows, scaling a row by a constant scales
its scales and leaves its codes alone: AWQ relies on that when it folds scales into a linear's rows.

- Symmetric: zero_point 0, codes in [-qmax, qmax] with qmax = 2^(bits-1) - 1 (the restricted range of
  the TFLite int8 weight spec: -2^(bits-1) is never produced, so negation is exact).
- Asymmetric: codes in [0, 2^bits - 1] with an integer zero point. The range is widened to contain 0,
  so real 0 is exactly representable and the zero point always lies in the code range (llm-awq clamps
  the zero point instead, which breaks the error bound for all-positive groups).
- Either way, without clipping, every weight is within scale/2 of its dequantized value.

All functions work on any tensor [..., out, in] (leading dims are batches of weights), which lets the
AWQ searches quantize several candidate weights in one call. Rounding is torch.round (half to even).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pocketlm.runtime.errors import PocketLMError

MIN_SCALE = 1e-12  # an all-zero group gets this scale (codes 0), never a division by zero


@dataclass(frozen=True)
class WeightQuantSpec:
    """How a linear's weight is quantized: bit width, group size along the input (None: per output
    channel) and symmetric (zero point 0) or asymmetric (integer zero point)."""

    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise PocketLMError(f"weight bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise PocketLMError(f"group_size must be a positive integer or None (per output channel), got {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return -self.qmax if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def group_size_for(self, in_features: int, name: str | None = None) -> int:
        """The group size for a weight with `in_features` columns; raises if it does not divide them."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size:
            where = f" of {name}" if name else ""
            raise PocketLMError(
                f"group size {self.group_size} does not divide the input width {in_features}{where}; "
                f"valid group sizes for width {in_features}: {', '.join(map(str, valid_group_sizes(in_features)))}, "
                "or group_size=None (per output channel)"
            )
        return self.group_size

    def describe(self) -> str:
        groups = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {groups} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightQuantSpec":
        return cls(bits=int(d["bits"]), group_size=d.get("group_size"), symmetric=bool(d["symmetric"]))


INT8_PER_CHANNEL = WeightQuantSpec(bits=8, group_size=None, symmetric=True)


def valid_group_sizes(width: int, smallest: int = 8) -> list[int]:
    """Divisors of `width` that make sensible groups (at least `smallest` columns), for error messages."""
    return [d for d in range(min(smallest, width), width + 1) if width % d == 0]


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes [..., out, in] (int8 symmetric, uint8 asymmetric), float32 scales [..., out, n_groups]
    and, when asymmetric, zero points [..., out, n_groups] in the code dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    spec: WeightQuantSpec

    @property
    def group_size(self) -> int:
        return self.codes.shape[-1] // self.scales.shape[-1]

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        lead = self.codes.shape[:-1]
        q = self.codes.to(torch.float32).reshape(*lead, -1, g)
        if self.zero_points is not None:
            q = q - self.zero_points.to(torch.float32)[..., None]
        return (q * self.scales[..., None]).reshape(self.codes.shape)


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """[..., out, in] -> [..., out, n_groups, group_size] (a view when w is contiguous)."""
    if w.dim() < 2:
        raise PocketLMError(f"weight quantization needs a [out, in] weight, got shape {tuple(w.shape)}")
    g = spec.group_size_for(w.shape[-1])
    return w.reshape(*w.shape[:-1], -1, g)


def _params(wg: torch.Tensor, spec: WeightQuantSpec, clip) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, as float) per group of the grouped weight; `clip` shrinks the range."""
    if spec.symmetric:
        amax = wg.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        return (amax / spec.qmax).clamp_min(MIN_SCALE), None
    hi = wg.amax(-1).clamp_min(0)
    lo = wg.amin(-1).clamp_max(0)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    scale = ((hi - lo) / spec.qmax).clamp_min(MIN_SCALE)
    return scale, torch.round(-lo / scale).clamp(0, spec.qmax)


def _check_clip(clip, wg: torch.Tensor):
    if clip is None or isinstance(clip, (int, float)):
        return clip
    clip = torch.as_tensor(clip, dtype=torch.float32)
    try:
        torch.broadcast_shapes(clip.shape, wg.shape[:-1])
    except RuntimeError:
        raise PocketLMError(
            f"clip ratios of shape {tuple(clip.shape)} do not fit the weight's groups {tuple(wg.shape[:-1])} "
            "([out, n_groups])"
        ) from None
    return clip


def quantize_weight(w: torch.Tensor, spec: WeightQuantSpec, clip: torch.Tensor | float | None = None) -> QuantizedWeight:
    """RTN codes, scales and zero points of `w` [..., out, in].

    `clip` (a ratio per group, broadcastable to [..., out, n_groups], or one number) shrinks the
    group's range before the scale is set: symmetric max|w| -> ratio * max|w|, asymmetric [min, max]
    -> ratio * [min, max]; weights beyond the shrunk range saturate. AWQ's clipping search picks it.
    """
    with torch.no_grad():
        w = w.detach().to(torch.float32)
        wg = _grouped(w, spec)
        scale, zero = _params(wg, spec, _check_clip(clip, wg))
        q = torch.round(wg / scale[..., None])
        if zero is not None:
            q = q + zero[..., None]
        codes = q.clamp(spec.qmin, spec.qmax).reshape(w.shape).to(spec.code_dtype)
        zp = None if zero is None else zero.to(spec.code_dtype)
        return QuantizedWeight(codes=codes, scales=scale, zero_points=zp, spec=spec)


def fake_quant(w: torch.Tensor, spec: WeightQuantSpec, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """The float weight the quantized model computes with: dequantize(quantize_weight(w, spec, clip))."""
    with torch.no_grad():
        wg = _grouped(w.detach().to(torch.float32), spec)
        scale, zero = _params(wg, spec, _check_clip(clip, wg))
        s = scale[..., None]
        if zero is None:
            q = torch.round(wg / s).clamp(spec.qmin, spec.qmax)
        else:
            z = zero[..., None]
            q = (torch.round(wg / s) + z).clamp(spec.qmin, spec.qmax) - z
        return (q * s).reshape(w.shape)


def fake_quant_ste(w: torch.Tensor, spec: WeightQuantSpec, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """fake_quant in the forward pass, identity in the backward pass (straight-through estimator).

    w + (q(w) - w).detach(): the value is q(w) (to float rounding), the gradient reaches w unchanged,
    so QAT trains the float master weights through the very quantizer the export path uses.
    """
    return w + (fake_quant(w, spec, clip) - w).detach()


# BitNet b1.58 (Ma et al. 2024): ternary weights with one absmean scale per tensor.


def ternary_quantize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """codes in {-1, 0, 1} (int8) and the per-tensor scale mean|W| (clamped to eps), real = scale * code."""
    with torch.no_grad():
        w = w.detach().to(torch.float32)
        scale = w.abs().mean().clamp_min(eps)
        return torch.round(w / scale).clamp(-1, 1).to(torch.int8), scale


def fake_ternary(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    codes, scale = ternary_quantize(w, eps)
    return codes.to(torch.float32) * scale


def fake_ternary_ste(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Ternary in the forward pass, identity gradient (BitNet b1.58 trains its latent weights this way)."""
    return w + (fake_ternary(w, eps) - w).detach()
