"""ExecuTorch export (.pte, XNNPACK) of the sink-window cached step.

The cache lives inside the program as mutable buffers updated in place (index_copy_ + the reinplace
pass), laid out [1, L, n_kv_heads, hd]. Shapes are static: a `prefill` method takes `chunk`
positions (the masked step: the chunk's K/V appended for the step and written after, since a
chunk's later tokens evict slots its earlier ones still see), a `prefill_causal` method takes
`chunk` positions while the cache still fills in order and returns the last real token's logits
(causal attention through ExecuTorch's fused attention, llama::custom_sdpa, over the filled rows:
model.sink_cache.causal_attention), and a `decode` method takes 1 token past the sinks (from
get_decode_from) through the same kernel over the filled cache rows only, with no mask
(model.sink_cache.decode_attention); all three share the cache buffers. Constant
methods carry what a runner needs without a manifest (capacity, chunk, vocab, stop id).

Measured on SmolLM2-135M int4 (2 threads, alternating rounds in one process; bench/decode_forms.py):
decode with 129-256 tokens in a 4 + 508 cache ran 1.2x the previous form (whole-cache attention as
XNNPACK-delegated bmm/softmax, which had beaten this kernel when both read the whole cache), and
0.9x it once the cache is full.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pocketlm.runtime.sink_cache import CacheLayout

from pocketlm.runtime.backends.executorch import FUSED_DECODE

from ..model.sink_cache import ProgramMethod, SinkCacheProgram
from ..model.transformer import Transformer


PREFILL, CAUSAL_PREFILL, DECODE = "prefill", "prefill_causal", "decode"


def example_inputs(model: Transformer, layout: CacheLayout, method: str):
    """prefill: tokens [1, chunk], 4 RoPE tables, mask, slots; prefill_causal: tokens [1, chunk], cos,
    sin, slots, start (the chunk's first position), last (the row whose logits it returns); decode:
    tokens [1, 1], 4 RoPE tables, slots, n_keys (how many cache rows the token attends to)."""
    hd = model.config.head_dim
    t = 1 if method == DECODE else layout.chunk
    rope = [torch.ones(t, hd) for _ in range(4)]
    if method == CAUSAL_PREFILL:
        return (torch.zeros(1, t, dtype=torch.long), *rope[:2], torch.arange(t), torch.tensor([0]), torch.tensor([t - 1]))
    if method == DECODE:
        return (torch.zeros(1, 1, dtype=torch.long), *rope, torch.tensor([layout.sink_size]),
                torch.tensor([layout.sink_size + 1]))
    return (torch.zeros(1, t, dtype=torch.long), *rope, torch.zeros(t, layout.physical_len + t), torch.arange(t))


def export_executorch(model: Transformer, layout: CacheLayout, path: Path, stop_ids: tuple[int, ...] = (),
                      int4_group: int | None = None, int8: bool = False) -> dict[int, int]:
    """Write model.pte at path; with int4_group, on-grid linears run as XNNPACK 8da4w, with int8 as
    8da8w (int8 per-channel weights; an int4 model's int8 LM head is 8da8w too), and an on-grid
    embedding table is looked up from its codes. Returns how many linears were quantized, by weight
    bits, and the embedding's bits ("embedding": None when it stays float)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    program = SinkCacheProgram(model, layout).eval()
    converted = {4: 0, 8: 0, "embedding": None}
    if int4_group or int8:
        import copy

        from .executorch_quant import quantize_embedding_, to_8da4w_, to_8da8w_

        program = copy.deepcopy(program)  # the caller's float model stays as it is (golden outputs use it)
        converted = to_8da4w_(program, int4_group) if int4_group else {4: 0, 8: to_8da8w_(program)}
        converted["embedding"] = quantize_embedding_(program.model, int4_group)
    constants = {
        "get_cache_len": layout.cache_len,
        "get_sink_size": layout.sink_size,
        "get_decode_from": program.decode_from(),
        "get_window_size": layout.window_size,
        "get_prefill_chunk": layout.chunk,
        "get_vocab_size": model.config.vocab_size,
        "get_head_dim": model.config.head_dim,
        "get_n_layers": model.config.n_layers,
    }
    if stop_ids:
        constants["get_eos_id"] = stop_ids[0]
    methods = {}
    with torch.no_grad():
        for name, method in ((PREFILL, "forward"), (CAUSAL_PREFILL, "causal"), (DECODE, "decode")):
            module = ProgramMethod(program, method)
            methods[name] = torch.export.export(module, example_inputs(model, layout, name), strict=False)
        edge = to_edge_transform_and_lower(methods, partitioner=[XnnpackPartitioner()], constant_methods=constants)
        planning = MemoryPlanningPass(share_mutable_buffers=True)  # one cache for all methods
        et = edge.to_executorch(ExecutorchBackendConfig(run_reinplace_pass=True, memory_planning_pass=planning))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        et.write_to_file(f)
    return converted


DECODE_FORM = FUSED_DECODE  # what the manifest records, so the runtime gives decode its inputs
