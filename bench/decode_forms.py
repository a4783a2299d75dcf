"""Which ExecuTorch decode form is faster, by how full the cache is? The shipped form attends through
ExecuTorch's fused llama::custom_sdpa over the filled cache rows only (model.sink_cache.decode_attention);
the previous one wrote the token's K/V into its slot, then attended over the whole cache with small
XNNPACK-delegated ops (bmm, mask, softmax) and a second query rotation for the sinks.

The script checks, in eager PyTorch on the given model, that the previous form gives the shipped
form's logits over a stream wrapping a small ring; exports the previous form's decode method with the
same 8da4w linears; then times both decode methods in a fresh process, in alternating rounds, at
several cache fills (tokens already in the cache when the timed steps start).

Usage: python bench/decode_forms.py INT4_FOLDER BUNDLE_OF_THAT_FOLDER [--group-size 64] [--depths 128,256,384,600]
       [--rounds 12] [--threads 2] [--out FILE]
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
from pocketlm.runtime.sink_cache import CacheLayout, SinkWindowSchedule, decode_key_count
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.model.rope import apply_rope
from pocketlm.toolchain.model.sink_cache import SinkCacheProgram, attend
from pocketlm.toolchain.reference import rope_freq

STEPS = 128  # decode steps per timed round


class WholeCacheDecode(nn.Module):
    """The previous decode method: keys held transposed [1, n_kv, hd, L], values [1, n_kv, L, hd]; the
    token's K/V written first, then masked attention over every slot (mask [1, L])."""

    def __init__(self, model, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout
        hd, length = model.config.head_dim, layout.physical_len
        for i, spec in enumerate(model.config.layers):
            self.register_buffer(f"k{i}", torch.zeros(1, spec.n_kv_heads, hd, length), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(1, spec.n_kv_heads, length, hd), persistent=False)

    def forward(self, tokens, cos_win, sin_win, cos_sink, sin_sink, mask, slots):
        x = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            n_kv, hd = attn.n_kv_heads, attn.head_dim
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            q, k, v = attn.project_qkv(layer.input_layernorm(x))
            k_cache.index_copy_(3, slots, apply_rope(k, cos_win, sin_win).transpose(2, 3))
            v_cache.index_copy_(2, slots, v)
            x = x + attend(attn, q, k_cache.view(n_kv, hd, -1), v_cache.view(n_kv, -1, hd),
                           cos_win, sin_win, cos_sink, sin_sink, mask, self.layout.sink_size)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x)).float()


def _write_first_mask(step) -> np.ndarray:
    """[1, L]: the cache alone, the token visible in its own slot (its previous occupant is the token it evicts)."""
    length = step.mask.shape[1] - 1
    mask = step.mask[:, :length].copy()
    mask[0, step.slots[0]] = step.mask[0, length]
    return mask


def step_args(schedule: SinkWindowSchedule, token: int, form: str) -> list[torch.Tensor]:
    step = schedule.step_inputs([token], 1)
    arrays = step.as_tuple()
    if form == "fused":
        arrays = (*arrays[:5], arrays[6], np.array([decode_key_count(step)], np.int64))
    else:
        arrays = (*arrays[:5], _write_first_mask(step), arrays[6])
    schedule.commit(step)
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@torch.no_grad()
def max_logit_difference(model, steps: int = 48) -> float:
    """Eager, 4 + 12 ring (wraps 3 times), from position 4 (the fused form's first): previous vs shipped."""
    layout = CacheLayout(4, 12, 2)
    shipped, previous = SinkCacheProgram(model, layout).eval(), WholeCacheDecode(model, layout).eval()
    freq = rope_freq(model)
    s_new, s_old = SinkWindowSchedule(layout, freq), SinkWindowSchedule(layout, freq)
    for _ in range(2):  # the sinks go into the shipped program as chunks, as the runtime sends them
        step = s_new.step_inputs([7, 9], 2)
        shipped(*[torch.from_numpy(a) for a in step.as_tuple()])
        s_new.commit(step)
    for token in (7, 9, 7, 9):
        previous(*step_args(s_old, token, "previous"))
    worst = 0.0
    for t in range(steps):
        a = shipped.decode(*step_args(s_new, 100 + 7 * t, "fused"))
        b = previous(*step_args(s_old, 100 + 7 * t, "previous"))
        worst = max(worst, (a - b).abs().max().item())
    return worst


