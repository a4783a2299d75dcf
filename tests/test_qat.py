"""QAT: the forward pass sees exactly the export's quantized weights, gradients reach the float masters,
a short run lowers the distillation loss, and the result is on the grid the export expects."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain.model import convert
from pocketlm.toolchain.quant.awq import quantize_model_
from pocketlm.toolchain.quant.qat import attach_fake_quant_, detach_fake_quant_, qat_train_
from pocketlm.toolchain.quant.rtn import WeightQuantSpec
from pocketlm.toolchain.quantize import quantize_source

from conftest import TINY_VOCAB, tiny_hf_model

SPEC = WeightQuantSpec(4, 16, True)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


def _tiny():
    return convert.from_hf_model(tiny_hf_model())


def test_fake_quant_forward_equals_the_exported_quantized_model():
    x = torch.randint(0, TINY_VOCAB, (2, 24))
    fq, q = _tiny(), _tiny()
    attach_fake_quant_(fq, SPEC)
    with torch.no_grad():
        quantize_model_(q, SPEC, head="float")
        assert torch.allclose(fq(x), q(x), atol=1e-5)
    detach_fake_quant_(fq)
    assert torch.equal(fq.model.layers[0].mlp.up_proj.weight, _tiny().model.layers[0].mlp.up_proj.weight)  # masters untouched


def test_gradients_pass_straight_through_to_the_float_weights():
    m = _tiny()
    attach_fake_quant_(m, SPEC)
    m(torch.randint(0, TINY_VOCAB, (1, 8))).sum().backward()
    g = m.model.layers[1].self_attn.o_proj.parametrizations.weight.original.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("spec", [SPEC, "ternary"])
def test_a_short_qat_run_lowers_the_distillation_loss(spec):
    teacher, student = _tiny(), _tiny()
    tokens = torch.randint(0, TINY_VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    out = qat_train_(student, teacher, tokens, spec, steps=60, lr=3e-3, batch=4, device="cpu", log_every=0)
    first, last = sum(out["losses"][:10]) / 10, sum(out["losses"][-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert not any("parametrizations" in n for n, _ in student.named_parameters())  # plain float masters again


def test_quantize_with_qat_writes_on_grid_weights_and_records_the_run(tiny_hf_folder, tmp_path):
    out = quantize_source(tiny_hf_folder, tmp_path / "q", scheme="w4-rtn", group_size=16, qat_steps=4, qat_batch=2)
    meta = json.loads((out / "pocketlm_model.json").read_text())
    qat = meta["stages"][-1]["qat"]
    assert qat["steps"] == 4 and qat["loss_first"] is not None and len(json.loads((out / "qat_losses.json").read_text())) == 4
    w = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 16)) <= 15


def test_ternary_needs_qat_and_yields_three_values_per_tensor(tiny_hf_folder, tmp_path):
    with pytest.raises(PocketLMError, match="needs quantization-aware training: pass --qat-steps N"):
        quantize_source(tiny_hf_folder, tmp_path / "t0", scheme="w2-ternary")
    out = quantize_source(tiny_hf_folder, tmp_path / "t", scheme="w2-ternary", qat_steps=2, qat_batch=2)
    w = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    assert len(torch.unique(w)) <= 3
    with pytest.raises(PocketLMError, match="QAT starts from round-to-nearest"):
        quantize_source(tiny_hf_folder, tmp_path / "a", scheme="w4-awq", group_size=16, qat_steps=2)
