"""Preparing a float model for integer-only W8A8 (scheme w8a8-int): residual-stream rotation, SmoothQuant
search, int8 weights everywhere (linears, LM head, embedding), then the activation ranges behind the
static scales.

The result is still a float Transformer, with every weight on its int8 per-channel grid; the export
turns it and the recorded ranges into the integer program (toolchain/export/integer_program.py).
"""

from __future__ import annotations

import torch

from .activation_ranges import activation_ranges
from .awq import quantize_model_
from .rotation import rotate_residual_
from .rtn import INT8_PER_CHANNEL, fake_quant
from .smoothquant import SITES, smooth_

SITE_OF = {consumer: site for site, s in SITES.items() for consumer in s.consumers}


@torch.no_grad()
def prepare_w8a8_(model, batches: list[torch.Tensor]) -> tuple[dict, dict, dict]:
    """In place. Returns (per-module decisions, the rotation and smoothing record, the activation ranges)."""
    rotation = rotate_residual_(model)
    smoothing = smooth_(model, batches)
    decisions = quantize_model_(model, INT8_PER_CHANNEL, head="int8")
    if not model.config.tie_embeddings:  # rotation untied the head: the embedding is its own int8 table
        emb = model.model.embed_tokens
        emb.weight.data = fake_quant(emb.weight, INT8_PER_CHANNEL)
        decisions["model.embed_tokens"] = {"bits": 8, "group_size": None, "symmetric": True, "per": "row (token)"}
    for name, d in decisions.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and ".".join(parts[3:]) in SITE_OF:
            d["smoothquant_alpha"] = smoothing["layers"][int(parts[2])].get(SITE_OF[".".join(parts[3:])], {}).get("alpha")
    decisions["lm_head"]["smoothquant_alpha"] = smoothing["head"]["alpha"]
    return decisions, {"rotation": rotation, **smoothing}, activation_ranges(model, batches)
