"""The sink-window cache against an obviously-correct oracle (StreamingLLM's StartRecentKVCache:
concatenate the sinks and the most recent tokens, give them positions 0.. in order, plain attention)."""

import numpy as np
import pytest
import torch

from pocketlm.runtime import rope as np_rope
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.sink_cache import ROPE_BLOCK, CacheLayout, SinkWindowSchedule, StepInputs, decode_key_count
from pocketlm.toolchain.model import convert, surgery
from pocketlm.toolchain.model import rope
from pocketlm.toolchain.reference import TorchBackend, reference_session, rope_freq

from conftest import TINY_VOCAB, tiny_hf_model


@torch.no_grad()
def oracle_logits(model, ids, sink_size, window_size):
    """Token by token; each layer keeps every token's un-rotated K/V and attends to sinks + recent."""
    kv = [[] for _ in model.model.layers]
    out = []
    for t, tok in enumerate(ids):
        x = model.model.embed_tokens(torch.tensor([[tok]]))
        keep = list(range(min(sink_size, t + 1))) + list(range(max(sink_size, t + 1 - window_size), t + 1))
        cos, sin = rope.cos_sin(model.rope_inv_freq, torch.arange(len(keep)))
        for layer, layer_kv in zip(model.model.layers, kv):
            attn = layer.self_attn
            q, k, v = attn.project_qkv(layer.input_layernorm(x))
            layer_kv.append((k, v))
            keys = rope.apply_rope(torch.cat([layer_kv[j][0] for j in keep], dim=2), cos, sin)
            values = torch.cat([layer_kv[j][1] for j in keep], dim=2)
            x = x + attn.attend(rope.apply_rope(q, cos[-1:], sin[-1:]), keys, values, torch.zeros(1, len(keep)))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        out.append(model.lm_head(model.model.norm(x))[0, 0])
    return torch.stack(out).numpy()


def feed_in_pieces(session, ids, pieces):
    """Feed ids as consecutive pieces of the given lengths (cycled); return all logits."""
    outs, i, k = [], 0, 0
    while i < len(ids):
        n = pieces[k % len(pieces)]
        outs.append(session.feed(ids[i : i + n], keep_logits=True))
        i, k = i + n, k + 1
    return np.concatenate(outs)


@pytest.fixture(scope="module")
def tiny():
    return convert.from_hf_model(tiny_hf_model())


STREAM = np.random.default_rng(0).integers(0, TINY_VOCAB, 90).tolist()
LAYOUT = CacheLayout(sink_size=4, window_size=12, chunk=5)  # 90 tokens wrap the 12-slot ring 7 times


def test_matches_the_oracle_over_a_stream_that_wraps_the_ring_many_times(tiny):
    session = reference_session(tiny, LAYOUT)
    ours = feed_in_pieces(session, STREAM, [23, 1, 1, 7, 1, 3])  # long prefill, decodes, odd chunks
    ref = oracle_logits(tiny, STREAM, 4, 12)
    assert np.abs(ours - ref).max() < 1e-4


def test_same_logits_whatever_chunk_a_token_lands_in(tiny):
    runs = []
    for chunk, pieces in [(1, [1]), (5, [5]), (5, [2, 5, 1]), (12, [12, 3])]:
        session = reference_session(tiny, CacheLayout(4, 12, chunk))
        runs.append(feed_in_pieces(session, STREAM, pieces))
    for other in runs[1:]:
        assert np.abs(other - runs[0]).max() < 1e-4


def test_zero_sinks_is_a_pure_window(tiny):
    session = reference_session(tiny, CacheLayout(0, 12, 4))
    ours = feed_in_pieces(session, STREAM[:40], [4])
    assert np.abs(ours - oracle_logits(tiny, STREAM[:40], 0, 12)).max() < 1e-4


def test_heterogeneous_layers_run_through_the_cache():
    model = convert.from_hf_model(tiny_hf_model(seed=3))
    surgery.keep_kv_heads_(model, 0, [1])
    surgery.keep_mlp_channels_(model, 1, list(range(0, 96, 2)))
    session = reference_session(model, LAYOUT)
    ours = feed_in_pieces(session, STREAM[:50], [7, 1])
    assert np.abs(ours - oracle_logits(model, STREAM[:50], 4, 12)).max() < 1e-4


