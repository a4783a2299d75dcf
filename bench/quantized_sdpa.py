"""Would an int8 KV cache speed up ExecuTorch decode on this CPU? Times ExecuTorch's fused attention on a
float32 cache (llama::custom_sdpa, what pocketlm's decode runs) against its int8 form
(llama::custom_quantized_sdpa: int8 query, keys and values with per-row scales and zero points),
each inside an ExecuTorch program run by ExecuTorch's runtime on its thread pool, at the default
model's decode shapes: one token, 3 KV heads, each with its group of 3 query heads folded into the
query's rows (as model.sink_cache.decode_attention), head_dim 64, a 512-slot cache per layer, 30
layers a call (so the caches' 23.6 MB in float32, 5.9 MB in int8, are read as in a decode step). The
int8 program also quantizes its query per row each call, as a decode step would.

Usage: python bench/quantized_sdpa.py [--keys 128,256,450] [--rounds 8] [--calls 200] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _common import write_json

from pocketlm.runtime.backends.executorch import load_fused_attention_kernels

N_LAYERS, N_KV, GROUP, HEAD_DIM, SLOTS = 30, 3, 3, 64, 512


def _per_row_int8(x: torch.Tensor):
    """Symmetric int8 per row of the last dim: (codes, scales [..., 1], zero points [..., 1])."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    codes = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale, torch.zeros_like(scale, dtype=torch.int8)


class Attention(nn.Module):
    """N_LAYERS calls of the fused attention over caches held as buffers; forward(q, n_keys)."""

    def __init__(self, quantized: bool):
        super().__init__()
        self.quantized = quantized
        g = torch.Generator().manual_seed(0)
        for i in range(N_LAYERS):
            k, v = (torch.randn(1, SLOTS, N_KV, HEAD_DIM, generator=g) for _ in range(2))
            if quantized:
                for name, t in (("k", k), ("v", v)):
                    codes, scale, zero = _per_row_int8(t)
                    self.register_buffer(f"{name}{i}", codes)
                    self.register_buffer(f"{name}_scale{i}", scale)
                    self.register_buffer(f"{name}_zero{i}", zero)
            else:
                self.register_buffer(f"k{i}", k)
                self.register_buffer(f"v{i}", v)

    def forward(self, q, n_keys):
        start = n_keys[0].item() - GROUP  # the grouped query's rows all see the first n_keys slots
        torch._check(start >= 0)
        torch._check(start + GROUP <= SLOTS)
        out = torch.zeros_like(q)
        for i in range(N_LAYERS):
            qi = q + out * 1e-3  # a dependency between layers, as in a model
            k, v = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            if self.quantized:
                codes, scale, zero = _per_row_int8(qi)
                out = torch.ops.llama.custom_quantized_sdpa(
                    codes, k, v, start, None, 0.0, False, None, zero, scale,
                    getattr(self, f"k_zero{i}"), getattr(self, f"k_scale{i}"),
                    getattr(self, f"v_zero{i}"), getattr(self, f"v_scale{i}"), False)
            else:
                out = torch.ops.llama.custom_sdpa(qi, k, v, start, None, 0.0, False, None)
        return out


def export(module: Attention, path: Path) -> None:
    from executorch.exir import to_edge_transform_and_lower

    example = (torch.randn(1, GROUP, N_KV, HEAD_DIM), torch.tensor([GROUP + 1]))
    ep = torch.export.export(module, example, strict=False)
    path.write_bytes(to_edge_transform_and_lower(ep).to_executorch().buffer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="128,256,450")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (the ops' export-time definitions)
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    load_fused_attention_kernels()
    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(args.threads)
    forms = {"fp32_custom_sdpa": Attention(False), "int8_custom_quantized_sdpa": Attention(True)}
    q = torch.randn(1, GROUP, N_KV, HEAD_DIM)
    keys = [int(k) for k in args.keys.split(",")]
    methods, error = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in forms.items():
            path = Path(tmp) / f"{name}.pte"
            export(module, path)
            methods[name] = Runtime.get().load_program(path).load_method("forward")
        for n in keys:
            outs = [m.execute([q, torch.tensor([n])])[0] for m in methods.values()]
            error[n] = float((outs[1] - outs[0]).norm() / outs[0].norm())
    times = {(name, n): [] for name in methods for n in keys}
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for n in keys:
            inputs = [q, torch.tensor([n])]
            for name in order:
                method = methods[name]
                for _ in range(5):
                    method.execute(inputs)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    method.execute(inputs)
                times[(name, n)].append(1e6 * (time.perf_counter() - t0) / args.calls)
    rows = []
    for n in keys:
        fp32, int8 = (statistics.median(times[(name, n)]) for name in methods)
        rows.append({"keys": n, "fp32_us_per_step": fp32, "int8_us_per_step": int8, "int8_over_fp32": int8 / fp32,
                     "int8_relative_error": error[n],
                     "fp32_us_rounds": times[("fp32_custom_sdpa", n)], "int8_us_rounds": times[("int8_custom_quantized_sdpa", n)]})
        print(f"{n} keys: fp32 {fp32:.0f} us, int8 {int8:.0f} us a step of {N_LAYERS} layers ({int8 / fp32:.2f}x), "
              f"int8 relative error {error[n]:.4f}")
    write_json("quantized_sdpa", {"threads": args.threads, "rounds": args.rounds, "calls": args.calls,
                                  "shapes": {"layers": N_LAYERS, "kv_heads": N_KV, "query_rows": GROUP,
                                             "head_dim": HEAD_DIM, "slots": SLOTS},
                                  "rows": rows}, args.out)


if __name__ == "__main__":
    main()
