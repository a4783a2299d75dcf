"""Exported programs (ONNX Runtime, ExecuTorch) against the PyTorch reference on the same stream."""

import json
import shutil

import numpy as np
import onnx
import pytest

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle, sha256_file
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.session import CachedSession
from pocketlm.toolchain import export as export_mod
from pocketlm.toolchain.export import export_bundle
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.reference import reference_session

from conftest import TINY_VOCAB, tiny_hf_model

BACKENDS = ("onnx", "executorch")
STREAM = np.random.default_rng(1).integers(3, TINY_VOCAB, 70).tolist()


def _session(bundle, backend):
    return CachedSession(load_backend(bundle, backend), bundle.layout, bundle.rope_freq)


def _feed(session, ids):
    return np.concatenate([session.feed(ids[:17], keep_logits=True)] + [session.feed([t], keep_logits=True) for t in ids[17:]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_program_matches_the_reference_while_the_ring_wraps(tiny_bundle, backend):
    src, out = tiny_bundle
    bundle = Bundle.open(out)
    model, _ = load_model(src)
    ref = _feed(reference_session(model, bundle.layout), STREAM)
    ours = _feed(_session(bundle, backend), STREAM)
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_and_single_tokens_can_alternate_through_the_wrap(tiny_bundle, backend):
    """Each backend keeps state per step width (ONNX Runtime: buffers bound once per width; ExecuTorch:
    one method per width, the decode inputs written into tensors made once): prompts of every length
    up to two chunks, then single tokens, then prompts again, around the ring several times."""
    src, out = tiny_bundle
    bundle = Bundle.open(out)
    model, _ = load_model(src)
    pieces = [7, 1, 1, 3, 1, 12, 1, 1, 1, 2, 5, 1]
    ref = _feed_pieces(reference_session(model, bundle.layout), STREAM, pieces)
    ours = _feed_pieces(_session(bundle, backend), STREAM, pieces)
    assert ours.shape == (len(STREAM), TINY_VOCAB) and np.abs(ours - ref).max() < 1e-4


def _feed_pieces(session, ids, pieces):
    outs, i, k = [], 0, 0
    while i < len(ids):
        outs.append(session.feed(ids[i : i + pieces[k % len(pieces)]], keep_logits=True))
        i, k = i + len(outs[-1]), k + 1
    return np.concatenate(outs)


@pytest.mark.parametrize("row_block", [1, 4])
def test_onnx_binds_only_the_cache_rows_that_hold_tokens(tiny_bundle, row_block):
    """The float program's cache length is dynamic: the backend binds the rows a step reads and
    writes, in whole blocks, moving each head's rows apart as the ring fills (then the whole ring and
    the spare rows a wrapped step needs: each query's sink copies and the step's own tokens), and a
    reset starts again from one block. No step straddles the wrap. Chunks and single tokens through
    the wrap must equal the reference."""
    from pocketlm.runtime.backends.onnx import OnnxBackend

    src, out = tiny_bundle
    bundle = Bundle.open(out)
    backend = OnnxBackend(bundle.program_path("onnx"), bundle.cache_shapes(), program=bundle.manifest["programs"]["onnx"],
                          layout=bundle.layout, row_block=row_block)
    assert backend.capacity == row_block and backend.caches[0].shape[2] == row_block
    assert backend.chunk_break == bundle.layout.cache_len == 16
    capacities, set_capacity = [], backend._set_capacity
    backend._set_capacity = lambda c: capacities.append(c) or set_capacity(c)
    widths, step = [], backend.step
    backend.step = lambda inputs: widths.append(inputs.n_valid) or step(inputs)
    session = CachedSession(backend, bundle.layout, bundle.rope_freq)
    pieces = [7, 1, 1, 3, 1, 12, 1, 1, 1, 2, 5, 1]
    ref = _feed_pieces(reference_session(load_model(src)[0], bundle.layout), STREAM, pieces)
    assert np.abs(_feed_pieces(session, STREAM, pieces) - ref).max() < 1e-4
    # chunks of 5; the 12-token piece at 13 splits at the wrap (16): 3, then 5 and 4
    assert widths[:9] == [5, 2, 1, 1, 3, 1, 3, 5, 4], widths
    # ring 16, then (after the wrap) a 5-token step reads 16 + 5 * 4 sink copies + 5 rows: 41 at most
    assert backend.max_rows == 16 + 5 * (4 + 1)
    assert capacities == ([8, 12, 16, 41] if row_block == 4 else [5, 7, 8, 9, 12, 13, 16, 41]), capacities
    assert backend.capacity == backend.max_rows and backend.caches[0].shape[2] == backend.max_rows
    session.reset()
    assert backend.capacity == row_block
    fresh = _feed_pieces(reference_session(load_model(src)[0], bundle.layout), STREAM[:40], [7, 1, 12, 1, 5])
    assert np.abs(_feed_pieces(session, STREAM[:40], [7, 1, 12, 1, 5]) - fresh).max() < 1e-4


def test_onnx_program_without_sinks_matches_the_reference_while_the_ring_wraps(tiny_bundle, tmp_path):
    """No sink rows to re-rotate: past the wrap every token goes to the spare row, then to its slot."""
    src, _ = tiny_bundle
    bundle = Bundle.open(export_bundle(src, tmp_path / "no_sinks", backends=("onnx",), sink_size=0, window_size=12, chunk=5))
    pieces = [7, 1, 1, 3, 1, 12]
    ref = _feed_pieces(reference_session(load_model(src)[0], bundle.layout), STREAM, pieces)
    assert np.abs(_feed_pieces(_session(bundle, "onnx"), STREAM, pieces) - ref).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_starts_a_fresh_conversation(tiny_bundle, backend):
    session = _session(Bundle.open(tiny_bundle[1]), backend)
    first = session.feed(STREAM[:20], keep_logits=True)
    session.reset()
    assert np.abs(session.feed(STREAM[:20], keep_logits=True) - first).max() < 1e-5


def test_executorch_prompts_take_the_causal_prefill_while_the_cache_fills(tiny_bundle):
    """Prompt turns between decoded tokens: chunks that fit the filling cache go through the
    program's prefill_causal (only the last row's logits), later ones through the masked prefill;
    each turn's last logits must equal the reference's."""
    src, out = tiny_bundle
    bundle = Bundle.open(out)
    session = _session(bundle, "executorch")
    assert session.backend.causal_until == bundle.layout.cache_len == 16
    starts, prefill_last = [], session.backend.prefill_last
    session.backend.prefill_last = lambda step, start: starts.append(start) or prefill_last(step, start)
    ref = reference_session(load_model(src)[0], bundle.layout)
    fed = 0
    for turn in [7, 1, 3, 1, 1, 9, 1, 6, 1]:
        ids = STREAM[fed : fed + turn]
        fed += turn
        assert np.abs(session.feed(ids) - ref.feed(ids, keep_logits=True)[-1]).max() < 1e-4, fed
        # the masked prefill (its own packed weights) is loaded only once a chunk needs it
        assert (bundle.layout.chunk in session.backend.methods) == (fed > 13), fed
    assert starts == [0, 5, 8]  # the chunks at 13, 18 and 23 overrun the 16-slot cache: masked
    # a new conversation over the wrapped ring's leftovers (reset clears nothing in the program)
    session.reset()
    fresh = reference_session(load_model(src)[0], bundle.layout)
    for ids in (STREAM[40:43], [STREAM[43]], STREAM[44:52]):
        assert np.abs(session.feed(ids) - fresh.feed(ids, keep_logits=True)[-1]).max() < 1e-4
    assert starts == [0, 5, 8, 0, 3, 4, 9]  # the token at 3 precedes decode_from (4): a chunk


def test_onnx_io_follows_the_past_present_convention(tiny_bundle):
    m = onnx.load(str(tiny_bundle[1] / "model.onnx"), load_external_data=False)
    inputs, outputs = [i.name for i in m.graph.input], [o.name for o in m.graph.output]
    assert inputs[0] == "input_ids" and "past_key_values.1.value" in inputs
    assert outputs[0] == "logits" and "present.0.key" in outputs
    assert (tiny_bundle[1] / "model.onnx.data").exists()


def test_the_onnx_step_attends_with_one_fused_kernel_per_layer_and_its_norms_fuse(tiny_bundle, tmp_path):
    """Each layer's attention is one com.microsoft GroupQueryAttention, the only reader of the past
    cache and the writer of the present one (so nothing joins, transposes or copies the cache), and
    of the RoPE tables: it takes the fused q|k|v projection as it comes and rotates it itself, so no
    node lies between the projection and the kernel. ONNX Runtime fuses every RMSNorm into one
    SimplifiedLayerNormalization when it loads the graph."""
    import onnxruntime as ort

    m = onnx.load(str(tiny_bundle[1] / "model.onnx"), load_external_data=False)
    past = {i.name for i in m.graph.input if i.name.startswith("past_key_values.")}
    readers = [(n.op_type, n.domain) for n in m.graph.node for i in n.input if i in past]
    assert len(past) == 4 and readers == [("GroupQueryAttention", "com.microsoft")] * 4, readers
    writers = {o: n.op_type for n in m.graph.node for o in n.output}
    assert {writers[o.name] for o in m.graph.output if o.name.startswith("present.")} == {"GroupQueryAttention"}
    attention = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert [writers[n.input[0]] for n in attention] == ["MatMul"] * 2  # the q|k|v projection, nothing after it
    assert all(list(n.input[1:3]) == ["", ""] and list(n.input[7:9]) == ["cos_cache", "sin_cache"] for n in attention)
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in attention)
    tables = [n.op_type for n in m.graph.node for i in n.input if i in ("cos_cache", "sin_cache")]
    assert tables == ["GroupQueryAttention"] * 4
    assert not {"Neg", "Sin", "Cos"} & {n.op_type for n in m.graph.node}
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_bundle[1] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node
             if n.op_type == "SimplifiedLayerNormalization"]
    assert len(fused) == 2 * 2 + 1  # two layers' two norms and the final one