def test_within_capacity_the_cache_equals_hugging_face_dense_attention():
    hf = tiny_hf_model()
    session = reference_session(convert.from_hf_model(hf), CacheLayout(4, 60, 8))
    ours = feed_in_pieces(session, STREAM[:64], [8, 1, 1, 5])
    with torch.no_grad():
        ref = hf(torch.tensor([STREAM[:64]])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_sinks_never_overwritten(tiny):
    session = reference_session(tiny, LAYOUT)
    session.feed(STREAM[:4])
    program = session.backend.program  # buffers [1, L, n_kv, hd]; the sinks as stored: sink_keys [1, S + 1, n_kv, hd]
    layers = range(tiny.config.n_layers)
    sinks = [tuple(b[:, :4].clone() for b in program.buffers_of(i)) for i in layers]
    feed_in_pieces(session, STREAM[4:], [5, 1])
    assert session.schedule.slot_pos[:4].tolist() == [0, 1, 2, 3]
    for before, i in zip(sinks, layers):
        assert all(torch.equal(b0, b[:, :4]) for b0, b in zip(before, program.buffers_of(i)))
        assert before[0].abs().sum() > 0


def test_no_query_key_distance_above_the_capacity():
    layout = CacheLayout(4, 12, 5)
    sched = SinkWindowSchedule(layout, np.ones(4))
    for n in [5, 1, 3, 5, 5, 1, 1, 5, 5, 5, 2, 5, 5, 1]:
        step = sched.step_inputs(list(range(n)), 1 if n == 1 else layout.chunk)
        for i in range(n):
            q_pos = sched.n_seen + i
            visible = np.flatnonzero(step.mask[i, : layout.physical_len] == 0)
            for slot in visible:
                k_pos = sched.slot_pos[slot]
                dist = sched.cache_position(q_pos) - k_pos if slot < layout.sink_size else q_pos - k_pos
                assert 0 < dist <= layout.cache_len - 1
            assert len(visible) + i + 1 <= layout.cache_len  # never more keys than the capacity
        sched.commit(step)


def test_padding_writes_only_to_the_trash_slot(tiny):
    sched = SinkWindowSchedule(LAYOUT, np.ones(4))
    step = sched.step_inputs([1, 2], LAYOUT.chunk)
    assert step.slots.tolist() == [0, 1] + [LAYOUT.trash_slot] * 3
    assert np.isfinite(step.mask).all()


def test_a_position_gets_the_same_rotation_however_large_it_is():
    freq = np_rope.inv_freq(64, 100000.0)
    cos, sin = np_rope.cos_sin(freq, [10**7])
    exact = np.asarray([float(np.cos(np.float64(10**7) * f % (2 * np.pi))) for f in freq])
    assert np.abs(cos[0, :32] - exact).max() < 1e-6


def test_bad_layouts_are_refused():
    with pytest.raises(PocketLMError, match=r"chunk 20 must be between 1 and window_size 12"):
        CacheLayout(4, 12, 20)
    with pytest.raises(PocketLMError, match=r"zero tokens"):
        reference_session(convert.from_hf_model(tiny_hf_model()), LAYOUT).feed([])


class FusedDecode(TorchBackend):
    """The ExecuTorch program's decode method, run eagerly: single tokens from decode_from on."""

    def __init__(self, model, layout):
        super().__init__(model, layout)
        self.decode_from = self.program.decode_from()

    @torch.no_grad()
    def step(self, inputs: StepInputs) -> np.ndarray:
        if inputs.tokens.shape[1] > 1:
            return super().step(inputs)
        arrays = (*inputs.as_tuple()[:5], inputs.slots, np.array([inputs.n_keys]))
        return self.program.decode(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])[0].numpy()


