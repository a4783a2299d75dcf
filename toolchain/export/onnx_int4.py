"""ONNX Runtime's fast int4 path: each MatMul whose constant weight lies on the recorded int4 grid
becomes a com.microsoft MatMulNBits with the packed codes and per-group scales.

The quantize stage stores dequantized weights (scale * q, symmetric, |q| <= 7); the largest |w| of a
quantized group is therefore exactly 7 * scale, so the codes and scales are recovered exactly from
the float weights. A weight that is not on the grid (the float LM head, say) is left alone: the
check is on the values, not on names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pocketlm.runtime.errors import PocketLMError

MS_DOMAIN = "com.microsoft"
QMAX = 7  # symmetric int4 codes in [-7, 7], stored unsigned as q + 8 (MatMulNBits' default zero point)


def grid_codes(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray] | None:
    """w [N, K] -> (codes int8 [N, K/group, group], scales float32 [N, K/group]) if w is on the grid."""
    n, k = w.shape
    if k % group:
        return None
    g = w.reshape(n, k // group, group).astype(np.float32)
    scale = np.abs(g).max(-1) / QMAX
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint(g / safe[..., None])
    if np.abs(q).max() > QMAX:
        return None
    recon = q * safe[..., None]
    if not np.allclose(recon, g, rtol=1e-6, atol=1e-12 + 1e-6 * float(np.abs(g).max())):
        return None
    return q.astype(np.int8), safe


def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """int8 codes [N, blocks, group] in [-7, 7] -> uint8 [N, blocks, group/2], low nibble first."""
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def to_matmul_nbits(path: Path, group_size: int, accuracy_level: int = 0) -> int:
    """Rewrite the ONNX model at `path` in place (its external data file is rewritten too).
    Returns how many MatMuls were converted. accuracy_level: ORT's compute type for the activation
    side (0: as the input, float32; 4: int8, the fastest on CPUs with int8 dot products)."""
    import onnx
    from onnx import helper, numpy_helper

    if group_size < 16 or group_size & (group_size - 1):
        raise PocketLMError(f"ONNX Runtime's MatMulNBits needs a power-of-two group size of at least 16, not {group_size}")
    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, converted, drop = [], 0, set()
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        found = None
        if weight is not None and len(weight.dims) == 2:
            b = numpy_helper.to_array(weight)  # [K, N]: x @ B
            found = grid_codes(b.T, group_size)
        if found is None:
            new_nodes.append(node)
            continue
        codes, scales = found
        k, n = weight.dims
        base = node.input[1]
        packed = numpy_helper.from_array(pack_uint4(codes), f"{base}_q4")
        scale_t = numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{base}_scales")
        model.graph.initializer.extend([packed, scale_t])
        drop.add(base)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], packed.name, scale_t.name], list(node.output), name=f"{node.name}_q4",
            domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=group_size, accuracy_level=accuracy_level))
        converted += 1
    if not converted:
        raise PocketLMError(f"no MatMul weight lies on a symmetric int4 grid of group {group_size}: "
                            "quantize the source first (`pocketlm quantize --scheme w4-awq`)")
    still_used = {i for nd in new_nodes for i in nd.input}
    kept = [i for i in model.graph.initializer if i.name not in drop or i.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    onnx.checker.check_model(str(path))
    return converted