def test_bundle_holds_programs_tokenizer_and_manifest(tiny_bundle):
    bundle = Bundle.open(tiny_bundle[1])
    assert bundle.backends == ["executorch", "onnx"]
    m = bundle.manifest
    assert m["cache"] == {"sink_size": 4, "window_size": 12, "chunk": 5}
    assert [layer["n_kv_heads"] for layer in m["architecture"]["layers"]] == [2, 2]
    assert (bundle.root / "tokenizer.json").exists() and (bundle.root / "model.pte").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_equals_the_reference_greedy_loop(tiny_bundle, backend):
    src, out = tiny_bundle
    gen = Generator(out, backend)
    got = gen.generate(STREAM[:9], max_new_tokens=40)
    model, _ = load_model(src)
    ref = reference_session(model, gen.bundle.layout)
    logits, expected = ref.feed(STREAM[:9]), []
    for _ in range(40):
        token = int(np.argmax(logits))
        if token in gen.stop_ids:
            break
        expected.append(token)
        logits = ref.feed([token])
    assert got.tokens == expected


def test_a_prompt_longer_than_the_whole_cache_still_works(tiny_bundle):
    gen = Generator(tiny_bundle[1], "onnx")
    out = gen.generate(STREAM * 2, max_new_tokens=5)  # 140 tokens through a 16-slot cache
    assert out.prompt_tokens == 140 and gen.session.n_seen >= 140


