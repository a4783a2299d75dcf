"""ONNX Runtime's fast quantized path: each MatMul whose constant weight lies on the recorded int4 grid
becomes a com.microsoft MatMulNBits with the packed codes and per-group scales, and one on an int8
per-channel grid (the LM head with `--head int8`) an 8-bit MatMulNBits. A tied embedding's lookup
then reads the head's packed codes too (GatherBlockQuantized), so no float copy of the table stays.

The quantize stage stores dequantized weights (scale * q, symmetric, |q| <= qmax); the largest |w| of
a quantized group is therefore exactly qmax * scale, so the codes and scales are recovered exactly
from the float weights. A weight on neither grid (a float LM head, say) is left alone: the check is
on the values, not on names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pocketlm.runtime.errors import PocketLMError

MS_DOMAIN = "com.microsoft"
QMAX = {4: 7, 8: 127}  # symmetric codes, stored unsigned as q + 2^(bits-1) (MatMulNBits' default zero point)
INT8_BLOCKS = (64, 32)  # an int8 per-channel weight as MatMulNBits blocks that all carry the row's scale


def grid_codes(w: np.ndarray, group: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray] | None:
    """w [N, K] -> (codes int8 [N, K/group, group], scales float32 [N, K/group]) if w lies on the
    symmetric `bits`-bit grid with one scale per group of `group` inputs (group = K: per channel)."""
    n, k = w.shape
    if k % group:
        return None
    qmax = QMAX[bits]
    g = w.reshape(n, k // group, group).astype(np.float32)
    scale = np.abs(g).max(-1) / qmax
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint(g / safe[..., None])
    if np.abs(q).max() > qmax:
        return None
    recon = q * safe[..., None]
    if not np.allclose(recon, g, rtol=1e-6, atol=1e-12 + 1e-6 * float(np.abs(g).max())):
        return None
    return q.astype(np.int8), safe


def int8_channel_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """w [N, K] on an int8 per-output-channel grid -> (codes [N, K], scales [N]), else None."""
    found = grid_codes(w, w.shape[1], bits=8)
    return None if found is None else (found[0].reshape(w.shape), found[1][:, 0])


def _as_nbits(w: np.ndarray, group_size: int):
    """(bits, block size, codes [N, K/block, block], scales [N, K/block]) for an on-grid weight, or None."""
    found = grid_codes(w, group_size, 4)
    if found is not None:
        return 4, group_size, *found
    block = next((b for b in INT8_BLOCKS if w.shape[1] % b == 0), None)
    found = int8_channel_codes(w) if block else None
    if found is None:
        return None
    codes, scales = found
    n, k = codes.shape
    return 8, block, codes.reshape(n, k // block, block), np.repeat(scales[:, None], k // block, 1)


def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """int8 codes [N, blocks, group] in [-7, 7] -> uint8 [N, blocks, group/2], low nibble first."""
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _lookups_from_packed(nodes: list, packed_of: dict, initializers) -> tuple[list, int | None]:
    """A tied embedding's Gather reads the head's packed codes (com.microsoft GatherBlockQuantized,
    rows dequantized on lookup) instead of keeping the float table: the same values, one table."""
    from onnx import helper, numpy_helper

    out, bits_of_lookup = [], None
    for node in nodes:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in packed_of or axis != 0:
            out.append(node)
            continue
        data, scales, bits, block, n, k = packed_of[node.input[0]]
        name, ids, y = node.name or f"{data}_lookup", node.input[1], node.output[0]
        if f"{scales}_rows" not in {i.name for i in initializers}:
            initializers.extend([numpy_helper.from_array(np.array([n, k // block, 1], np.int64), f"{scales}_rows"),
                                 numpy_helper.from_array(np.array([k], np.int64), f"{data}_width")])
        out += [
            helper.make_node("Reshape", [scales, f"{scales}_rows"], [f"{name}_scales"], name=f"{name}_scales"),
            helper.make_node("GatherBlockQuantized", [data, ids, f"{name}_scales"], [f"{name}_blocks"], name=name,
                             domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0, quantize_axis=2),
            helper.make_node("Shape", [ids], [f"{name}_ids_shape"], name=f"{name}_ids_shape"),
            helper.make_node("Concat", [f"{name}_ids_shape", f"{data}_width"], [f"{name}_shape"], name=f"{name}_shape", axis=0),
            helper.make_node("Reshape", [f"{name}_blocks", f"{name}_shape"], [y], name=f"{name}_rows"),
        ]
        bits_of_lookup = bits
    return out, bits_of_lookup


def to_matmul_nbits(path: Path, group_size: int, accuracy_level: int = 0) -> dict[int, int]:
    """Rewrite the ONNX model at `path` in place (its external data file is rewritten too).
    Returns how many MatMuls were converted, by bit width, and the tied lookup's bits ("embedding"). accuracy_level: ORT's compute type for the
    activation side (0: as the input, float32; 4: int8, the fastest on CPUs with int8 dot products)."""
    import onnx
    from onnx import helper, numpy_helper

    if group_size < 16 or group_size & (group_size - 1):
        raise PocketLMError(f"ONNX Runtime's MatMulNBits needs a power-of-two group size of at least 16, not {group_size}")
    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    # a tied LM head reads the embedding matrix through a Transpose: its weight is that matrix, transposed
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits and [a.ints for a in n.attribute if a.name == "perm"] == [[1, 0]]}
    new_nodes, converted, drop, packed_of = [], {4: 0, 8: 0}, set(), {}
    for node in model.graph.node:
        b_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        found = None
        if b_name in inits and len(inits[b_name].dims) == 2:
            found = _as_nbits(numpy_helper.to_array(inits[b_name]).T, group_size)  # weight: [K, N], x @ B
        elif b_name in transposed and len(inits[transposed[b_name]].dims) == 2:
            found = _as_nbits(numpy_helper.to_array(inits[transposed[b_name]]), group_size)  # stored [N, K]
        if found is None:
            new_nodes.append(node)
            continue
        bits, block, codes, scales = found
        n, k = codes.shape[0], codes.shape[1] * codes.shape[2]
        base = transposed.get(b_name, b_name)
        data = pack_uint4(codes) if bits == 4 else (codes.astype(np.int16) + 128).astype(np.uint8)
        packed = numpy_helper.from_array(data, f"{base}_q{bits}")
        scale_t = numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{base}_scales")
        model.graph.initializer.extend([packed, scale_t])
        drop.add(base)
        packed_of[base] = (packed.name, scale_t.name, bits, block, n, k)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], packed.name, scale_t.name], list(node.output), name=f"{node.name}_q{bits}",
            domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
        converted[bits] += 1
    new_nodes, converted["embedding"] = _lookups_from_packed(new_nodes, packed_of, model.graph.initializer)
    used = {i for nd in new_nodes for i in nd.input}
    new_nodes = [nd for nd in new_nodes if not (nd.op_type == "Transpose" and nd.output[0] in transposed and nd.output[0] not in used)]
    if not converted[4]:
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
