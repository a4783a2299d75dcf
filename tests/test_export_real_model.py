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
    starts, prefill_last = [], getattr(gen.session.backend, "prefill_last", None)  # ONNX: never called
    gen.session.backend.prefill_last = lambda step, start: starts.append(start) or prefill_last(step, start)
    out = gen.generate(chat_prompt, max_new_tokens=NEW_TOKENS)
    assert len(chat_prompt) + NEW_TOKENS > 4 * 64  # the ring wrapped several times
    assert out.tokens == reference_greedy
    # the prompt fits the 64-slot cache: on ExecuTorch each of its chunks took prefill_causal
    assert len(chat_prompt) <= 64
    chunk = Bundle.open(real_bundle).layout.chunk
    assert starts == ([s for s in range(0, len(chat_prompt), chunk) if len(chat_prompt) - s > 1] if backend == "executorch" else [])


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


def test_exported_default_model_validates_profiles_and_reports_against_its_target(real_bundle, tmp_path):
    """The runtime half end to end on the real model: golden parity and perplexity on both backends,
    budgets of generic-x86-cpu from a profile, and the report rendered in a real browser."""
    from pocketlm.runtime.profile import profile_bundle
    from pocketlm.runtime.report import build_report, write_report
    from pocketlm.runtime.validate import validate_bundle

    from test_report import CHROMIUM, _render

    profile = profile_bundle(real_bundle, None, [2], runs=1, new_tokens=32)
    report = validate_bundle(real_bundle, None, "generic-x86-cpu", threads=2, profile=profile)
    for backend in BACKENDS:
        r = report["backends"][backend]
        assert r["passed"], r["checks"]
        assert r["parity"]["identical_greedy_prefix"] == [32, 32]
        assert abs(r["perplexity"]["delta_pct"]) < 0.1
        point = next(p for p in profile["points"] if p["backend"] == backend)
        assert point["decode_tok_s"] > 10 and point["peak_rss_bytes"] > 300e6  # the weights alone are 540 MB in fp32
    _, html = write_report(build_report(real_bundle, report, profile), tmp_path)
    if CHROMIUM:
        assert 'data-plots-rendered="6"' in _render(html, tmp_path)
