"""Quantization on the real default model: RTN's damage is measurable, AWQ repairs part of it."""

from __future__ import annotations

import pytest

from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.toolchain.quant.awq import AwqConfig
from pocketlm.toolchain.quantize import quantize_source

pytestmark = pytest.mark.real_model
TOKENS = 2048
# a cheaper search than the default (which the benchmark uses), so the suite stays fast
CI_AWQ = AwqConfig(n_grid=10, clip_grid=10, search_tokens=1024, gram_tokens=2048)


def _ppl(source) -> float:
    return evaluate_perplexity(source, max_tokens=TOKENS, show_progress=False).ppl


@pytest.fixture(scope="module")
def fp32_ppl(real):
    return _ppl(real.source)


def test_awq_closes_part_of_rtns_int4_gap_on_the_default_model(real, fp32_ppl, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    rtn = _ppl(quantize_source(real.source, root / "rtn", scheme="w4-rtn", group_size=64))
    awq = _ppl(quantize_source(real.source, root / "awq", scheme="w4-awq", group_size=64, awq_config=CI_AWQ, calib_seqs=4))
    assert fp32_ppl < rtn < 2 * fp32_ppl  # int4 g64 costs something, and not everything
    assert fp32_ppl < awq < rtn - 0.2 * (rtn - fp32_ppl), (fp32_ppl, rtn, awq)


def test_int8_weights_are_nearly_lossless_on_the_default_model(real, fp32_ppl, tmp_path):
    w8 = _ppl(quantize_source(real.source, tmp_path / "w8", scheme="w8-rtn"))
    assert abs(w8 / fp32_ppl - 1) < 0.02, (fp32_ppl, w8)
