"""ExecuTorch backend: the cache lives inside the .pte program as mutable buffers.

ExecuTorch's Python bindings exchange torch tensors, so this backend imports torch when it is
used (never at `import pocketlm.runtime`); on a phone the same .pte runs from C++ without it.
The program computes on ExecuTorch's own threadpool; torch here only wraps inputs and outputs, so it
gets one thread: otherwise its OpenMP workers, woken by copying a step's logits out, spin on the
cores XNNPACK is using (measured, int4 SmolLM2 at 2 threads: decode 96 -> 149 tok/s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..sink_cache import StepInputs, decode_mask


class ExecuTorchBackend:
    name = "executorch"

    def __init__(self, path: Path, threads: int = 2, program: dict | None = None):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime, Verification

        self._torch = torch
        torch.set_num_threads(1)
        if threads and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.path = Path(path)
        self._runtime = Runtime.get()
        self._verification = Verification.Minimal
        # the manifest says whether decode writes its K/V before attending (mask over the cache alone)
        self.decode_writes_first = (program or {}).get("decode") == "write-first"
        et_program = self._runtime.load_program(self.path, verification=self._verification)
        # both methods come from one Program, so they share its memory-planned cache buffers
        self.methods = {1: et_program.load_method("decode")}
        self.methods[self.chunk(et_program)] = et_program.load_method("prefill")

    def reset(self) -> None:
        """Nothing to clear: the host masks every slot this conversation has not written (finite
        -1e9 bias, so exp() is exactly 0 and stale keys and values contribute nothing). Reloading
        the program instead would briefly hold two copies of its weights."""

    @staticmethod
    def chunk(program) -> int:
        return int(program.load_method("get_prefill_chunk").execute([])[0])

    def step(self, inputs: StepInputs) -> np.ndarray:
        arrays = inputs.as_tuple()
        if self.decode_writes_first and inputs.tokens.shape[1] == 1:
            arrays = (*arrays[:5], decode_mask(inputs), arrays[6])
        args = [self._torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        return self.methods[inputs.tokens.shape[1]].execute(args)[0][0].numpy()
