"""The exported default model (SmolLM2-135M-Instruct), float32 on ONNX Runtime, against the PyTorch
reference with the same cache, exactly. ExecuTorch meets the real model as the int4 fast bundle
(test_quantize_real_model.py): one ExecuTorch lowering of the real model per session (conftest)."""

import numpy as np
import pytest
import torch

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.sink_cache import CacheLayout
from pocketlm.toolchain import cli
from pocketlm.toolchain.reference import reference_session

from conftest import REAL_LAYOUT, teacher_forced

pytestmark = pytest.mark.real_model
NEW_TOKENS = 256


@pytest.fixture(scope="module")
def reference(real, real_stream):
    layout = CacheLayout(**REAL_LAYOUT)
    return teacher_forced(reference_session(real.model, layout), real_stream)


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


def test_exported_logits_match_the_reference_while_the_ring_wraps(real_bundle, reference, real_stream):
    bundle = Bundle.open(real_bundle)
    session = CachedSession(load_backend(bundle, "onnx"), bundle.layout, bundle.rope_freq)
    ours = teacher_forced(session, real_stream)
    assert np.abs(ours - reference).max() <= 1e-3


def test_exported_greedy_tokens_equal_the_reference_for_256_new_tokens(real_bundle, chat_prompt, reference_greedy):
    gen = Generator(real_bundle, "onnx")
    gen.stop_ids = set()  # all 256 tokens, even past the end of the answer
    out = gen.generate(chat_prompt, max_new_tokens=NEW_TOKENS)
    assert len(chat_prompt) + NEW_TOKENS > 4 * 64  # the ring wrapped several times
    assert out.tokens == reference_greedy


def test_within_capacity_the_reference_equals_hugging_face_dense_cache(real, real_stream):
    session = reference_session(real.model, CacheLayout(4, 124, 16))
    ours = session.feed(real_stream[:40], keep_logits=True)
    ours = np.concatenate([ours] + [session.feed([t], keep_logits=True) for t in real_stream[40:128]])
    with torch.no_grad():
        ref = real.hf(torch.tensor([real_stream[:128]])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


def test_generate_cli_answers_the_demo_question(real_bundle, capsys):
    rc = cli.main(["generate", str(real_bundle), "--backend", "onnx", "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "24"])
    assert rc == 0
    assert "The capital of France is Paris." in capsys.readouterr().out


def test_exported_default_model_passes_the_parity_harness_exactly(real_bundle):
    """The harness on the float32 program, with generic-x86-cpu's thresholds (max |dlogit| 1e-3, top-1 1.0,
    perplexity within 1%); the int4 bundle's validation, profile and report are in test_quantize_real_model."""
    from pocketlm.runtime.targets import load_target
    from pocketlm.runtime.validate import validate_backend

    r = validate_backend(Bundle.open(real_bundle), "onnx", thresholds=load_target("generic-x86-cpu").parity)
    assert r["passed"], r["checks"]
    assert r["parity"]["identical_greedy_prefix"] == [32, 32]
    assert abs(r["perplexity"]["delta_pct"]) < 0.1
