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

    def step(self, inputs: StepInputs) -> np.ndarray:
        if self.logits_scale is None:
            names = STEP_INPUTS
            arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.cos_sink, inputs.sin_sink, inputs.mask)
        else:
            names, arrays = INTEGER_STEP_INPUTS, integer_inputs(inputs)
        for name, arr in zip(names, arrays):
            self.io.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.outputs:
            self.io.bind_output(name)
        self.session.run_with_iobinding(self.io)
        logits, *new = self.io.copy_outputs_to_cpu()
        for cache, fresh in zip(self.caches, new):  # fresh: [1, n_kv, P, hd]
            cache[:, :, inputs.slots] = fresh
        return logits[0] if self.logits_scale is None else dequantize_logits(logits[0], self.logits_scale)

    def reset(self) -> None:
        for cache in self.caches:
            cache.fill(0)