class CausalPrefill(FusedDecode):
    """...and its prefill_causal method, recording each chunk's start."""

    def __init__(self, model, layout):
        super().__init__(model, layout)
        self.causal_until, self.starts = layout.cache_len, []

    @torch.no_grad()
    def prefill_last(self, inputs: StepInputs, start: int) -> np.ndarray:
        self.starts.append(start)
        arrays = (inputs.tokens, inputs.cos_win, inputs.sin_win, inputs.slots, [start], [inputs.n_valid - 1])
        return self.program.causal(*[torch.as_tensor(np.asarray(a)) for a in arrays])[0, 0].numpy()


@pytest.mark.parametrize("layout", [LAYOUT, CacheLayout(sink_size=0, window_size=12, chunk=5)], ids=["sinks", "no-sinks"])
def test_the_fused_decode_reading_only_the_filled_slots_matches_the_oracle(tiny, layout):
    """ExecuTorch's decode form: a single token past the sinks attends through llama::custom_sdpa to
    the first step.n_keys cache rows only, each KV head's query group as one block of
    query rows, the sinks re-rotated instead of a second query rotation; the session sends earlier
    tokens as chunks (with no sinks, the first group - 1 = 2). Slot by slot it must see what the
    oracle sees, before and after the ring fills, and chunks after decodes still read the sinks as
    stored."""
    backend = FusedDecode(tiny, layout)
    assert backend.decode_from == max(layout.sink_size, 2)  # the tiny model's GQA group is 3
    session = CachedSession(backend, layout, rope_freq(tiny))
    ours = feed_in_pieces(session, STREAM, [1, 1, 6, 1, 1, 1, 1, 1, 1, 5])
    assert np.abs(ours - oracle_logits(tiny, STREAM, layout.sink_size, 12)).max() < 1e-4


@pytest.mark.parametrize("layout", [LAYOUT, CacheLayout(sink_size=0, window_size=12, chunk=5)], ids=["sinks", "no-sinks"])
def test_the_causal_prefill_gives_each_prompts_last_logits_while_the_cache_fills_in_order(tiny, layout):
    """ExecuTorch's prefill_causal form: a prompt chunk while the cache still fills in order attends
    causally through llama::custom_sdpa over the filled rows and returns only its last real token's
    logits. Turns of prompts and decoded tokens, through and past the point the ring wraps (where
    the session must fall back to the masked step): every turn's last logits must be the oracle's."""
    backend = CausalPrefill(tiny, layout)
    session = CachedSession(backend, layout, rope_freq(tiny))
    expected = oracle_logits(tiny, STREAM[:40], layout.sink_size, 12)
    fed = 0
    for turn in [7, 1, 1, 3, 1, 4, 1, 1, 6, 1, 8, 1, 5]:  # prompts of 3-8 tokens, decoded tokens between
        last = session.feed(STREAM[fed : fed + turn])
        fed += turn
        assert np.abs(last - expected[fed - 1]).max() < 1e-4, (fed, turn)
    # prompt chunks start at 0, 5 (the 7-token prompt), 9, 13, 19, 26, 31 and 35: causal only while they fit the cache
    assert fed == 40 and backend.starts == [s for s in (0, 5, 9) if s + layout.chunk <= layout.cache_len]


def test_a_single_token_sees_a_prefix_of_the_cache_before_and_after_the_ring_fills():
    schedule = SinkWindowSchedule(LAYOUT, np_rope.inv_freq(8, 10000.0))
    counts = []
    for _ in range(40):
        step = schedule.step_inputs([3], 1)
        assert step.n_keys == decode_key_count(step)  # the closed form the backends read, against the mask
        counts.append(step.n_keys)
        schedule.commit(step)
    assert counts == [min(p + 1, LAYOUT.cache_len) for p in range(40)]


