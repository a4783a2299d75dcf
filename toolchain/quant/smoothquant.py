"""SmoothQuant (Xiao et al. 2023) with a per-site search: move activation outliers into the weights
before int8 activations.

A few input channels of a linear carry much larger activations than the rest, so one int8 scale per
token spends its range on them. Dividing channel c of the input by s_c and multiplying the weight's
column c by s_c leaves the float model unchanged; s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha)
trades activation range for weight range. The division is folded into whatever produced the input,
as AWQ folds its scales (toolchain/quant/awq.py): an RMSNorm's gain, or the rows of the linear before.

One alpha for the whole model (the paper's recipe) measured, on SmolLM2-135M, PPL +4.5% over fp32
for int8 activations without smoothing and +2.6% with alpha 0.5/0.7, but smoothing also made int8
*weights* cost more (+1.3% alone). So alpha is searched per site, as AWQ searches its scales: each
candidate (no smoothing, alpha = 0, 0.1, ..., 0.9) is scored by the output error of the site's
linears with both their weights (int8 per channel) and their input (int8 per token) fake-quantized,
on the float model's own activations, layer by layer. w8a8-int rotates the residual stream first
(toolchain/quant/rotation.py); after it, searching every site measured +0.77% PPL for the integer
program (4,096 tokens) against +0.95% when only down_proj's input was smoothed.

Which linears share an input, and what produces it, is data (SITES). v -> o is not smoothed: under
GQA v's output channels repeat across o's input columns. The LM head is smoothed into the final
norm; with tied embeddings that unties it (the embedding keeps the unscaled matrix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..model import rope
from ..model.transformer import Transformer, causal_mask
from .awq import _flat, _run_layer
from .fold import fold_scales_
from .rtn import INT8_PER_CHANNEL, fake_quant

ALPHA_GRID = tuple(i / 10 for i in range(10))
SEARCH_TOKENS = 2048  # activation rows (evenly strided) each site's candidates are scored on


@dataclass(frozen=True)
class Site:
    producer: str  # RMSNorm or linear whose output feeds the consumers; relative to the layer
    consumers: tuple[str, ...]
    inputs: str  # which captured input of toolchain.quant.awq._run_layer they read


SITES = {
    "qkv": Site("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_in"),
    "gate_up": Site("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in"),
    "down": Site("mlp.up_proj", ("mlp.down_proj",), "down_in"),
}
HEAD_SITE = Site("model.norm", ("lm_head",), "final norm output")  # relative to the model


def _scales(absmax: torch.Tensor, consumers: list[nn.Linear], alpha: float) -> torch.Tensor:
    w_max = torch.stack([lin.weight.abs().amax(0) for lin in consumers]).amax(0).clamp_min(1e-5)
    return (absmax.clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def w8a8_error(x: torch.Tensor, consumers: list[nn.Linear], s: torch.Tensor | None, reference: list[torch.Tensor]) -> float:
    """Mean squared output error of the consumers when both their int8-per-channel weights (W s) and
    their int8-per-token input (x / s) are fake-quantized; s None: no smoothing. reference: the
    consumers' float outputs x W^T (the same for every candidate, so the caller computes them once)."""
    xs, err = (x if s is None else x / s), 0.0
    xq = fake_quant(xs, INT8_PER_CHANNEL)  # per row of [tokens, in]: per token
    for lin, ref in zip(consumers, reference):
        w = lin.weight if s is None else lin.weight * s
        err += (xq @ fake_quant(w, INT8_PER_CHANNEL).T - ref).pow(2).sum().item()
    return err / x.shape[0]


def search(x: torch.Tensor, consumers: list[nn.Linear]) -> tuple[torch.Tensor | None, dict]:
    """The best smoothing of one site on activations x [n, in]: (scales or None, record)."""
    if x.shape[0] > SEARCH_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, SEARCH_TOKENS).round().long()]
    absmax = x.abs().amax(0)
    reference = [x @ lin.weight.T for lin in consumers]
    best = (None, w8a8_error(x, consumers, None, reference), None)
    losses = {"none": best[1]}
    for alpha in ALPHA_GRID:
        s = _scales(absmax, consumers, alpha)
        loss = w8a8_error(x, consumers, s, reference)
        losses[f"{alpha:.1f}"] = loss
        if loss < best[1]:
            best = (alpha, loss, s)
    alpha, loss, s = best
    return s, {"alpha": alpha, "loss": loss, "losses": losses, "scales": None if s is None else s.tolist()}


@torch.no_grad()
def smooth_(model: Transformer, batches: list[torch.Tensor]) -> dict:
    """Search and fold each site's smoothing into `model` in place (its float output is unchanged, to
    rounding). Calibration runs layer by layer through the float model. Returns the decisions as
    plain data: {"layers": [{site: {alpha, loss, losses, scales}}], "head": {...}}."""
    ropes = {}
    for t in {b.shape[1] for b in batches}:
        cos, sin = rope.cos_sin(model.rope_inv_freq, torch.arange(t))
        ropes[t] = (cos, sin, causal_mask(t))
    xs = [model.model.embed_tokens(b).float() for b in batches]
    record = {"grid": list(ALPHA_GRID), "search_tokens": SEARCH_TOKENS, "layers": [], "head": None}
    for layer in model.model.layers:
        feats, xs = _run_layer(layer, xs, ropes)  # smoothing leaves the layer's output unchanged
        entry = {}
        for name, site in SITES.items():
            consumers = [layer.get_submodule(c) for c in site.consumers]
            s, entry[name] = search(_flat(feats[site.inputs]), consumers)
            if s is not None:
                fold_scales_(layer.get_submodule(site.producer), consumers, s)
        record["layers"].append(entry)
    s, record["head"] = search(_flat([model.model.norm(x) for x in xs]), [model.lm_head])
    if s is not None:
        if model.config.tie_embeddings:  # the head gets its own copy of the matrix; the embedding keeps E
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            model.config = dataclasses.replace(model.config, tie_embeddings=False)
        fold_scales_(model.model.norm, [model.lm_head], s)
    return record
