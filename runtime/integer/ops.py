"""The op vocabulary the integer-only decoder is written in, with ONNX's semantics, run by numpy.

The decoder step (integer/model.py) and its arithmetic (integer/arith.py) are written once against
this vocabulary. NumpyOps executes it and so *defines* the exact integers; the toolchain's ONNX
emitter implements the same method names by emitting one ONNX operator each, so the exported graph
is the same computation, node for node, and must reproduce these integers bit for bit.

Rules both implementations keep (ONNX's):
- binary ops take operands of one dtype (a Python int operand takes the other's dtype) and
  broadcast numpy-style; nothing is promoted silently;
- integer division truncates toward zero (ONNX Div, C's `/`), never floors;
- matmuls are exact: MatMulInteger int8 x int8 -> int32, MatMul on int32/int64 operands. numpy has
  no integer BLAS, so they run in float64, which is exact while every partial sum stays below 2^53;
  the result is checked against its dtype's range, because ONNX Runtime would wrap.
"""

from __future__ import annotations

import numpy as np

INT_DTYPES = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8)}
_EXACT_F64 = 2.0**53


def _int(x) -> np.ndarray:
    if x.dtype not in INT_DTYPES and x.dtype != np.bool_:
        raise TypeError(f"integer-only arithmetic got a {x.dtype} tensor")
    return x


class NumpyOps:
    """The reference implementation: every method returns a numpy array."""

    def const(self, value, dtype=None, name: str | None = None, bits: int | None = None) -> np.ndarray:
        """bits: the values fit signed `bits`-bit integers, so an emitter may store them packed
        (ONNX INT4); the tensor itself keeps its dtype."""
        array = _int(np.asarray(value, dtype=dtype))
        if bits is not None and array.size and (array.min() < -(1 << (bits - 1)) or array.max() >= 1 << (bits - 1)):
            raise OverflowError(f"constant {name or ''} does not fit {bits}-bit integers")
        return array

    def _pair(self, a, b) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(a) if isinstance(a, np.generic) else a
        b = np.asarray(b) if isinstance(b, np.generic) else b
        if not isinstance(a, np.ndarray):
            a = np.asarray(a, dtype=b.dtype)
        if not isinstance(b, np.ndarray):
            b = np.asarray(b, dtype=a.dtype)
        if a.dtype != b.dtype:
            raise TypeError(f"operands of one op must share a dtype (ONNX), got {a.dtype} and {b.dtype}")
        return _int(a), _int(b)

    # -- elementwise ---------------------------------------------------------------------------
    def add(self, a, b):
        a, b = self._pair(a, b)
        return a + b

    def sub(self, a, b):
        a, b = self._pair(a, b)
        return a - b

    def mul(self, a, b):
        a, b = self._pair(a, b)
        return a * b

    def div(self, a, b):
        """Truncating integer division (ONNX Div on integers)."""
        a, b = self._pair(a, b)
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q).astype(a.dtype)

    def maximum(self, a, b):
        a, b = self._pair(a, b)
        return np.maximum(a, b)

    def minimum(self, a, b):
        a, b = self._pair(a, b)
        return np.minimum(a, b)

    def abs(self, x):
        return np.abs(_int(x))

    def neg(self, x):
        return -_int(x)

    def sign(self, x):
        return np.sign(_int(x)).astype(x.dtype)

    def clip(self, x, lo: int, hi: int):
        return np.clip(_int(x), np.asarray(lo, x.dtype), np.asarray(hi, x.dtype))

    def cast(self, x, dtype):
        return _int(x).astype(dtype)

    def where(self, cond, a, b):
        a, b = self._pair(a, b)
        if cond.dtype != np.bool_:
            raise TypeError("where() needs a boolean condition")
        return np.where(cond, a, b)

    def greater(self, a, b):
        a, b = self._pair(a, b)
        return a > b

    def greater_equal(self, a, b):
        a, b = self._pair(a, b)
        return a >= b

    def equal(self, a, b):
        a, b = self._pair(a, b)
        return a == b

    def logical_and(self, a, b):
        return np.logical_and(a, b)

    # -- reductions and indexing ---------------------------------------------------------------
    def reduce_max(self, x, axis: int = -1):
        return np.max(_int(x), axis=axis, keepdims=True)

    def reduce_sum(self, x, axis: int = -1):
        return np.sum(_int(x), axis=axis, keepdims=True, dtype=x.dtype)

    def gather(self, table, indices, axis: int = 0):
        return np.take(_int(table), indices, axis=axis)

    # -- shapes ---------------------------------------------------------------------------------
    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def transpose(self, x, perm):
        return np.ascontiguousarray(np.transpose(x, perm))

    def concat(self, xs, axis: int):
        if len({x.dtype for x in xs}) != 1:
            raise TypeError("concat needs one dtype")
        return np.concatenate(xs, axis=axis)

    def slice(self, x, start: int, end: int, axis: int):
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, end)
        return x[tuple(index)]

    # -- matmuls --------------------------------------------------------------------------------
    def matmul_integer(self, a, b):
        """int8 x int8 -> int32 (ONNX MatMulInteger without zero points)."""
        if a.dtype != np.int8 or b.dtype != np.int8:
            raise TypeError(f"matmul_integer takes int8 operands, got {a.dtype} and {b.dtype}")
        return self._exact_matmul(a, b, np.int32)

    def matmul(self, a, b):
        a, b = self._pair(a, b)
        if a.dtype not in (np.int32, np.int64):
            raise TypeError(f"integer MatMul takes int32 or int64 operands, got {a.dtype}")
        return self._exact_matmul(a, b, a.dtype)

    @staticmethod
    def _exact_matmul(a, b, dtype):
        k = a.shape[-1]
        bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * k
        if bound >= _EXACT_F64:
            raise OverflowError(f"matmul partial sums may reach {bound:.3g}: beyond float64's exact integers")
        out = np.matmul(a.astype(np.float64), b.astype(np.float64))
        info = np.iinfo(dtype)
        if out.size and (out.min() < info.min or out.max() > info.max):
            raise OverflowError(f"matmul result leaves {np.dtype(dtype)}; ONNX Runtime would wrap it")
        return out.astype(dtype)
