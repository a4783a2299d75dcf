"""ONNX Runtime backend. The cache lives on the host as numpy rings bound zero-copy as the program's
past inputs; the program returns only the new K/V slots, which are written into the rings in place,
so no step copies the whole cache.

Slots fill in order, so until the ring is full a step can only see its leading slots. A program
whose cache length is dynamic is given just those: each ring [1, n_kv, rows, hd] is kept compact at
a capacity of whole ROW_BLOCKs that covers the filled slots (a head's rows then lie next to the
next head's, so the bound array is a prefix of the buffer, with no copy), grown by moving the heads
apart when a step needs more (every ROW_BLOCK tokens; the ring's whole length once it is full), and
the mask is cut to those rows. A program with a static cache length (integer-only programs, bundles
exported before) is given the whole ring.

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
ROW_BLOCK = 32  # cache rows are bound in whole blocks of slots, so the rings are moved apart every 32 tokens
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

    def __init__(self, path: Path, cache_shapes, threads: int = 2, program: dict | None = None, row_block: int = ROW_BLOCK):
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
        self.past, self.outputs = past_names(n), ["logits", *present_names(n)]
        self._input_names = STEP_INPUTS if self.logits_scale is None else INTEGER_STEP_INPUTS
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self.head_dim = inputs["cos_win"][1]
        self.shapes = [s for s in cache_shapes for _ in ("key", "value")]  # [1, n_kv, physical_len, hd] each
        self.physical_len = self.shapes[0][2]
        dtype = np.float32 if self.logits_scale is None else np.int16
        self.buffers = [np.zeros(int(np.prod(s)), dtype) for s in self.shapes]  # each viewed at the capacity
        self.io = self.session.io_binding()
        # a static cache length (integer-only programs, bundles exported before): the whole ring, always
        self.row_block = self.physical_len if isinstance(inputs[self.past[0]][2], int) else row_block
        self._bound, self._bound_key = {}, None
        self._set_capacity(min(self.row_block, self.physical_len))

    def step(self, inputs: StepInputs) -> np.ndarray:
        if self.logits_scale is None:
            arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.cos_sink, inputs.sin_sink, inputs.mask)
        else:
            arrays = integer_inputs(inputs)
        # the slots this step may see and those its valid tokens write (the trash slot aside) must fit
        self._grow(min(inputs.n_cached + inputs.n_valid, self.physical_len - 1))
        width = inputs.tokens.shape[1]
        feeds, mask, logits, fresh = self._buffers(width)
        *arrays, full_mask = arrays
        for buffer, array in zip(feeds, arrays):
            buffer[...] = array
        mask[:, : self.capacity] = full_mask[:, : self.capacity]
        mask[:, self.capacity :] = full_mask[:, self.physical_len :]
        self.session.run_with_iobinding(self.io)
        n = inputs.n_valid  # padded positions write the trash slot, which nobody reads: skipped
        if n == 1:
            slot = int(inputs.slots[0])  # a plain view
            for cache, new in zip(self.caches, fresh):  # new: [1, n_kv, P, hd]
                cache[:, :, slot] = new[:, :, 0]
        else:
            for cache, new in zip(self.caches, fresh):
                cache[:, :, inputs.slots[:n]] = new[:, :, :n]
        out = logits[0].copy()  # the buffer is overwritten by the next step; a caller may keep these
        return out if self.logits_scale is None else dequantize_logits(out, self.logits_scale)

    def _grow(self, need: int) -> None:
        """Make the capacity cover `need` slots, in whole row blocks (the ring's length at most): each
        head's rows move up to their new place, the highest head first, so none is overwritten before
        it has moved, and the rows they open are cleared."""
        if need <= self.capacity:
            return
        old = self.capacity
        before = self.caches  # views of the same buffers at the old capacity
        self._set_capacity(min(-(-need // self.row_block) * self.row_block, self.physical_len))
        for was, cache in zip(before, self.caches):
            for h in reversed(range(cache.shape[1])):
                cache[:, h, :old] = was[:, h]  # numpy copies through a temporary where the two overlap
                cache[:, h, old:] = 0

    def _set_capacity(self, capacity: int) -> None:
        """View each ring's buffer as [1, n_kv, capacity, hd] and bind those views as the past inputs."""
        self.capacity = capacity
        self.caches = [b[: s[0] * s[1] * capacity * s[3]].reshape(s[0], s[1], capacity, s[3])
                       for b, s in zip(self.buffers, self.shapes)]
        for name, cache in zip(self.past, self.caches):
            self.io.bind_input(name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)

    def _buffers(self, width: int):
        """Input and output arrays of a step of `width` positions, bound to the program when the
        width (a decode step or a prefill chunk) or the capacity changes: ONNX Runtime reads and
        writes them in place, so a step copies a few small arrays instead of binding 6 inputs and
        2L + 1 outputs anew. The mask is [P, capacity + P], a prefix of a buffer made for the whole ring."""
        if width not in self._bound:
            self._bound[width] = self._allocate(width)
        feeds, mask_buffer, logits, fresh = self._bound[width]
        mask = mask_buffer[: width * (self.capacity + width)].reshape(width, self.capacity + width)
        if self._bound_key != (width, self.capacity):
            for name, array in zip(self._input_names, (*feeds, mask)):
                self.io.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            for name, array in zip(self.outputs, (logits, *fresh)):
                self.io.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            self._bound_key = (width, self.capacity)
        return feeds, mask, logits, fresh

    def _allocate(self, width: int):
        types = {i.name: ORT_TYPES[i.type] for i in (*self.session.get_inputs(), *self.session.get_outputs())}
        *names, mask_name = self._input_names
        feeds = [np.zeros((1, width) if n == "input_ids" else (width, self.head_dim), types[n]) for n in names]
        mask = np.zeros(width * (self.physical_len + width), types[mask_name])
        logits = np.zeros((1, width, self.vocab), types["logits"])
        fresh = [np.zeros((*s[:2], width, s[3]), types[n]) for n, s in zip(self.outputs[1:], self.shapes)]
        return feeds, mask, logits, fresh

    def reset(self) -> None:
        for buffer in self.buffers:
            buffer.fill(0)
        self._set_capacity(min(self.row_block, self.physical_len))
