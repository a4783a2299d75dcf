"""The integer op vocabulary (pocketlm/runtime/integer/ops.py) as an ONNX graph builder.

Each method emits the one ONNX operator that NumpyOps' method of the same name imitates, so code
written against the vocabulary (the integer decoder step) becomes a graph computing the same
integers. Constants become initializers (deduplicated by value); dtypes are tracked so a mismatch
fails here, at build time, exactly where NumpyOps would refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ONNX_DTYPE = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL}


def int4_initializer(array: np.ndarray, name: str):
    """Signed values in [-8, 7] as an ONNX INT4 tensor: row-major, two per byte, the first in the low nibble."""
    flat = array.astype(np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"{name}: values outside int4's range")
    nibbles = (np.concatenate([flat, np.zeros(flat.size % 2, np.int8)]).view(np.uint8) & 0x0F).reshape(-1, 2)
    packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, array.shape, packed.tobytes(), raw=True)


@dataclass(frozen=True)
class Sym:
    """A tensor of the graph being built: its value name and element type."""

    name: str
    dtype: np.dtype


class OnnxOps:
    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._consts: dict = {}
        self._count = 0

    def _fresh(self, op: str) -> str:
        self._count += 1
        return f"{op.lower()}_{self._count}"

    def _node(self, op: str, inputs, dtype, **attrs) -> Sym:
        out = self._fresh(op)
        self.nodes.append(helper.make_node(op, [i.name for i in inputs], [out], name=f"{out}_node", **attrs))
        return Sym(out, np.dtype(dtype))

    def input(self, name: str, dtype) -> Sym:
        return Sym(name, np.dtype(dtype))

    def output(self, x: Sym, name: str) -> Sym:
        self.nodes.append(helper.make_node("Identity", [x.name], [name], name=f"{name}_node"))
        return Sym(name, x.dtype)

    def const(self, value, dtype=None, name: str | None = None, bits: int | None = None) -> Sym:
        """An initializer; with bits=4 the int8 values are stored packed as ONNX INT4 (two per byte)
        and a Cast widens them back to int8, which ONNX Runtime folds once when it loads the graph."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes(), bits)
        if key not in self._consts:
            init_name = name if name and name not in {i.name for i in self.initializers} else self._fresh("const")
            if bits == 4:
                self.initializers.append(int4_initializer(array, f"{init_name}.int4"))
                self.nodes.append(helper.make_node("Cast", [f"{init_name}.int4"], [init_name], name=f"{init_name}_cast",
                                                   to=ONNX_DTYPE[array.dtype]))
            elif bits is None:
                self.initializers.append(numpy_helper.from_array(array, init_name))
            else:
                raise ValueError(f"no packed storage for {bits}-bit constants")
            self._consts[key] = Sym(init_name, array.dtype)
        return self._consts[key]

    def _pair(self, a, b) -> tuple[Sym, Sym]:
        if not isinstance(a, Sym):
            a = self.const(np.asarray(a, dtype=b.dtype))
        if not isinstance(b, Sym):
            b = self.const(np.asarray(b, dtype=a.dtype))
        if a.dtype != b.dtype:
            raise TypeError(f"operands of one op must share a dtype (ONNX), got {a.dtype} and {b.dtype}")
        return a, b

    def _binary(self, op: str, a, b, out_dtype=None) -> Sym:
        a, b = self._pair(a, b)
        return self._node(op, [a, b], out_dtype or a.dtype)

    # -- elementwise ---------------------------------------------------------------------------
    def add(self, a, b):
        return self._binary("Add", a, b)

    def sub(self, a, b):
        return self._binary("Sub", a, b)

    def mul(self, a, b):
        return self._binary("Mul", a, b)

    def div(self, a, b):
        return self._binary("Div", a, b)

    def maximum(self, a, b):
        return self._binary("Max", a, b)

    def minimum(self, a, b):
        return self._binary("Min", a, b)

    def abs(self, x):
        return self._node("Abs", [x], x.dtype)

    def neg(self, x):
        return self._node("Neg", [x], x.dtype)

    def sign(self, x):
        return self._node("Sign", [x], x.dtype)

    def clip(self, x, lo: int, hi: int):
        return self._node("Clip", [x, self.const(np.asarray(lo, x.dtype)), self.const(np.asarray(hi, x.dtype))], x.dtype)

    def cast(self, x, dtype):
        return self._node("Cast", [x], dtype, to=ONNX_DTYPE[np.dtype(dtype)])

    def where(self, cond, a, b):
        a, b = self._pair(a, b)
        return self._node("Where", [cond, a, b], a.dtype)

    def greater(self, a, b):
        return self._binary("Greater", a, b, np.bool_)

    def greater_equal(self, a, b):
        return self._binary("GreaterOrEqual", a, b, np.bool_)

    def equal(self, a, b):
        return self._binary("Equal", a, b, np.bool_)

    def logical_and(self, a, b):
        return self._node("And", [a, b], np.bool_)

    # -- reductions and indexing ---------------------------------------------------------------
    def reduce_max(self, x, axis: int = -1):
        return self._node("ReduceMax", [x, self.const(np.array([axis], np.int64))], x.dtype, keepdims=1)

    def reduce_sum(self, x, axis: int = -1):
        return self._node("ReduceSum", [x, self.const(np.array([axis], np.int64))], x.dtype, keepdims=1)

    def gather(self, table, indices, axis: int = 0):
        return self._node("Gather", [table, indices], table.dtype, axis=axis)

    # -- shapes ---------------------------------------------------------------------------------
    def reshape(self, x, shape):
        return self._node("Reshape", [x, self.const(np.array(shape, np.int64))], x.dtype)

    def transpose(self, x, perm):
        return self._node("Transpose", [x], x.dtype, perm=list(perm))

    def concat(self, xs, axis: int):
        if len({x.dtype for x in xs}) != 1:
            raise TypeError("concat needs one dtype")
        return self._node("Concat", list(xs), xs[0].dtype, axis=axis)

    def slice(self, x, start: int, end: int, axis: int):
        args = [self.const(np.array([v], np.int64)) for v in (start, end, axis)]
        return self._node("Slice", [x, *args], x.dtype)

    # -- matmuls --------------------------------------------------------------------------------
    def matmul_integer(self, a, b):
        if a.dtype != np.int8 or b.dtype != np.int8:
            raise TypeError(f"matmul_integer takes int8 operands, got {a.dtype} and {b.dtype}")
        return self._node("MatMulInteger", [a, b], np.int32)

    def matmul(self, a, b):
        a, b = self._pair(a, b)
        return self._node("MatMul", [a, b], a.dtype)