def test_empty_prompt_is_refused(tiny_bundle):
    with pytest.raises(PocketLMError, match=r"empty prompt"):
        Generator(tiny_bundle[1], "onnx").generate([])


def test_unknown_backend_is_refused(tiny_bundle, tmp_path):
    with pytest.raises(PocketLMError, match=r"unknown backend \['tflite'\]"):
        export_bundle(tiny_bundle[0], tmp_path / "x", ("tflite",))
    with pytest.raises(PocketLMError, match=r"unknown backend 'tflite'"):
        Generator(tiny_bundle[1], "tflite")


def test_a_failed_export_leaves_no_bundle(tiny_bundle, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(export_mod, "_export_one", boom)
    with pytest.raises(RuntimeError):
        export_bundle(tiny_bundle[0], tmp_path / "out" / "b", ("onnx",), window_size=12, chunk=4)
    assert list((tmp_path / "out").iterdir()) == []


def test_onnx_programs_the_runtime_cannot_run_are_refused_with_the_fix(tiny_bundle, tiny_tokenizer_dir, tmp_path):
    """A model whose heads ONNX Runtime cannot rotate is refused before any export work; a
    program of the short-lived form that rotated outside GroupQueryAttention asks for a re-export."""
    src = tmp_path / "hd8"
    tiny_hf_model(head_dim=8).save_pretrained(src)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    for backends in (("onnx",), ("executorch", "onnx")):  # refused before the ExecuTorch export's minutes
        with pytest.raises(PocketLMError, match=r"has head_dim 8: export it with --backend executorch"):
            export_bundle(src, tmp_path / "out" / "b", backends, window_size=12, chunk=4)
    assert not any((tmp_path / "out").glob("*"))
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle[1], old)
    m = onnx.load(str(old / "model.onnx"), load_external_data=False)
    rename = {"cos_cache": "cos", "sin_cache": "sin"}  # that form's inputs: per-step tables
    for value in m.graph.input:
        value.name = rename.get(value.name, value.name)
    for node in m.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    onnx.save(m, str(old / "model.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(old / "model.onnx")
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PocketLMError, match=r"rotates its queries outside GroupQueryAttention.*re-export"):
        Generator(old, "onnx")


def test_not_a_bundle_and_unknown_schema_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(PocketLMError, match=r"not a pocketlm bundle \(no manifest.json\)"):
        Bundle.open(tmp_path)
    manifest = json.loads((tiny_bundle[1] / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PocketLMError, match=r"schema version 99 is not supported"):
        Bundle.open(tmp_path)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chat_bundle(tiny_bundle, tmp_path):
    import shutil

    out = shutil.copytree(tiny_bundle[1], tmp_path / "chat")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["chat_template"] = CHAT_TEMPLATE
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_chat_cli_answers_each_turn(chat_bundle, monkeypatch, capsys):
    from pocketlm.toolchain import cli

    lines = iter(["hello there", "and again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(chat_bundle), "--backend", "onnx", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.count("bot> ") == 2


def test_a_second_chat_turn_feeds_only_what_the_cache_has_not_seen(chat_bundle):
    gen = Generator(chat_bundle, "onnx")
    messages = [{"role": "user", "content": "hello there"}]
    first = gen.chat_turn(messages, max_new_tokens=6)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    seen = gen.session.n_seen
    second = gen.chat_turn(messages, max_new_tokens=6)
    full = gen.chat_ids(messages)
    assert second.prompt_tokens < len(full)  # incremental, not the whole history again
    assert gen.session.n_seen == seen + second.prompt_tokens + len(second.tokens) - (second.stopped == "max_new_tokens")
    assert len(gen.history) == gen.session.n_seen