def test_a_single_token_step_gets_the_same_inputs_as_the_first_row_of_a_chunk():
    """The decode fast path (width 1) against the general chunk path, step by step while the ring wraps
    and across the fast path's RoPE tables (ROPE_BLOCK positions each)."""
    schedule = SinkWindowSchedule(LAYOUT, np_rope.inv_freq(8, 10000.0))
    for t in range(2 * ROPE_BLOCK + 10):
        one, chunk = schedule.step_inputs([7], 1), schedule.step_inputs([7], 2)
        for name in ("cos_win", "sin_win", "cos_sink", "sin_sink"):
            assert np.array_equal(getattr(one, name), getattr(chunk, name)[:1]), (t, name)
        assert np.array_equal(one.mask, chunk.mask[:1, : LAYOUT.physical_len + 1]) and one.mask.dtype == np.float32
        assert one.tokens.tolist() == [[7]] and one.slots.tolist() == chunk.slots[:1].tolist() and one.n_valid == 1
        schedule.commit(one)


class _OneAttention(torch.nn.Module):
    def forward(self, qkv, k_cache, v_cache, bias, seqlens_k, total, cos_cache, sin_cache):
        from pocketlm.toolchain.model.grouped_attention import grouped_query_attention

        return grouped_query_attention(qkv, k_cache, v_cache, bias, seqlens_k, total, cos_cache, sin_cache, 6, 2)


@pytest.mark.parametrize("past, p", [(0, 5), (5, 3), (11, 1)])
def test_the_grouped_attention_op_is_onnx_runtimes_kernel(tmp_path, past, p):
    """The ONNX step traces pocketlm::grouped_query_attention and ONNX Runtime runs its
    GroupQueryAttention in its place: with the cache bound as both past and present (one buffer),
    the kernel must rotate the packed queries and keys by the tables' rows [T - P, T), write the
    step's rows at [T - P, T) and attend causally over [0, T) plus the bias, exactly what the eager
    op computes. The bias hides one old row (the slot a wrapped step evicts); the tables are longer
    than T and hold other angles elsewhere (the host binds them at the capacity)."""
    import onnxruntime as ort

    from pocketlm.toolchain.export.onnx_export import _declare_grouped_query_attention, _grouped_query_attention_onnx
    from pocketlm.toolchain.model.grouped_attention import grouped_query_attention

    g = torch.Generator().manual_seed(past)
    total, rows, hd = past + p, 12, 16  # ONNX Runtime rotates heads of a multiple of 16
    qkv = torch.randn(1, p, (6 + 2 + 2) * hd, generator=g)
    k_cache, v_cache = torch.randn(1, 2, rows, hd, generator=g), torch.randn(1, 2, rows, hd, generator=g)
    angles = torch.rand(rows, hd // 2, generator=g) * 100
    bias = torch.zeros(1, 1, p, total)
    bias[..., past // 2] = -1e9
    args = (qkv, k_cache, v_cache, bias, torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32),
            angles.cos(), angles.sin())
    want = [t.numpy() for t in _OneAttention()(*args)]
    _declare_grouped_query_attention()
    program = torch.onnx.export(_OneAttention(), args, custom_translation_table={
        grouped_query_attention._opoverload: _grouped_query_attention_onnx}, opset_version=18, verbose=False)
    program.save(str(tmp_path / "gqa.onnx"))
    session = ort.InferenceSession(str(tmp_path / "gqa.onnx"), providers=["CPUExecutionProvider"])
    io, caches = session.io_binding(), [k_cache.numpy().copy(), v_cache.numpy().copy()]
    names = [i.name for i in session.get_inputs()]
    for name, array in zip(names, [qkv.numpy()] + caches + [a.numpy() for a in args[3:]]):
        io.bind_cpu_input(name, array)
    out_names = [o.name for o in session.get_outputs()]
    io.bind_output(out_names[0])
    for name, cache in zip(out_names[1:], caches):  # present = past: the same memory
        io.bind_output(name, "cpu", 0, np.float32, cache.shape, cache.ctypes.data)
    session.run_with_iobinding(io)
    assert np.abs(io.copy_outputs_to_cpu()[0] - want[0]).max() < 1e-5
    for cache, expected in zip(caches, want[1:]):
        assert np.abs(cache - expected).max() < 1e-6  # rows [T - P, T) written (keys rotated), the rest untouched
        assert np.array_equal(cache[:, :, :past], expected[:, :, :past]) and np.array_equal(cache[:, :, total:], expected[:, :, total:])
    assert not np.array_equal(want[1], k_cache.numpy())
