"""ExecuTorch's quantized linears: XNNPACK 8-bit dynamic activations with 4-bit grouped weights
(8da4w, the fast int4 path) or 8-bit per-channel weights (8da8w: an int4 model's int8 LM head, and
the closest integer path XNNPACK runs for an integer-only w8a8 model).

torchao's config builds the quantized linears XNNPACK lowers; their codes and scales are then
replaced with the ones the quantize stage chose (recovered exactly from the on-grid float weights,
as for ONNX), so torchao's own rounding never re-quantizes AWQ's or SmoothQuant's weights. A linear
whose weight is not on the grid (the float LM head, say) stays float.
"""

from __future__ import annotations

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
