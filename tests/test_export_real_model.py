"""The exported default model (SmolLM2-135M-Instruct) against the PyTorch reference with the same cache:
the float32 ONNX program exactly, the int4 ExecuTorch program (the fast bundle, int8 activations) against
the same int4 weights in float. One ExecuTorch lowering of the real model per session (conftest)."""

import numpy as np
import pytest
import torch

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.sink_cache import CacheLayout
from pocketlm.runtime.text import load_text
from pocketlm.runtime.tokenizer import Tokenizer
from pocketlm.toolchain import cli
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.reference import reference_session

from conftest import REAL_LAYOUT

pytestmark = pytest.mark.real_model
NEW_TOKENS = 256
# make test runs two xdist workers; the tests of each real-model bundle stay on one worker, so each
# bundle is exported once a session (the int4 one with the other tests of the AWQ weights)
FP32, INT4 = pytest.mark.xdist_group("real-fp32"), pytest.mark.xdist_group("real-int4")


@pytest.fixture(scope="module")
def stream(real):
    return Tokenizer(real.source.path).encode(load_text(None, "eval"))[:200]


def _teacher_forced(session, stream):
    """A 100-token prompt (7 chunks), then 100 single-token steps: 200 tokens through 64 slots."""
    return np.concatenate([session.feed(stream[:100], keep_logits=True)] + [session.feed([t], keep_logits=True) for t in stream[100:]])


@pytest.fixture(scope="module")
def reference(real, stream):
    layout = CacheLayout(**REAL_LAYOUT)
    return _teacher_forced(reference_session(real.model, layout), stream)


@pytest.fixture(scope="module")
def chat_prompt(real_bundle):
    gen = Generator(real_bundle, "onnx")
    return gen.chat_ids([{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])


@pytest.fixture(scope="module")
def reference_greedy(real, chat_prompt):
    session = reference_session(real.model, CacheLayout(**REAL_LAYOUT))
    logits, tokens = session.feed(chat_prompt), []
    for _ in range(NEW_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = session.feed([tokens[-1]])
    return tokens


@FP32
def test_exported_logits_match_the_reference_while_the_ring_wraps(real_bundle, reference, stream):
    bundle = Bundle.open(real_bundle)
    session = CachedSession(load_backend(bundle, "onnx"), bundle.layout, bundle.rope_freq)
    ours = _teacher_forced(session, stream)
    assert np.abs(ours - reference).max() <= 1e-3


@FP32
def test_exported_greedy_tokens_equal_the_reference_for_256_new_tokens(real_bundle, chat_prompt, reference_greedy):
    gen = Generator(real_bundle, "onnx")
    gen.stop_ids = set()  # all 256 tokens, even past the end of the answer
    out = gen.generate(chat_prompt, max_new_tokens=NEW_TOKENS)
    assert len(chat_prompt) + NEW_TOKENS > 4 * 64  # the ring wrapped several times
    assert out.tokens == reference_greedy


@INT4
def test_the_int4_executorch_program_follows_its_own_weights_while_the_ring_wraps(real_int4_bundle, real_awq_g64, stream):
    """Its int8 activations make it inexact, so it is held to the PyTorch reference of the same int4
    weights in float: teacher-forced, 100 prompt tokens through the masked prefill, then 100 decode
    steps, wrapping the 64 slots three times. A wrong slot or RoPE position after a wrap leaves the
    predictions unrelated to the reference's (a broken cache agrees on a minority of tokens)."""
    model, _ = load_model(real_awq_g64)
    reference = _teacher_forced(reference_session(model, CacheLayout(**REAL_LAYOUT)), stream)
    bundle = Bundle.open(real_int4_bundle)
    ours = _teacher_forced(CachedSession(load_backend(bundle, "executorch"), bundle.layout, bundle.rope_freq), stream)
    cosine = (ours * reference).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))
    top1 = (ours.argmax(-1) == reference.argmax(-1))
    wrapped = slice(64, None)  # every position after the first wrap
    assert top1[wrapped].mean() >= 0.9 and cosine[wrapped].mean() >= 0.99, (top1[wrapped].mean(), cosine[wrapped].min(), cosine[wrapped].mean())
    # a prompt that fits the cache takes prefill_causal for each of its chunks
    gen = Generator(real_int4_bundle, "executorch")
    chat_prompt = gen.chat_ids([{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    starts, prefill_last = [], gen.session.backend.prefill_last
    gen.session.backend.prefill_last = lambda step, start: starts.append(start) or prefill_last(step, start)
    gen.generate(chat_prompt, max_new_tokens=4)
    assert len(chat_prompt) <= 64
    assert starts == [s for s in range(0, len(chat_prompt), bundle.layout.chunk) if len(chat_prompt) - s > 1]


def test_within_capacity_the_reference_equals_hugging_face_dense_cache(real, stream):
    session = reference_session(real.model, CacheLayout(4, 124, 16))
    ours = session.feed(stream[:40], keep_logits=True)
    ours = np.concatenate([ours] + [session.feed([t], keep_logits=True) for t in stream[40:128]])
    with torch.no_grad():
        ref = real.hf(torch.tensor([stream[:128]])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("backend,bundle", [pytest.param("onnx", "real_bundle", marks=FP32),
                                            pytest.param("executorch", "real_int4_bundle", marks=INT4)])
def test_generate_cli_answers_the_demo_question(request, capsys, backend, bundle):
    rc = cli.main(["generate", str(request.getfixturevalue(bundle)), "--backend", backend, "--prompt",
                   "What is the capital of France?", "--max-new-tokens", "24"])
    assert rc == 0
    assert "The capital of France is Paris." in capsys.readouterr().out


@FP32
def test_exported_default_model_passes_the_parity_harness_exactly(real_bundle):
    """The harness on the float32 program, with generic-x86-cpu's thresholds (max |dlogit| 1e-3, top-1 1.0,
    perplexity within 1%); the int4 bundle's validation, profile and report are in test_quantize_real_model."""
    from pocketlm.runtime.targets import load_target
    from pocketlm.runtime.validate import validate_backend

    r = validate_backend(Bundle.open(real_bundle), "onnx", thresholds=load_target("generic-x86-cpu").parity)
    assert r["passed"], r["checks"]
    assert r["parity"]["identical_greedy_prefix"] == [32, 32]
    assert abs(r["perplexity"]["delta_pct"]) < 0.1