def export_previous(model, layout: CacheLayout, group_size: int, path: Path) -> float:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from pocketlm.toolchain.export.executorch_quant import to_8da4w_

    program = WholeCacheDecode(model, layout).eval()
    to_8da4w_(program, group_size)
    hd = model.config.head_dim
    example = (torch.zeros(1, 1, dtype=torch.long), *[torch.ones(1, hd) for _ in range(4)],
               torch.zeros(1, layout.physical_len), torch.tensor([layout.sink_size]))
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(program, example, strict=False)
        et = to_edge_transform_and_lower({"decode": ep}, partitioner=[XnnpackPartitioner()]).to_executorch(
            ExecutorchBackendConfig(run_reinplace_pass=True))
    path.write_bytes(et.buffer)
    return time.perf_counter() - t0


def time_in_this_process(bundle_path: str, previous_path: str, depths: str, rounds: str, threads: str) -> None:
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime, Verification

    from pocketlm.runtime.backends.executorch import load_fused_attention_kernels

    torch.set_num_threads(1)
    load_fused_attention_kernels()
    portable_lib._unsafe_reset_threadpool(int(threads))
    bundle, runtime = Bundle.open(bundle_path), Runtime.get()
    load = lambda p: runtime.load_program(p, verification=Verification.Minimal).load_method("decode")  # noqa: E731
    methods = {"fused": load(bundle.program_path("executorch")), "previous": load(previous_path)}
    result = {}
    for depth in map(int, depths.split(",")):
        args = {}
        for form in methods:
            schedule = SinkWindowSchedule(bundle.layout, bundle.rope_freq)
            for _ in range(depth):
                schedule.commit(schedule.step_inputs([100], 1))
            args[form] = [step_args(schedule, 100 + i, form) for i in range(STEPS)]
            for a in args[form][:8]:
                methods[form].execute(a)
        rates = {form: [] for form in methods}
        for r in range(int(rounds)):
            for form in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
                t0 = time.perf_counter()
                for a in args[form]:
                    methods[form].execute(a)
                rates[form].append(STEPS / (time.perf_counter() - t0))
        result[depth] = rates
    print(json.dumps(result))


def main() -> None:
    if sys.argv[1:2] == ["--time"]:
        return time_in_this_process(*sys.argv[2:7])
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="an int4 pocketlm folder (pocketlm quantize --scheme w4-rtn/w4-awq)")
    ap.add_argument("bundle", help="that folder's bundle (pocketlm export FOLDER --backend executorch)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--depths", default="128,256,384,600")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    model, _ = load_model(args.folder)
    diff = max_logit_difference(model)
    print(f"previous form vs shipped form, eager: max |logit diff| {diff:.2e}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        previous_path = Path(tmp) / "previous_decode.pte"
        export_s = export_previous(model, bundle.layout, args.group_size, previous_path)
        timing = subprocess.run([sys.executable, __file__, "--time", str(bundle.root), str(previous_path), args.depths,
                                 str(args.rounds), str(args.threads)], check=True, capture_output=True, text=True)
        rates = json.loads(timing.stdout.strip().splitlines()[-1])
    by_depth = {}
    for depth, r in rates.items():
        medians = {form: statistics.median(v) for form, v in r.items()}
        by_depth[depth] = {"decode_tok_s_median": medians, "fused_vs_previous": medians["fused"] / medians["previous"],
                           "decode_tok_s_rounds": r}
        print(f"{depth} tokens in the cache: fused {medians['fused']:.1f}, previous {medians['previous']:.1f} tok/s "
              f"({by_depth[depth]['fused_vs_previous']:.2f}x)", flush=True)
    write_json("decode_forms", {"bundle": str(bundle.root), "cache": bundle.manifest.get("cache"), "threads": args.threads,
                                "steps_per_round": STEPS, "eager_max_logit_diff": diff, "previous_export_s": export_s,
                                "by_depth": by_depth}, args.out)


if __name__ == "__main__":
    main()
