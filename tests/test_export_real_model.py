"""The exported default model (SmolLM2-135M-Instruct) against the PyTorch reference with the same cache."""

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
from pocketlm.toolchain.reference import reference_session

from conftest import REAL_LAYOUT

pytestmark = pytest.mark.real_model
BACKENDS = ("onnx", "executorch")
NEW_TOKENS = 256


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_logits_match_the_reference_while_the_ring_wraps(real_bundle, reference, stream, backend):
    bundle = Bundle.open(real_bundle)
    session = CachedSession(load_backend(bundle, backend), bundle.layout, bundle.rope_freq)
    ours = _teacher_forced(session, stream)
    assert np.abs(ours - reference).max() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_greedy_tokens_equal_the_reference_for_256_new_tokens(real_bundle, chat_prompt, reference_greedy, backend):
    gen = Generator(real_bundle, backend)
    gen.stop_ids = set()  # all 256 tokens, even past the end of the answer
    out = gen.generate(chat_prompt, max_new_tokens=NEW_TOKENS)
    assert len(chat_prompt) + NEW_TOKENS > 4 * 64  # the ring wrapped several times
    assert out.tokens == reference_greedy


def test_within_capacity_the_reference_equals_hugging_face_dense_cache(real, stream):
    session = reference_session(real.model, CacheLayout(4, 124, 16))
    ours = session.feed(stream[:40], keep_logits=True)
    ours = np.concatenate([ours] + [session.feed([t], keep_logits=True) for t in stream[40:128]])
    with torch.no_grad():
        ref = real.hf(torch.tensor([stream[:128]])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_cli_answers_the_demo_question(real_bundle, capsys, backend):
    rc = cli.main(["generate", str(real_bundle), "--backend", backend, "--prompt", "What is the capital of France?", "--max-new-tokens", "24"])
    assert rc == 0
    assert "The capital of France is Paris." in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_default_model_passes_parity_against_its_golden_outputs(real_bundle, backend):
    from pocketlm.runtime.validate import validate_backend

    report = validate_backend(Bundle.open(real_bundle), backend)
    assert report["passed"], report["checks"]
    assert report["parity"]["identical_greedy_prefix"] == [32, 32]
