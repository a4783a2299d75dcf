"""Fusing the linears that share an input (q|k|v, gate|up) keeps the model's function, keeps every
row on its quantization grid, and survives pruned layers of different sizes and biased projections."""

from __future__ import annotations

import copy

import torch

from pocketlm.toolchain.export.onnx_quant import grid_codes
from pocketlm.toolchain.model import convert, surgery
from pocketlm.toolchain.model.fuse import fuse_projections_
from pocketlm.toolchain.quant.rtn import WeightQuantSpec, fake_quant

from conftest import TINY_VOCAB, tiny_hf_model

TOKENS = torch.randint(0, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))


def test_fused_projections_compute_the_same_logits_on_pruned_and_biased_layers():
    model = convert.from_hf_model(tiny_hf_model("qwen2"))  # q/k/v carry biases
    surgery.keep_kv_heads_(model, 0, [1])
    surgery.keep_mlp_channels_(model, 1, list(range(0, model.config.layers[1].hidden_dim, 2)))
    fused = fuse_projections_(copy.deepcopy(model))
    names = {n for n, _ in fused.named_modules()}
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.self_attn.q_proj" not in names
    assert "model.layers.1.mlp.gate_up_proj" in names and "model.layers.1.mlp.up_proj" not in names
    with torch.no_grad():
        assert (fused(TOKENS) - model(TOKENS)).abs().max() < 1e-5


def test_a_fused_weight_stays_on_the_int4_grid_with_the_same_codes():
    model = convert.from_hf_model(tiny_hf_model())
    spec = WeightQuantSpec(bits=4, group_size=16)
    with torch.no_grad():
        for lin in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.data = fake_quant(lin.weight, spec)
    attn = model.model.layers[0].self_attn
    parts = [grid_codes(p.weight.detach().numpy(), 16) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fuse_projections_(model)
    codes, scales = grid_codes(attn.qkv_proj.weight.detach().numpy(), 16)
    assert (codes == torch.cat([torch.from_numpy(c) for c, _ in parts]).numpy()).all()
    assert (scales == torch.cat([torch.from_numpy(s) for _, s in parts]).numpy()).all()
