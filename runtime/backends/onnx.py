"""ONNX Runtime backend. The cache lives on the host as numpy rings bound zero-copy as the program's
past inputs; the program returns only the new K/V slots, which are written into the rings in place,
so no step copies the whole cache.

An integer-only program (the manifest's program entry has "interface": "integer") takes the same
step in integer form (runtime/integer/model.integer_inputs), keeps an int16 cache and returns int32
logits, which are read as int32 x logits_scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..integer.model import dequantize_logits, integer_inputs
from ..sink_cache import StepInputs

STEP_INPUTS = ("input_ids", "cos_win", "sin_win", "cos_sink", "sin_sink", "attention_bias")
INTEGER_STEP_INPUTS = ("input_ids", "cos_win", "sin_win", "cos_sink", "sin_sink", "attention_visible")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
             "tensor(bool)": np.bool_}


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


class OnnxBackend:
    name = "onnx"
    decode_from = 0
    causal_until = 0  # every chunk takes the masked step

    def __init__(self, path: Path, cache_shapes, threads: int = 2, program: dict | None = None):
        import onnxruntime as ort

        program = program or {}
        self.logits_scale = program.get("logits_scale") if program.get("interface") == "integer" else None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # ONNX Runtime's default: its workers spin between a step's nodes instead of sleeping (int4
        # SmolLM2, 2 threads, 3 fresh processes each: decode 149-154 tok/s with spinning off, 160-168 on)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        n = len(cache_shapes)
        cache_dtype = np.float32 if self.logits_scale is None else np.int16
        self.caches = [np.zeros(s, cache_dtype) for s in cache_shapes for _ in ("key", "value")]
        self.io = self.session.io_binding()
        for name, cache in zip(past_names(n), self.caches):
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(cache))  # shares memory
        self.outputs = ["logits", *present_names(n)]
        self._input_names = STEP_INPUTS if self.logits_scale is None else INTEGER_STEP_INPUTS
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self._bound, self._bound_width = {}, None

    def step(self, inputs: StepInputs) -> np.ndarray:
        if self.logits_scale is None:
            arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.cos_sink, inputs.sin_sink, inputs.mask)
        else:
            arrays = integer_inputs(inputs)
        feeds, logits, fresh = self._buffers(inputs.tokens.shape[1])
        for buffer, array in zip(feeds, arrays):
            buffer[...] = array
        self.session.run_with_iobinding(self.io)
        slots = int(inputs.slots[0]) if len(inputs.slots) == 1 else inputs.slots  # one slot: a plain view
        for cache, new in zip(self.caches, fresh):  # new: [1, n_kv, P, hd]
            cache[:, :, slots] = new[:, :, 0] if len(inputs.slots) == 1 else new
        out = logits[0].copy()  # the buffer is overwritten by the next step; a caller may keep these
        return out if self.logits_scale is None else dequantize_logits(out, self.logits_scale)

    def _buffers(self, width: int):
        """Input and output arrays of a step of `width` positions, bound to the program once per
        width (a decode step or a prefill chunk): ONNX Runtime reads and writes them in place, so a
        step copies a few small arrays instead of binding 6 inputs and 2L + 1 outputs anew."""
        if self._bound_width != width:
            if width not in self._bound:
                self._bound[width] = self._allocate(width)
            feeds, logits, fresh = self._bound[width]
            for name, array in zip(self._input_names, feeds):
                self.io.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            for name, array in zip(self.outputs, (logits, *fresh)):
                self.io.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            self._bound_width = width
        return self._bound[width]

    def _allocate(self, width: int):
        types = {i.name: ORT_TYPES[i.type] for i in (*self.session.get_inputs(), *self.session.get_outputs())}
        physical_len = self.caches[0].shape[2]
        shapes = {"input_ids": (1, width), "attention_bias": (width, physical_len + width),
                  "attention_visible": (width, physical_len + width)}
        head_dim = self.caches[0].shape[3]
        feeds = [np.zeros(shapes.get(n, (width, head_dim)), types[n]) for n in self._input_names]
        logits = np.zeros((1, width, self.vocab), types["logits"])
        fresh = [np.zeros((*c.shape[:2], width, c.shape[3]), types[n]) for n, c in zip(self.outputs[1:], self.caches)]
        return feeds, logits, fresh

    def reset(self) -> None:
        for cache in self.caches:
            cache.fill(0)
