"""Quantization on the real default model: RTN's damage is measurable, AWQ repairs part of it, and the
fast int4 bundle of the AWQ weights (conftest's real_int4_bundle) runs on both backends, storing the tied
table once, as int8 codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.generate import Generator
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.sink_cache import CacheLayout
from pocketlm.toolchain import cli
from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.quantize import quantize_source
from pocketlm.toolchain.reference import reference_session

from conftest import REAL_LAYOUT, teacher_forced

pytestmark = pytest.mark.real_model
TOKENS = 2048


def _ppl(source) -> float:
    return evaluate_perplexity(source, max_tokens=TOKENS, show_progress=False).ppl


@pytest.fixture(scope="module")
def fp32_ppl(real):
    return _ppl(real.source)


def test_awq_closes_part_of_rtns_int4_gap_on_the_default_model(real, fp32_ppl, real_awq_g64, tmp_path):
    rtn = _ppl(quantize_source(real.source, tmp_path / "rtn", scheme="w4-rtn", group_size=64, head="int8"))
    awq = _ppl(real_awq_g64)
    assert fp32_ppl < rtn < 2 * fp32_ppl  # int4 g64 costs something, and not everything
    assert fp32_ppl < awq < rtn - 0.2 * (rtn - fp32_ppl), (fp32_ppl, rtn, awq)


def test_the_searched_head_clip_repairs_most_of_what_an_int4_head_costs_on_the_default_model(real, real_awq_g64, tmp_path):
    """The same AWQ body three ways: int8 head, int4 head clipped by the search, int4 head rounded to
    nearest (the search's head clip removed from its awq.json)."""
    search = json.loads((real_awq_g64 / "awq.json").read_text())
    assert len(search["clip"].pop("lm_head")) == real.model.config.vocab_size
    (tmp_path / "no_head_clip.json").write_text(json.dumps(search))

    def int4_head(awq_results, name):
        return _ppl(quantize_source(real.source, tmp_path / name, scheme="w4-awq", group_size=64, head="same",
                                    awq_results=awq_results))

    int8 = _ppl(real_awq_g64)
    clipped = int4_head(real_awq_g64 / "awq.json", "clipped")
    rounded = int4_head(tmp_path / "no_head_clip.json", "rounded")
    # CI's coarse search (clip ratios in steps of 0.1, 2,048 Gram tokens) measured 18.44 / 20.83 / 22.46,
    # 40% of the gap; the default search's finer ratios do better (bench/head_ppl.py)
    assert int8 < clipped < rounded - 0.25 * (rounded - int8), (int8, clipped, rounded)


def test_int8_weights_are_nearly_lossless_on_the_default_model(real, fp32_ppl, tmp_path):
    w8 = _ppl(quantize_source(real.source, tmp_path / "w8", scheme="w8-rtn"))
    assert abs(w8 / fp32_ppl - 1) < 0.02, (fp32_ppl, w8)


def test_the_int4_executorch_program_follows_its_own_weights_while_the_ring_wraps(real_int4_bundle, real_awq_g64, real_stream):
    """Its int8 activations make it inexact, so it is held to the PyTorch reference of the same int4
    weights in float: teacher-forced, 100 prompt tokens through the masked prefill, then 100 decode
    steps, wrapping the 64 slots three times. A wrong slot or RoPE position after a wrap leaves the
    predictions unrelated to the reference's (a broken cache agrees on a minority of tokens)."""
    model, _ = load_model(real_awq_g64)
    reference = teacher_forced(reference_session(model, CacheLayout(**REAL_LAYOUT)), real_stream)
    bundle = Bundle.open(real_int4_bundle)
    ours = teacher_forced(CachedSession(load_backend(bundle, "executorch"), bundle.layout, bundle.rope_freq), real_stream)
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


def test_generate_cli_answers_the_demo_question_from_the_int4_executorch_program(real_int4_bundle, capsys):
    rc = cli.main(["generate", str(real_int4_bundle), "--backend", "executorch", "--prompt",
                   "What is the capital of France?", "--max-new-tokens", "24"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out  # int4 weights may word it otherwise than float32's sentence


def test_the_fast_int4_bundle_validates_profiles_and_reports_on_both_backends_on_the_default_model(real, real_int4_bundle, tmp_path):
    """w4-awq g64 with the int8 head, the bundle a phone gets: ONNX Runtime runs 120 int4 MatMulNBits (4 a
    layer, q|k|v and gate|up fused; about 50 MB) and reads the head's 28 MB of int8 codes for the embedding
    lookup too (a float32 copy of the table alone would be 113 MB); ExecuTorch runs the same codes as XNNPACK
    8da4w, the head as 8da8w. Each program is under a fifth of its backend's float32 program, passes the
    parity harness and the budgets of generic-x86-cpu from a profile, and the report renders in a
    real browser."""
    from pocketlm.runtime.profile import file_sizes, profile_bundle
    from pocketlm.runtime.report import build_report, write_report
    from pocketlm.runtime.validate import validate_bundle

    from test_report import CHROMIUM, _render

    bundle = Bundle.open(real_int4_bundle)
    programs = bundle.manifest["programs"]
    assert programs["onnx"]["weights"].endswith("embedding int8 (the LM head's codes, GatherBlockQuantized)")
    assert programs["executorch"]["weights"] == ("int4 XNNPACK 8da4w, group 64, 120 linears + int8 per channel, "
                                                 "XNNPACK 8da8w, 1 linear; embedding int8 (embedding_byte)")
    sizes, c = file_sizes(bundle)["programs"], real.model.config
    # the float32 programs' weights: ONNX stores the tied table once (538 MB), ExecuTorch twice (652 MB)
    fp32 = {"onnx": 4 * real.model.num_parameters(), "executorch": 4 * (real.model.num_parameters() + c.vocab_size * c.dim)}
    assert sizes["onnx"] < 100e6, sizes
    assert all(sizes[b] < 0.2 * fp32[b] for b in ("onnx", "executorch")), (sizes, fp32)
    profile = profile_bundle(real_int4_bundle, None, [2], runs=1, new_tokens=32)
    report = validate_bundle(real_int4_bundle, None, "generic-x86-cpu", threads=2, profile=profile)
    for backend in ("onnx", "executorch"):
        r = report["backends"][backend]
        assert r["passed"], (backend, r["checks"])
        assert r["parity"]["top1_agreement"] >= 0.9, (backend, r["parity"])
        point = next(p for p in profile["points"] if p["backend"] == backend)
        assert point["decode_tok_s"] > 10, point
    _, html = write_report(build_report(real_int4_bundle, report, profile), tmp_path)
    if CHROMIUM:
        assert 'data-plots-rendered="6"' in _render(html, tmp_path)
