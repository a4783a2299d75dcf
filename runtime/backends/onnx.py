"""ONNX Runtime backend. The cache lives on the host as numpy rings bound zero-copy to the program.

The float program (one com.microsoft GroupQueryAttention per layer, toolchain/export/onnx_export.py)
takes each ring as both its past input and its present output, one buffer: the kernel writes the
step's K/V at rows [T - P, T) and attends to rows [0, T), T = the filled slots plus the step's own
(total_sequence_length), with the host's mask as its additive bias. Slots fill in order, so before
the ring wraps a token's row is its slot. Once the ring is full the kernel writes the token into the
spare row after it (the trash slot), the bias hides the slot it evicts, and the host moves the token
into that slot after the step. The query is rotated once, at its true position: that suits every
window key (the window is contiguous), and the host keeps the sink rows re-rotated for it, by the
query's true minus in-cache position, from the sinks' keys as first written (the ExecuTorch
program's decode does the same in its graph). Chunks serve the positions before the ring wraps
(chunk_until); past that, tokens go one at a time, since each would rotate the sinks differently.

Each ring [1, n_kv, rows, hd] is kept compact at a capacity of whole ROW_BLOCKs that covers the
rows a step reads and writes (a head's rows then lie next to the next head's, so the bound array is
a prefix of the buffer, with no copy), grown by moving the heads apart when a step needs more
(every ROW_BLOCK tokens; the whole ring once it is full).

Programs exported before take the masked step: the mask [P, rows + P] over the cache and the step's
own tokens, the new K/V returned for the host to write into their slots, the query rotated twice
(cos_sink, sin_sink). Those with a static cache length (integer-only programs, older bundles) are
given the whole ring. An integer-only program (the manifest's program entry has "interface":
"integer") takes that step in integer form (runtime/integer/model.integer_inputs), keeps an int16
cache and returns int32 logits, which are read as int32 x logits_scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PocketLMError
from ..integer.model import dequantize_logits, integer_inputs
from ..sink_cache import StepInputs

STEP_INPUTS = ("input_ids", "cos", "sin", "attention_bias", "seqlens_k", "total_sequence_length")
MASKED_STEP_INPUTS = ("input_ids", "cos_win", "sin_win", "cos_sink", "sin_sink", "attention_bias")
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
    causal_until = 0  # every chunk takes the full step

    def __init__(self, path: Path, cache_shapes, threads: int = 2, program: dict | None = None, sink_size: int | None = None,
                 row_block: int = ROW_BLOCK):
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
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.shared = "seqlens_k" in inputs  # the cache is the present output too (GroupQueryAttention)
        if self.shared and sink_size is None:
            raise PocketLMError(f"'{path}' re-rotates its sink keys on the host: pass the bundle's sink_size")
        self.sink_size = sink_size or 0
        self._input_names = STEP_INPUTS if self.shared else MASKED_STEP_INPUTS if self.logits_scale is None else INTEGER_STEP_INPUTS
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self.head_dim = inputs["cos" if self.shared else "cos_win"][1]
        self.shapes = [s for s in cache_shapes for _ in ("key", "value")]  # [1, n_kv, physical_len, hd] each
        self.physical_len = self.shapes[0][2]
        self.cache_len = self.physical_len - 1  # the last row is the spare (trash) slot
        # multi-token steps serve the positions before the ring wraps (the module docstring)
        self.chunk_until = self.cache_len if self.shared else None
        dtype = np.float32 if self.logits_scale is None else np.int16
        self.buffers = [np.zeros(int(np.prod(s)), dtype) for s in self.shapes]  # each viewed at the capacity
        self.io = self.session.io_binding()
        # a static cache length (integer-only programs, bundles exported before): the whole ring, always
        self.row_block = self.physical_len if isinstance(inputs[self.past[0]][2], int) else row_block
        self._bound, self._bound_key, self._sinks = {}, None, None
        self._set_capacity(min(self.row_block, self.physical_len))

    def step(self, inputs: StepInputs) -> np.ndarray:
        out = self._step_shared(inputs) if self.shared else self._step_masked(inputs)
        return out if self.logits_scale is None else dequantize_logits(out, self.logits_scale)

    def _step_shared(self, inputs: StepInputs) -> np.ndarray:
        n, past = inputs.n_valid, inputs.n_cached  # the step's own tokens (no padding), the rows before them
        wrapped = past == self.cache_len
        if past + n > self.cache_len and not (wrapped and n == 1):
            raise PocketLMError(f"a {n}-token step after {past} cached tokens: this program takes chunks only while "
                                f"the ring fills (chunk_until {self.chunk_until}), then one token a step")
        total = past + n
        self._grow(total)
        if wrapped and self.sink_size:
            self._rotate_sinks(inputs)
        feeds, bias_buffer, logits, _ = self._buffers(n)
        feeds["input_ids"][...], feeds["cos"][...], feeds["sin"][...] = inputs.tokens[:, :n], inputs.cos_win[:n], inputs.sin_win[:n]
        feeds["seqlens_k"][0], feeds["total_sequence_length"][...] = total - 1, total
        bias = bias_buffer[: n * total].reshape(1, 1, n, total)  # the cache rows, then the step's own tokens
        bias[0, 0, :, :past] = inputs.mask[:n, :past]
        bias[0, 0, :, past:] = inputs.mask[:n, self.physical_len : self.physical_len + n]
        self.io.bind_input("attention_bias", "cpu", 0, bias.dtype, bias.shape, bias.ctypes.data)  # T grows each step
        self.session.run_with_iobinding(self.io)
        if wrapped:  # the token went to the spare row: into the slot it evicts
            slot = int(inputs.slots[0])
            for cache in self.caches:
                cache[:, :, slot] = cache[:, :, self.cache_len]
        return logits[0].copy()  # the buffer is overwritten by the next step; a caller may keep these

    def _rotate_sinks(self, inputs: StepInputs) -> None:
        """Write each layer's sink keys rotated by d = the query's true minus in-cache position, from
        the keys as the first tokens wrote them (at their true positions), kept from the first step
        after the wrap: the query, rotated at its true position, then sees each sink at its in-cache
        distance (runtime.sink_cache)."""
        s = self.sink_size
        keys = self.caches[0::2]
        if self._sinks is None:
            first = np.concatenate([k[0, :, :s] for k in keys])  # [all layers' kv heads, S, hd]
            half = first.shape[-1] // 2
            self._sinks = first, np.concatenate([-first[..., half:], first[..., :half]], axis=-1)  # rotate_half
        first, rotated = self._sinks
        cos_w, sin_w, cos_s, sin_s = inputs.cos_win[0], inputs.sin_win[0], inputs.cos_sink[0], inputs.sin_sink[0]
        # cos(a - b) and sin(a - b) from the query's two tables
        now = first * (cos_w * cos_s + sin_w * sin_s) + rotated * (sin_w * cos_s - cos_w * sin_s)
        row = 0
        for k in keys:
            k[0, :, :s] = now[row : row + k.shape[1]]
            row += k.shape[1]

    def _step_masked(self, inputs: StepInputs) -> np.ndarray:
        if self.logits_scale is None:
            arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.cos_sink, inputs.sin_sink, inputs.mask)
        else:
            arrays = integer_inputs(inputs)
        # the slots this step may see and those its valid tokens write (the trash slot aside) must fit
        self._grow(min(inputs.n_cached + inputs.n_valid, self.cache_len))
        width = inputs.tokens.shape[1]
        feeds, mask, logits, fresh = self._buffers(width)
        *arrays, full_mask = arrays
        for buffer, array in zip(feeds.values(), arrays):
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
        return logits[0].copy()

    def _grow(self, need: int) -> None:
        """Make the capacity cover `need` rows, in whole row blocks (the ring's length at most): each
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
        """View each ring's buffer as [1, n_kv, capacity, hd] and bind those views as the past inputs
        (and, for the shared-cache program, as the present outputs: the same memory)."""
        self.capacity = capacity
        self.caches = [b[: s[0] * s[1] * capacity * s[3]].reshape(s[0], s[1], capacity, s[3])
                       for b, s in zip(self.buffers, self.shapes)]
        for name, cache in zip(self.past, self.caches):
            self.io.bind_input(name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
        if self.shared:
            for name, cache in zip(self.outputs[1:], self.caches):
                self.io.bind_output(name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
        self._bound_key = None

    def _buffers(self, width: int):
        """Input and output arrays of a step of `width` positions, bound to the program when the
        width (a decode step or a prefill chunk) or the capacity changes: ONNX Runtime reads and
        writes them in place, so a step copies a few small arrays instead of binding every input
        and output anew. The masked program's mask [P, capacity + P] is a prefix of a buffer made
        for the whole ring (the shared-cache program's bias, whose length grows every step, too)."""
        if width not in self._bound:
            self._bound[width] = self._allocate(width)
        feeds, mask_buffer, logits, fresh = self._bound[width]
        mask = mask_buffer if self.shared else mask_buffer[: width * (self.capacity + width)].reshape(width, self.capacity + width)
        if self._bound_key != (width, self.capacity):
            bound = feeds if self.shared else {**feeds, self._input_names[-1]: mask}
            for name, array in bound.items():
                self.io.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            for name, array in zip(self.outputs, (logits, *fresh)):
                self.io.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            self._bound_key = (width, self.capacity)
        return feeds, mask, logits, fresh

    def _allocate(self, width: int):
        types = {i.name: ORT_TYPES[i.type] for i in (*self.session.get_inputs(), *self.session.get_outputs())}
        mask_name = "attention_bias" if self.shared else self._input_names[-1]
        shape = lambda name: (1, width) if name == "input_ids" else (width, self.head_dim)  # noqa: E731
        feeds = {n: np.zeros(shape(n), types[n]) for n in self._input_names if n not in (mask_name, *STEP_INPUTS[4:])}
        if self.shared:
            feeds["seqlens_k"], feeds["total_sequence_length"] = np.zeros(1, np.int32), np.zeros((), np.int32)
        mask = np.zeros(width * (self.physical_len + width), types[mask_name])
        logits = np.zeros((1, width, self.vocab), types["logits"])
        # the masked program returns the step's K/V for the host to write; the shared one writes the rings
        fresh = [] if self.shared else [np.zeros((*s[:2], width, s[3]), types[n]) for n, s in zip(self.outputs[1:], self.shapes)]
        return feeds, mask, logits, fresh

    def reset(self) -> None:
        for buffer in self.buffers:
            buffer.fill(0)
        self._sinks = None
        self._set_capacity(min(self.row_block, self.physical_len))
