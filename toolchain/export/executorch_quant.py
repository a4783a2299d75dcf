"""ExecuTorch's fast int4 path: XNNPACK 8-bit dynamic activations with 4-bit grouped weights (8da4w).

torchao's config builds the quantized linears XNNPACK lowers; their codes and scales are then
replaced with the ones the quantize stage chose (recovered exactly from the on-grid float weights,
as for ONNX), so torchao's own rounding never re-quantizes AWQ's weights. A linear whose weight is
not on the grid (the float LM head, say) stays float.
"""

from __future__ import annotations

import torch

from pocketlm.runtime.errors import PocketLMError

from .onnx_int4 import grid_codes

XNNPACK_GROUP_MULTIPLE = 32


def to_8da4w_(module: torch.nn.Module, group_size: int) -> int:
    """Quantize, in place, every nn.Linear of `module` whose weight lies on the int4 grid. Returns the count."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if group_size % XNNPACK_GROUP_MULTIPLE:
        raise PocketLMError(f"XNNPACK's int4 kernels need a group size that is a multiple of 32, not {group_size}; "
                            "quantize with --group-size 32 or 64, or export with float weights")
    exact = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            found = grid_codes(m.weight.detach().numpy(), group_size)
            if found is not None:
                exact[name] = found
    if not exact:
        raise PocketLMError(f"no linear weight lies on a symmetric int4 grid of group {group_size}: quantize the source first")
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantize_(module, config, filter_fn=lambda m, name: name in exact)
    for name, (codes, scales) in exact.items():
        w = module.get_submodule(name).weight
        w.qdata.copy_(torch.from_numpy(codes.reshape(w.qdata.shape)))
        w.scale.copy_(torch.from_numpy(scales).to(w.scale.dtype))
        w.zero_point.zero_()
    return len(exact)
