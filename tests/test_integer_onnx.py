"""The integer-only ONNX graph reproduces the numpy reference bit for bit: each primitive of
runtime/integer/arith.py emitted through OnnxOps and run by ONNX Runtime, on edge and random values,
then the whole decoder step of a tiny model over a token stream that wraps the cache's ring."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from pocketlm.runtime.integer import arith as A
from pocketlm.runtime.integer.ops import NumpyOps
from pocketlm.runtime.quant import fixed_point as F
from pocketlm.toolchain.export.onnx_ops import ONNX_DTYPE, OnnxOps

RNG = np.random.default_rng(1)
I64 = np.int64
EDGES = np.array([F.INT32_MIN, F.INT32_MIN + 1, -(1 << 30), -5, -3, -2, -1, 0, 1, 2, 3, 5, 1 << 30, F.INT32_MAX], I64)


def both(fn, *arrays):
    """fn(ops, *tensors) on NumpyOps and as an ONNX graph run by ONNX Runtime: (numpy outputs, ORT outputs)."""
    expected = fn(NumpyOps(), *arrays)
    expected = expected if isinstance(expected, tuple) else (expected,)
    ops = OnnxOps()
    inputs = [ops.input(f"in{i}", a.dtype) for i, a in enumerate(arrays)]
    outs = fn(ops, *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for k, o in enumerate(outs):
        ops.output(o, f"out{k}")
    graph = helper.make_graph(
        ops.nodes, "primitive",
        [helper.make_tensor_value_info(f"in{i}", ONNX_DTYPE[a.dtype], a.shape) for i, a in enumerate(arrays)],
        [helper.make_tensor_value_info(f"out{k}", ONNX_DTYPE[o.dtype], None) for k, o in enumerate(outs)],
        ops.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {f"in{i}": a for i, a in enumerate(arrays)})
    return expected, tuple(got)


def assert_bit_exact(fn, *arrays):
    expected, got = both(fn, *arrays)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype and e.shape == g.shape
        assert np.array_equal(e, g), f"{int((e != g).sum())} of {e.size} values differ"


def int32_values(n):
    return np.concatenate([EDGES, RNG.integers(F.INT32_MIN, F.INT32_MAX, n, endpoint=True)]).astype(I64)


def test_srdhm_rdpot_and_mbqm_are_bit_exact_in_onnx_runtime():
    a, b = np.meshgrid(int32_values(50), int32_values(50))
    assert_bit_exact(A.srdhm, a.ravel(), b.ravel())
    x = int32_values(5000)
    assert_bit_exact(A.rdpot, x, RNG.integers(0, 63, x.shape).astype(I64))
    m0 = RNG.integers(1 << 30, 1 << 31, x.shape).astype(I64)
    assert_bit_exact(A.mbqm, x, m0, RNG.integers(-31, 63, x.shape).astype(I64))


def test_bitlength_and_isqrt_are_bit_exact_in_onnx_runtime():
    n = np.concatenate([np.arange(0, 5000), RNG.integers(0, 1 << 62, 5000), [(1 << 62) - 1]]).astype(I64)[:, None]
    assert_bit_exact(A.bitlength, n)
    assert_bit_exact(A.isqrt, n)


def test_per_token_quantization_and_requantization_are_bit_exact_in_onnx_runtime():
    x = (RNG.integers(-(1 << 31) + 1, 1 << 31, (48, 64)) >> RNG.integers(0, 31, (48, 1))).astype(I64)
    x[0] = 0
    assert_bit_exact(A.quantize_per_token, x)
    acc = RNG.integers(-(1 << 24), 1 << 24, (48, 40)).astype(np.int32)
    amax = RNG.integers(1, 1 << 31, (48, 1)).astype(I64)
    m0 = RNG.integers(1 << 30, 1 << 31, 40).astype(I64)
    shift = RNG.integers(-10, 40, 40).astype(I64)
    assert_bit_exact(lambda ops, a, b, c, d: A.requantize_per_token(ops, a, b, c, d, 6), acc, amax, m0, shift)


def test_integer_rmsnorm_softmax_silu_and_rope_are_bit_exact_in_onnx_runtime():
    x = (RNG.normal(0, 1, (12, 96)) * np.exp(RNG.uniform(0, 20, (12, 1)))).astype(I64)
    gain = RNG.integers(-(1 << 30), 1 << 30, 96).astype(I64)
    assert_bit_exact(A.rmsnorm, x, gain, A.rmsnorm_eps_table(1e-5, 96, 1e-4))
    scores = RNG.integers(-(40 << 16), 40 << 16, (3, 10, 70)).astype(I64)
    visible = RNG.random((10, 70)) < 0.6
    visible[:, 0] = True
    assert_bit_exact(lambda ops, s, v: A.softmax(ops, s, v, 16), scores, visible)
    g = RNG.integers(F.INT32_MIN + 1, F.INT32_MAX, 20000).astype(I64)
    m0, shift = F.quantize_multiplier(3e-7 * 2**24)
    assert_bit_exact(lambda ops, t: A.silu(ops, t, ops.const(np.int64(m0)), ops.const(np.int64(shift)), 24), g)
    q = RNG.integers(-(1 << 31), 1 << 31, (4, 7, 16)).astype(I64)
    cos, sin = (RNG.integers(-(1 << 14), (1 << 14) + 1, (7, 16)).astype(I64) for _ in range(2))
    assert_bit_exact(lambda ops, a, c, s: A.rope(ops, a, c, s, 16), q, cos, sin)


@pytest.mark.parametrize("k", [576, 1536])
def test_matmul_integer_does_not_saturate_at_the_int8_extremes(k):
    """x86 kernels without VNNI add u8 x s8 pairs in int16 and can saturate; pocketlm's codes stay in
    [-127, 127], and this checks the worst case of that range on this machine's ONNX Runtime."""
    a = np.full((4, k), 127, np.int8)
    a[1] = -127
    a[2] = RNG.integers(-127, 128, k)
    b = np.full((k, 8), 127, np.int8)
    b[:, 1] = -127
    b[:, 2] = RNG.integers(-127, 128, k)
    assert_bit_exact(lambda ops, x, w: ops.matmul_integer(x, w), a, b)
