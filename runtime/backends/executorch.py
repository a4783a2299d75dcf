"""ExecuTorch backend: the cache lives inside the .pte program as mutable buffers.

ExecuTorch's Python bindings exchange torch tensors, so this backend imports torch when it is
used (never at `import pocketlm.runtime`); on a phone the same .pte runs from C++ without it.
The program computes on ExecuTorch's own threadpool; torch here only wraps inputs and outputs, so it
gets one thread: otherwise its OpenMP workers, woken by copying a step's logits out, spin on the
cores XNNPACK is using (measured, int4 SmolLM2 at 2 threads: decode 96 -> 149 tok/s). The fused
attention's kernel calls the BLAS linked into torch (MKL) from ExecuTorch's worker threads, where
torch.set_num_threads does not reach, so OpenMP's default is set to one thread before torch loads:
a one-query-per-head decode (ExecuTorch's export_llm programs, pocketlm's before its grouped query)
measured 9.4-12.2 ms a step at 2 threads with MKL's own threads, 3.7 ms without (int4 SmolLM2,
AVX-512 machine).

The decode method attends through ExecuTorch's fused attention (llama::custom_sdpa, whose kernel
ships in the executorch package as a library this backend loads) over the first n cache slots
(StepInputs.n_keys), so it takes no mask; it handles positions from the program's
get_decode_from on (past the sinks), and the session sends earlier tokens through the prefill method.
A prompt's chunks go through prefill_causal while the cache still fills in order (positions below
get_cache_len): causal attention through the same kernel over the filled rows, and the LM head on
the last token only; the masked prefill serves the rest (a wrapped ring, perplexity's every-row logits).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import PocketLMError
from ..sink_cache import StepInputs

FUSED_DECODE = "fused-sdpa"  # the manifest's name for the decode form this backend runs


def load_fused_attention_kernels() -> None:
    """ExecuTorch's LLM custom ops (llama::custom_sdpa): a library inside the executorch package."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("executorch.extension.llm.custom_ops")
    libs = sorted(Path(spec.submodule_search_locations[0]).glob("libcustom_ops_aot_lib.*")) if spec else []
    if not libs:
        raise PocketLMError("this ExecuTorch install has no LLM custom ops library (libcustom_ops_aot_lib); "
                            "install the executorch wheel pocketlm pins")
    torch.ops.load_library(str(libs[0]))


def load_quantized_embedding_kernels() -> None:
    """ExecuTorch's quantized kernels (quantized_decomposed::embedding_byte / embedding_4bit, the
    lookup of an int8 or int4 embedding table): a library inside the executorch package, registered
    with the runtime when loaded."""
    import importlib.util

    import torch
    from executorch.extension.pybindings import portable_lib

    if "quantized_decomposed::embedding_byte.out" in portable_lib._get_operator_names():
        return
    spec = importlib.util.find_spec("executorch.kernels.quantized")
    libs = sorted(Path(spec.submodule_search_locations[0]).glob("libquantized_ops_aot_lib.*")) if spec else []
    if not libs:
        raise PocketLMError("this ExecuTorch install has no quantized kernels library (libquantized_ops_aot_lib); "
                            "install the executorch wheel pocketlm pins")
    torch.ops.load_library(str(libs[0]))


class ExecuTorchBackend:
    name = "executorch"

    def __init__(self, path: Path, threads: int = 2, program: dict | None = None):
        if "torch" not in sys.modules:  # OpenMP reads it once, when torch loads (see the module docstring)
            os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime, Verification

        self._torch = torch
        torch.set_num_threads(1)
        if threads and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.path = Path(path)
        form = (program or {}).get("decode")
        if form != FUSED_DECODE:
            raise PocketLMError(f"'{self.path}' has a decode method of form {form!r}; this runtime runs {FUSED_DECODE!r}: "
                                "re-export the bundle")
        load_fused_attention_kernels()
        load_quantized_embedding_kernels()
        et_program = Runtime.get().load_program(self.path, verification=Verification.Minimal)
        # the methods come from one Program, so they share its memory-planned cache buffers
        self._program = et_program
        self.methods = {1: et_program.load_method("decode")}
        self._decode_in = None  # (tensors, their numpy views), made on the first decode step
        self.chunk = self._constant(et_program, "get_prefill_chunk")
        # earlier tokens go through prefill (they write the sinks); programs before get_decode_from
        # decoded from the first position past the sinks
        first = "get_decode_from" if "get_decode_from" in et_program.method_names else "get_sink_size"
        self.decode_from = self._constant(et_program, first)
        # programs before prefill_causal send every chunk through the masked prefill
        self.causal = et_program.load_method("prefill_causal") if "prefill_causal" in et_program.method_names else None
        self.causal_until = self._constant(et_program, "get_cache_len") if self.causal else 0
        self.chunk_break = None  # the masked prefill serves chunks anywhere

    def _masked_prefill(self):
        """Loaded on first use: each loaded method's XNNPACK delegates hold their own packed weights
        (int4 SmolLM2: +58 MB peak RSS for a third method), and a conversation that never wraps the
        ring, nor asks for every row's logits, never needs it."""
        if self.chunk not in self.methods:
            self.methods[self.chunk] = self._program.load_method("prefill")
        return self.methods[self.chunk]

    def reset(self) -> None:
        """Nothing to clear: the host masks every slot this conversation has not written (finite
        -1e9 bias, so exp() is exactly 0 and stale keys and values contribute nothing). Reloading
        the program instead would briefly hold two copies of its weights."""

    @staticmethod
    def _constant(program, name: str) -> int:
        return int(program.load_method(name).execute([])[0])

    def step(self, inputs: StepInputs) -> np.ndarray:
        if inputs.tokens.shape[1] == 1:  # numpy indexing: a torch tensor's costs 25 us a step here
            return self.methods[1].execute(self._decode_tensors(inputs))[0].numpy()[0]
        return self._masked_prefill().execute(self._tensors(inputs.as_tuple()))[0][0].numpy()

    def _decode_tensors(self, inputs: StepInputs) -> list:
        """The decode method's inputs (tokens, 4 RoPE tables, slots, n_keys; no mask), written into
        tensors made once: a decode step runs between two program calls, so it copies a few numbers
        into memory it already has instead of wrapping seven new arrays."""
        if self._decode_in is None:
            arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.cos_sink, inputs.sin_sink, inputs.slots,
                      np.zeros(1, np.int64))
            tensors = [self._torch.from_numpy(np.array(a)) for a in arrays]  # owned copies
            self._decode_in = tensors, [t.numpy() for t in tensors]  # the arrays share the tensors' memory
        tensors, (tokens, cos_win, sin_win, cos_sink, sin_sink, slots, n_keys) = self._decode_in
        tokens[...], cos_win[...], sin_win[...] = inputs.tokens, inputs.cos_win, inputs.sin_win
        cos_sink[...], sin_sink[...], slots[...], n_keys[0] = inputs.cos_sink, inputs.sin_sink, inputs.slots, inputs.n_keys
        return tensors

    def prefill_last(self, inputs: StepInputs, start: int) -> np.ndarray:
        arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.slots, np.array([start], np.int64),
                  np.array([inputs.n_valid - 1], np.int64))
        return self.causal.execute(self._tensors(arrays))[0][0, 0].numpy()

    def _tensors(self, arrays) -> list:
        return [self._torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
