"""Would ExecuTorch's fused attention make decode faster? pocketlm's decode method runs attention as
small XNNPACK ops (bmm, softmax, mask add: delegated, between the cache writes). The alternative here
is ExecuTorch's `llama::custom_sdpa` (one fused kernel per layer, as `export_llm` uses) over a cache
laid out [1, L, n_kv, hd], with the same sink-window semantics: one query rotation, and the S sink
keys re-rotated from their stored originals into the frame of the current step (by p - c, the
query's true position minus its in-cache position), so no key is ever rotated in place twice.

The script checks, in eager PyTorch on the real model, that this form gives the logits of pocketlm's
decode form over a stream that wraps a small ring; then exports it (decode method only, the same
8da4w linears) and times both programs' decode method in alternating rounds, same process, same
inputs, cache full (4 + 508 slots). Not part of pocketlm: the measurement decided against it.

Usage: python bench/custom_sdpa_decode.py INT4_FOLDER BUNDLE_OF_THAT_FOLDER [--group-size 64] [--rounds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import write_json

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.sink_cache import CacheLayout, SinkWindowSchedule, decode_mask
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.model.rope import apply_rope, rotate_half
from pocketlm.toolchain.model.sink_cache import SinkCacheProgram
from pocketlm.toolchain.reference import rope_freq


class FusedSdpaDecode(nn.Module):
    """Single-token decode through llama::custom_sdpa; inputs as pocketlm's write-first decode method."""

    def __init__(self, model, layout: CacheLayout):
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::custom_sdpa)

        self.model, self.layout = model, layout
        hd = model.config.head_dim
        for i, spec in enumerate(model.config.layers):
            for name, rows in (("k", layout.physical_len), ("v", layout.physical_len), ("sink", layout.sink_size + 1)):
                self.register_buffer(f"{name}{i}", torch.zeros(1, rows, spec.n_kv_heads, hd), persistent=False)

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots):
        s = self.layout.sink_size
        cos_d = cos_win * cos_sink + sin_win * sin_sink  # rotation by (true - in-cache) position
        sin_d = sin_win * cos_sink - cos_win * sin_sink
        sink_rows = torch.clamp(slots, max=s)  # row s of the originals' buffer is a trash row
        x = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            k_cache, v_cache, sinks = getattr(self, f"k{i}"), getattr(self, f"v{i}"), getattr(self, f"sink{i}")
            q, k, v = attn.project_qkv(layer.input_layernorm(x))
            q = apply_rope(q, cos_win, sin_win).transpose(1, 2)
            k = apply_rope(k, cos_win, sin_win).transpose(1, 2)
            sinks.index_copy_(1, sink_rows, k)
            k_cache.index_copy_(1, slots, k)
            v_cache.index_copy_(1, slots, v.transpose(1, 2))
            if s:
                orig = sinks[:, :s]
                rotated = orig * cos_d + rotate_half(orig) * sin_d
                k_cache.index_copy_(1, torch.arange(s), rotated)
            out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 0, mask, 0.0, False, None)
            x = x + attn.o_proj(out.reshape(1, 1, attn.n_heads * attn.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x)).float()


def decode_args(schedule: SinkWindowSchedule, token: int):
    step = schedule.step_inputs([token], 1)
    schedule.commit(step)
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in (*step.as_tuple()[:5], decode_mask(step), step.slots)]


@torch.no_grad()
def max_logit_difference(model, steps: int = 48) -> float:
    """Eager, real model, 4 + 12 ring (wraps 3 times): fused form against pocketlm's decode form."""
    layout = CacheLayout(4, 12, 1)
    ours, fused = SinkCacheProgram(model, layout, write_first=True).eval(), FusedSdpaDecode(model, layout).eval()
    schedule = SinkWindowSchedule(layout, rope_freq(model))
    worst = 0.0
    for t in range(steps):
        args = decode_args(schedule, 100 + 7 * t)
        worst = max(worst, (ours(*args) - fused(*args)).abs().max().item())
    return worst


def export_fused(model, layout: CacheLayout, group_size: int, path: Path) -> float:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from pocketlm.toolchain.export.executorch_export import example_inputs
    from pocketlm.toolchain.export.executorch_quant import to_8da4w_

    program = FusedSdpaDecode(model, layout).eval()
    to_8da4w_(program, group_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(program, example_inputs(model, layout, 1, write_first=True), strict=False)
        edge = to_edge_transform_and_lower({"decode": ep}, partitioner=[XnnpackPartitioner()])
        et = edge.to_executorch(ExecutorchBackendConfig(run_reinplace_pass=True))
    path.write_bytes(et.buffer)
    return time.perf_counter() - t0


def time_alternating(methods: dict, layout: CacheLayout, freq, rounds: int, steps: int = 100) -> dict:
    schedule = SinkWindowSchedule(layout, freq)
    for _ in range(layout.cache_len + 100):  # past the fill: every slot visible, the ring wrapping
        schedule.commit(schedule.step_inputs([100], 1))
    args = [decode_args(schedule, 100 + i) for i in range(steps)]
    for m in methods.values():
        for a in args[:10]:
            m.execute(a)
    rates = {name: [] for name in methods}
    for r in range(rounds):
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            t0 = time.perf_counter()
            for a in args:
                methods[name].execute(a)
            rates[name].append(steps / (time.perf_counter() - t0))
    return rates


def time_in_this_process(bundle_path: str, fused_path: str, rounds: str, threads: str) -> None:
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime, Verification

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(int(threads))
    bundle, runtime = Bundle.open(bundle_path), Runtime.get()
    load = lambda p: runtime.load_program(p, verification=Verification.Minimal).load_method("decode")  # noqa: E731
    methods = {"pocketlm (XNNPACK-delegated attention)": load(bundle.program_path("executorch")),
               "llama::custom_sdpa": load(fused_path)}
    print(json.dumps(time_alternating(methods, bundle.layout, bundle.rope_freq, int(rounds))))


def main() -> None:
    if sys.argv[1:2] == ["--time"]:
        return time_in_this_process(*sys.argv[2:6])
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="an int4 pocketlm folder (pocketlm quantize --scheme w4-rtn/w4-awq)")
    ap.add_argument("bundle", help="that folder's bundle (pocketlm export FOLDER --backend executorch)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    model, _ = load_model(args.folder)
    diff = max_logit_difference(model)
    print(f"fused form vs pocketlm's decode form, eager, real model: max |logit diff| {diff:.2e}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fused_path = Path(tmp) / "fused_sdpa_decode.pte"
        export_s = export_fused(model, bundle.layout, args.group_size, fused_path)
        # timed in a fresh process: the export's torch threads must not share the cores
        timing = subprocess.run([sys.executable, __file__, "--time", str(bundle.root), str(fused_path),
                                 str(args.rounds), str(args.threads)], check=True, capture_output=True, text=True)
        rates = json.loads(timing.stdout.strip().splitlines()[-1])
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, m in medians.items():
        print(f"{name}: median decode {m:.1f} tok/s", flush=True)
    base, fused = medians.values()
    write_json("custom_sdpa_decode", {
        "bundle": str(bundle.root), "cache": bundle.manifest.get("cache"), "threads": args.threads,
        "eager_max_logit_diff": diff, "fused_decode_export_s": export_s,
        "decode_tok_s_median": medians, "decode_tok_s_rounds": rates, "fused_vs_pocketlm": fused / base,
    }, args.out)


if __name__ == "__main__":
    main()
