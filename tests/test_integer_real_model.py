"""Integer-only programs on the real default model (SmolLM2-135M-Instruct): the exported W8A8 integer
program reproduces the numpy integer reference bit for bit on the golden prompts, and its perplexity
stays within 2% of the float32 model's under the same protocol (ctx 512, 2,048 tokens of the eval
text). The W4A8 integer program (int4 groups of 64) is bit-exact too, within 3% of its own weights'
float model (no rotation: its int8 activations keep their outlier channels; measured +2.46% on these
2,048 tokens), and its file is under 0.6 of the W8A8 program's (the 120 linears' weights halve, and
the tied embedding and LM head stay one 28 MB int8 table, where W8A8's rotation unties them into two).

ExecuTorch's XNNPACK int8 kernels meet the real model in the fast int4 bundle (its LM head is 8da8w,
test_quantize_real_model.py); the all-8da8w W8A8 program is validated on tiny models
(test_integer_model.py), since a second real-model ExecuTorch export would cost the suite 10 minutes."""

from __future__ import annotations

import json

import pytest

from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.validate import validate_backend
from pocketlm.toolchain.evaluate import evaluate_perplexity
from pocketlm.runtime.profile import file_sizes
from pocketlm.toolchain.export import export_bundle
from pocketlm.toolchain.quantize import quantize_source

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def w8a8_bundle(real, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8_real")
    folder = quantize_source(real.source, root / "w8a8", scheme="w8a8-int", calib_seqs=8)
    # a 4 + 508 cache holds each 512-token window whole, so the perplexity protocol matches the dense model's
    return Bundle.open(export_bundle(folder, root / "bundle", ("onnx",), sink_size=4, window_size=508, chunk=32))


def test_integer_program_is_bit_exact_and_within_2_percent_of_fp32_on_the_default_model(real, w8a8_bundle):
    report = validate_backend(w8a8_bundle, "onnx")
    assert report["passed"], report["checks"]
    parity, ppl = report["parity"], report["perplexity"]
    assert parity["max_logits_abs"] == 0.0 and parity["identical_greedy_prefix"] == [32, 32]
    max_tokens = w8a8_bundle.reference["perplexity"]["max_tokens"]  # what the validation scored, same windows
    fp32 = evaluate_perplexity(real.source, max_tokens=max_tokens, show_progress=False)
    assert fp32.tokens == ppl["tokens"]
    assert ppl["ppl"] / fp32.ppl - 1 < 0.02, (ppl["ppl"], fp32.ppl)


def test_w4a8_integer_program_is_bit_exact_and_close_to_its_float_weights_on_the_default_model(real, w8a8_bundle, real_awq_g64, tmp_path):
    # the w4-awq search re-applied (the same search on the same float model), so it is paid once a session
    folder = quantize_source(real.source, tmp_path / "w4a8", scheme="w4a8-int", group_size=64,
                             awq_results=real_awq_g64 / "awq.json", calib_seqs=4)
    assert json.loads((folder / "pocketlm_model.json").read_text())["quantization"]["scheme"] == "w4a8-int"
    bundle = Bundle.open(export_bundle(folder, tmp_path / "bundle", ("onnx",), sink_size=4, window_size=508, chunk=32))
    assert bundle.manifest["programs"]["onnx"]["weights"].startswith("int4 groups of 64 in 120 matmuls, int8 per output channel in 1 matmul")
    report = validate_backend(bundle, "onnx")
    assert report["passed"], report["checks"]
    assert report["parity"]["max_logits_abs"] == 0.0 and report["parity"]["identical_greedy_prefix"] == [32, 32]
    assert bundle.manifest["programs"]["onnx"]["parity_thresholds"]["max_ppl_delta_pct"] == 4.0
    assert abs(report["perplexity"]["delta_pct"]) < 4.0
    size, w8a8_size = file_sizes(bundle)["programs"]["onnx"], file_sizes(w8a8_bundle)["programs"]["onnx"]
    assert size < 0.6 * w8a8_size, (size, w8a8_size)
