"""ONNX Runtime backend. The cache lives on the host as numpy rings bound zero-copy to the program.

The float program (one com.microsoft GroupQueryAttention per layer, toolchain/export/onnx_export.py)
takes each ring as both its past input and its present output, one buffer: the kernel writes the
step's K/V at rows [T - P, T) and attends to rows [0, T), T = the filled slots plus the step's own
(total_sequence_length), with the host's mask as its additive bias. Slots fill in order, so before
the ring wraps a token's row is its slot. The kernel rotates the step's queries and keys itself
(RoPE) by the rows [T - P, T) of two tables the host binds at the ring's capacity and writes the
step's true-position angles into, so a position is never bounded by a table. The query is rotated
once, at its true position (the ExecuTorch decode's form): that suits every window key, since the
window is contiguous, but not the sinks, whose in-cache distance to each query differs from the true one. So once the ring is full, a
step of n tokens uses spare rows after the ring: for each query, the S sink keys rotated by its true
minus in-cache position (from the keys as first written, which the ring's sink rows keep) with the
sink values, then the step's own tokens. The bias shows each query its own copies (not the ring's
sink rows) and hides the slots the step evicts, and the host moves the tokens into those slots
after the step. A multi-token step may not straddle the wrap (chunk_break).

Each ring [1, n_kv, rows, hd] is kept compact at a capacity of whole ROW_BLOCKs that covers the
rows a step reads and writes (a head's rows then lie next to the next head's, so the bound array is
a prefix of the buffer, with no copy), grown by moving the heads apart when a step needs more
(every ROW_BLOCK tokens; the ring and its spare rows once it is full).

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
from ..sink_cache import MASKED, CacheLayout, StepInputs

STEP_INPUTS = ("input_ids", "cos_cache", "sin_cache", "attention_bias", "seqlens_k", "total_sequence_length")
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

    def __init__(self, path: Path, cache_shapes, threads: int = 2, program: dict | None = None,
                 layout: CacheLayout | None = None, row_block: int = ROW_BLOCK):
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
        if self.shared and "cos_cache" not in inputs:
            raise PocketLMError(f"'{path}' rotates its queries outside GroupQueryAttention, a form only pocketlm's "
                                f"exports of 2026-12-07 wrote: re-export the bundle with `pocketlm export`")
        if self.shared and layout is None:
            raise PocketLMError(f"'{path}' keeps rotated copies of the sinks on the host: pass the bundle's cache layout")
        self._input_names = STEP_INPUTS if self.shared else MASKED_STEP_INPUTS if self.logits_scale is None else INTEGER_STEP_INPUTS
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self.head_dim = cache_shapes[0][3]
        self.physical_len = cache_shapes[0][2]  # the schedule's: the ring and its trash slot
        self.cache_len = self.physical_len - 1
        self.sink_size = layout.sink_size if self.shared else 0
        # the shared-cache program's rings have spare rows after them, for a wrapped step's sink copies
        # and its own tokens (the module docstring); a multi-token step may not straddle the wrap
        self.max_rows = self.cache_len + layout.chunk * (self.sink_size + 1) if self.shared else self.physical_len
        self.chunk_break = self.cache_len if self.shared else None
        self.shapes = [(*s[:2], self.max_rows, s[3]) for s in cache_shapes for _ in ("key", "value")]
        dtype = np.float32 if self.logits_scale is None else np.int16
        self.buffers = [np.zeros(int(np.prod(s)), dtype) for s in self.shapes]  # each viewed at the capacity
        # RoPE's cos and sin by cache row (half-split: half a head's width), viewed at the capacity too
        self.tables = [np.zeros((self.max_rows, self.head_dim // 2), np.float32) for _ in range(2)] if self.shared else []
        self.io = self.session.io_binding()
        # a static cache length (integer-only programs, bundles exported before): the whole ring, always
        self.row_block = self.physical_len if isinstance(inputs[self.past[0]][2], int) else row_block
        self._bound, self._bound_key, self._copy_masks = {}, None, {}
        self._sinks, self._value_copies = None, 0
        self._set_capacity(min(self.row_block, self.max_rows))

    def step(self, inputs: StepInputs) -> np.ndarray:
        out = self._step_shared(inputs) if self.shared else self._step_masked(inputs)
        return out if self.logits_scale is None else dequantize_logits(out, self.logits_scale)

    def _step_shared(self, inputs: StepInputs) -> np.ndarray:
        n, past, c, s = inputs.n_valid, inputs.n_cached, self.cache_len, self.sink_size
        wrapped = past == c  # n tokens (no padding) after `past` filled rows
        if not wrapped and past + n > c:
            raise PocketLMError(f"a {n}-token step after {past} cached tokens straddles the wrap of the {c}-slot ring: "
                                f"split it there (chunk_break)")
        copies = n * s if wrapped else 0  # rows [c, c + copies): the sinks rotated for each query in turn
        rows = c + copies if wrapped else past  # where the step's own tokens go
        total = rows + n
        self._grow(total)
        if copies:
            self._write_sink_copies(inputs, n)
        feeds, bias_buffer, logits, _ = self._buffers(n)
        feeds["input_ids"][...] = inputs.tokens[:, :n]
        half = self.head_dim // 2  # the tables repeat each angle in both halves of a head
        self.tables[0][rows:total], self.tables[1][rows:total] = inputs.cos_win[:n, :half], inputs.sin_win[:n, :half]
        feeds["seqlens_k"][0], feeds["total_sequence_length"][...] = total - 1, total
        bias = bias_buffer[: n * total].reshape(1, 1, n, total)  # the ring's rows, the sink copies, the step's tokens
        bias[0, 0, :, :past] = inputs.mask[:n, :past]
        if copies:
            bias[0, 0, :, :s] = MASKED  # the ring's sinks, at their true positions: each query reads its own copy
            bias[0, 0, :, c:rows] = self._copy_mask(n)
        bias[0, 0, :, rows:] = inputs.mask[:n, self.physical_len : self.physical_len + n]
        self.io.bind_input("attention_bias", "cpu", 0, bias.dtype, bias.shape, bias.ctypes.data)  # T changes each step
        self.session.run_with_iobinding(self.io)
        if wrapped:  # the step's tokens went after the ring: into the slots they evict
            if n == 1:
                slot = int(inputs.slots[0])  # a plain view
                for cache in self.caches:
                    cache[:, :, slot] = cache[:, :, rows]
            else:
                for cache in self.caches:
                    cache[:, :, inputs.slots[:n]] = cache[:, :, rows:total]
            self._value_copies = copies  # rows past them now hold the step's tokens
        return logits[0].copy()  # the buffer is overwritten by the next step; a caller may keep these

    def _write_sink_copies(self, inputs: StepInputs, n: int) -> None:
        """Rows [c, c + n S) after the ring: for each of the step's n queries, the S sink keys rotated
        by d = its true minus in-cache position (from the keys as the first tokens wrote them, at
        their true positions, which the ring's sink rows keep), and the sink values. A query rotated
        at its true position then sees each sink at its in-cache distance (runtime.sink_cache)."""
        s, c, hd = self.sink_size, self.cache_len, self.head_dim
        keys, values = self.caches[0::2], self.caches[1::2]
        if self._sinks is None:  # the ring's sink rows no longer change once it has wrapped
            first = np.concatenate([k[0, :, :s] for k in keys])  # [all layers' kv heads, S, hd]
            self._sinks = first, np.concatenate([-first[..., hd // 2 :], first[..., : hd // 2]], axis=-1)  # rotate_half
        first, rotated = self._sinks
        cos_w, sin_w, cos_s, sin_s = inputs.cos_win[:n], inputs.sin_win[:n], inputs.cos_sink[:n], inputs.sin_sink[:n]
        # cos(a - b) and sin(a - b) from the query's two tables, [n, hd]
        cos_d, sin_d = (cos_w * cos_s + sin_w * sin_s)[:, None], (sin_w * cos_s - cos_w * sin_s)[:, None]
        now = first[:, None] * cos_d + rotated[:, None] * sin_d  # [kv heads, n, S, hd]
        head = 0
        for k in keys:
            h = k.shape[1]
            k[0, :, c : c + n * s] = now[head : head + h].reshape(h, n * s, hd)
            head += h
        if self._value_copies < n * s:
            for v in values:
                v[0, :, c : c + n * s] = np.tile(v[0, :, :s], (1, n, 1))
            self._value_copies = n * s

    def _copy_mask(self, n: int) -> np.ndarray:
        """[n, n S]: query i sees the S copies made for it."""
        if n not in self._copy_masks:
            owner = np.arange(n * self.sink_size) // self.sink_size
            self._copy_masks[n] = np.where(owner[None, :] == np.arange(n)[:, None], 0.0, MASKED).astype(np.float32)
        return self._copy_masks[n]

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
        self._set_capacity(min(-(-need // self.row_block) * self.row_block, self.max_rows))
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
            for name, table in zip(STEP_INPUTS[1:3], self.tables):
                view = table[:capacity]
                self.io.bind_input(name, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
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
        feeds = {n: np.zeros(shape(n), types[n]) for n in self._input_names if n not in (mask_name, *STEP_INPUTS[1:3], *STEP_INPUTS[4:])}
        if self.shared:
            feeds["seqlens_k"], feeds["total_sequence_length"] = np.zeros(1, np.int32), np.zeros((), np.int32)
        mask = np.zeros(width * (self.max_rows + width), types[mask_name])
        logits = np.zeros((1, width, self.vocab), types["logits"])
        # the masked program returns the step's K/V for the host to write; the shared one writes the rings
        fresh = [] if self.shared else [np.zeros((*s[:2], width, s[3]), types[n]) for n, s in zip(self.outputs[1:], self.shapes)]
        return feeds, mask, logits, fresh

    def reset(self) -> None:
        for buffer in self.buffers:
            buffer.fill(0)
        self._sinks, self._value_copies = None, 0
        self._set_capacity(min(self.row_block, self.max_rows))
