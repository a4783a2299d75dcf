"""ExecuTorch's quantized linears: XNNPACK 8-bit dynamic activations with 4-bit grouped weights
(8da4w, the fast int4 path) or 8-bit per-channel weights (8da8w, the closest integer path XNNPACK
runs for an integer-only w8a8 model).

torchao's config builds the quantized linears XNNPACK lowers; their codes and scales are then
replaced with the ones the quantize stage chose (recovered exactly from the on-grid float weights,
as for ONNX), so torchao's own rounding never re-quantizes AWQ's or SmoothQuant's weights. A linear
whose weight is not on the grid (the float LM head, say) stays float.
"""

from __future__ import annotations

import torch

from pocketlm.runtime.errors import PocketLMError

from .onnx_int4 import grid_codes

XNNPACK_GROUP_MULTIPLE = 32


def _int8_row_codes(w: torch.Tensor):
    """(codes int8 [out, in], scales [out]) if w lies on a symmetric int8 per-row grid, else None."""
    from .integer_program import int8_rows

    codes, scales = int8_rows(w)
    recon = torch.from_numpy(codes.astype("float64") * scales[:, None])
    if not torch.allclose(recon, w.detach().double(), rtol=1e-6, atol=1e-12 + 1e-6 * float(w.abs().max())):
        return None
    return codes, scales.astype("float32")


def _quantize_linears_(module: torch.nn.Module, found: dict, config) -> int:
    from torchao.quantization import quantize_

    if not found:
        raise PocketLMError("no linear weight lies on the quantization grid the export expects: quantize the source first")
    quantize_(module, config, filter_fn=lambda m, name: name in found)
    for name, (codes, scales) in found.items():
        w = module.get_submodule(name).weight
        w.qdata.copy_(torch.from_numpy(codes.reshape(w.qdata.shape)))
        w.scale.copy_(torch.from_numpy(scales).reshape(w.scale.shape).to(w.scale.dtype))
        w.zero_point.zero_()
    return len(found)


def to_8da4w_(module: torch.nn.Module, group_size: int) -> int:
    """Quantize, in place, every nn.Linear of `module` whose weight lies on the int4 grid. Returns the count."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    if group_size % XNNPACK_GROUP_MULTIPLE:
        raise PocketLMError(f"XNNPACK's int4 kernels need a group size that is a multiple of 32, not {group_size}; "
                            "quantize with --group-size 32 or 64, or export with float weights")
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            codes = grid_codes(m.weight.detach().numpy(), group_size)
            if codes is not None:
                found[name] = codes
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    return _quantize_linears_(module, found, config)


def to_8da8w_(module: torch.nn.Module) -> int:
    """Quantize, in place, every nn.Linear of `module` whose weight lies on an int8 per-channel grid."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    found = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            codes = _int8_row_codes(m.weight)
            if codes is not None:
                found[name] = codes
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return _quantize_linears_(module, found, config)
