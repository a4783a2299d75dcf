"""Quantization on the real default model: RTN's damage is measurable, AWQ repairs part of it, and
the int4 program stores the tied table once, as int8 codes."""

from __future__ import annotations

import pytest

from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.quantize import quantize_source

pytestmark = pytest.mark.real_model
TOKENS = 2048


def _ppl(source) -> float:
    return evaluate_perplexity(source, max_tokens=TOKENS, show_progress=False).ppl


@pytest.fixture(scope="module")
def fp32_ppl(real):
    return _ppl(real.source)


def test_awq_closes_part_of_rtns_int4_gap_on_the_default_model(real, fp32_ppl, real_awq_g64, tmp_path):
    rtn = _ppl(quantize_source(real.source, tmp_path / "rtn", scheme="w4-rtn", group_size=64))
    awq = _ppl(real_awq_g64)
    assert fp32_ppl < rtn < 2 * fp32_ppl  # int4 g64 costs something, and not everything
    assert fp32_ppl < awq < rtn - 0.2 * (rtn - fp32_ppl), (fp32_ppl, rtn, awq)


def test_int8_weights_are_nearly_lossless_on_the_default_model(real, fp32_ppl, tmp_path):
    w8 = _ppl(quantize_source(real.source, tmp_path / "w8", scheme="w8-rtn"))
    assert abs(w8 / fp32_ppl - 1) < 0.02, (fp32_ppl, w8)


def test_the_int4_onnx_program_keeps_one_int8_table_for_the_tied_head_and_lookup_on_the_default_model(real, tmp_path):
    """w4-rtn g64 with the int8 head: 120 int4 MatMulNBits (4 a layer, q|k|v and gate|up fused; about
    50 MB), the head's 28 MB of int8 codes also read by the embedding lookup; a float32 copy of the table alone would be 113 MB."""
    from pocketlm.runtime.bundle import Bundle
    from pocketlm.runtime.profile import file_sizes
    from pocketlm.runtime.validate import validate_backend
    from pocketlm.toolchain.export import export_bundle

    folder = quantize_source(real.source, tmp_path / "w4", scheme="w4-rtn", group_size=64, head="int8")
    bundle = Bundle.open(export_bundle(folder, tmp_path / "bundle", ("onnx",), sink_size=4, window_size=508, chunk=32))
    assert bundle.manifest["programs"]["onnx"]["weights"].endswith("embedding int8 (the LM head's codes, GatherBlockQuantized)")
    size = file_sizes(bundle)["programs"]["onnx"]
    assert size < 100e6, size
    report = validate_backend(bundle, "onnx")
    assert report["passed"], report["checks"]
