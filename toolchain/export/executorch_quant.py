"""ExecuTorch's quantized linears: XNNPACK 8-bit dynamic activations with 4-bit grouped weights
(8da4w, the fast int4 path) or 8-bit per-channel weights (8da8w: an int4 model's int8 LM head, and
the closest integer path XNNPACK runs for an integer-only w8a8 model), and an on-grid embedding
table's lookup through ExecuTorch's quantized embedding kernels.

torchao's config builds the quantized linears XNNPACK lowers; their codes and scales are then
replaced with the ones the quantize stage chose (recovered exactly from the on-grid float weights,
as for ONNX), so torchao's own rounding never re-quantizes AWQ's or SmoothQuant's weights. A linear
whose weight is not on the grid (the float LM head, say) stays float.
"""

from __future__ import annotations

import numpy as np
import torch

from pocketlm.runtime.errors import PocketLMError

from .onnx_quant import grid_codes, int8_channel_codes

XNNPACK_GROUP_MULTIPLE = 32


def _on_grid(module: torch.nn.Module, codes_of, skip=()) -> dict:
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and name not in skip:
            codes = codes_of(m.weight.detach().numpy())
            if codes is not None:
                found[name] = codes
    return found


def _quantize_linears_(module: torch.nn.Module, found: dict, config) -> int:
    from torchao.quantization import quantize_

    if not found:
        return 0
    quantize_(module, config, filter_fn=lambda m, name: name in found)
    for name, (codes, scales) in found.items():
        w = module.get_submodule(name).weight
        w.qdata.copy_(torch.from_numpy(codes.reshape(w.qdata.shape)))
        w.scale.copy_(torch.from_numpy(scales).reshape(w.scale.shape).to(w.scale.dtype))
        w.zero_point.zero_()
    return len(found)


def to_8da4w_(module: torch.nn.Module, group_size: int) -> dict[int, int]:
    """Quantize, in place, every nn.Linear of `module` whose weight lies on the int4 grid as 8da4w, and
    one on an int8 per-channel grid (an int8 LM head) as 8da8w. Returns the counts by weight bits."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    if group_size % XNNPACK_GROUP_MULTIPLE:
        raise PocketLMError(f"XNNPACK's int4 kernels need a group size that is a multiple of 32, not {group_size}; "
                            "quantize with --group-size 32 or 64, or export with float weights")
    found = _on_grid(module, lambda w: grid_codes(w, group_size))
    if not found:
        raise PocketLMError(f"no linear weight lies on a symmetric int4 grid of group {group_size}: quantize the source first")
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    n = _quantize_linears_(module, found, config)
    return {4: n, 8: to_8da8w_(module, skip=set(found))}


def to_8da8w_(module: torch.nn.Module, skip=()) -> int:
    """Quantize, in place, every nn.Linear of `module` (but those in `skip`) whose weight lies on an
    int8 per-channel grid."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    found = _on_grid(module, int8_channel_codes, skip)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return _quantize_linears_(module, found, config)


class QuantizedEmbedding(torch.nn.Module):
    """An on-grid embedding table looked up through ExecuTorch's quantized embedding kernels
    (quantized_decomposed::embedding_byte, embedding_4bit): the stage's codes are stored and each
    looked-up row is dequantized, so the values are the float table's and the program carries no
    float copy of it (SmolLM2's tied table: 113 MB in float32, 28 MB as int8 rows, 14 MB as int4)."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, bits: int):
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines the ops)

        self.bits = bits
        if bits == 4:  # ExecuTorch's layout: two codes + 8 per byte, the even column in the high nibble
            u = (codes.astype(np.int16) + 8).astype(np.uint8)
            codes = (u[:, 0::2] << 4) | u[:, 1::2]
        self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(codes)))
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return torch.ops.quantized_decomposed.embedding_4bit.default(self.codes, self.scales, None, -8, 7, tokens)
        return torch.ops.quantized_decomposed.embedding_byte.default(self.codes, self.scales, None, -128, 127, tokens)


def quantize_embedding_(model: torch.nn.Module, group_size: int | None) -> int | None:
    """Replace, in place, `model.model.embed_tokens` by its quantized lookup when its table lies on the
    int4 grid of `group_size` (a tied int4 head) or on an int8 per-row grid (a tied int8 head, or
    w8a8-int's own int8 table). Returns the bits, or None when the table is float."""
    w = model.model.embed_tokens.weight.detach().numpy()
    found = grid_codes(w, group_size) if group_size else None
    if found is not None:
        codes, scales = found
        model.model.embed_tokens = QuantizedEmbedding(codes.reshape(w.shape), scales, 4)
        return 4
    found = int8_channel_codes(w)
    if found is None:
        return None
    model.model.embed_tokens = QuantizedEmbedding(*found, 8)
    return 8
