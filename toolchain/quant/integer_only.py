"""Preparing a float model for the integer-only program: the weights and the activation ranges behind
the static scales.

- w8a8-int: residual-stream rotation, then SmoothQuant searched per site, int8 weights everywhere
  (linears, LM head, embedding: the rotation unties the last two).
- w4a8-int: AWQ (its scales move activation outliers into the weights as SmoothQuant's do, and its
  clipping search sets the int4 ranges), int4 group-wise linears, int8 LM head (on SmolLM2, w4-rtn
  g64 measured PPL 22.76 with an int4 head, 18.68 with int8). No rotation: on SmolLM2 g64 the integer
  program measured PPL 16.22 without it and 17.46 with it (AWQ searched after the rotation), so the
  rotation costs int4 weights more than it saves int8 activations; and unrotated, a tied embedding
  stays tied, one int8 table for the lookup and the head.

The result is still a float Transformer, with every weight on its grid; the export turns it and the
recorded ranges into the integer program (toolchain/export/integer_program.py).
"""

from __future__ import annotations

import torch

from .activation_ranges import activation_ranges
from .awq import AwqResult, quantize_model_
from .rotation import rotate_residual_
from .rtn import INT8_PER_CHANNEL, WeightQuantSpec, fake_quant
from .smoothquant import SITES, smooth_

SITE_OF = {consumer: site for site, s in SITES.items() for consumer in s.consumers}


def _int8_embedding_(model, decisions: dict) -> None:
    """An untied embedding is its own int8 table, one scale per token row (a tied one is the head's)."""
    if not model.config.tie_embeddings:
        emb = model.model.embed_tokens
        emb.weight.data = fake_quant(emb.weight, INT8_PER_CHANNEL)
        decisions["model.embed_tokens"] = {"bits": 8, "group_size": None, "symmetric": True, "per": "row (token)"}


@torch.no_grad()
def prepare_w8a8_(model, batches: list[torch.Tensor]) -> tuple[dict, dict, dict]:
    """In place. Returns (per-module decisions, the rotation and smoothing record, the activation ranges)."""
    rotation = rotate_residual_(model)
    smoothing = smooth_(model, batches)
    decisions = quantize_model_(model, INT8_PER_CHANNEL, head="int8")
    _int8_embedding_(model, decisions)
    for name, d in decisions.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and ".".join(parts[3:]) in SITE_OF:
            d["smoothquant_alpha"] = smoothing["layers"][int(parts[2])].get(SITE_OF[".".join(parts[3:])], {}).get("alpha")
    decisions["lm_head"]["smoothquant_alpha"] = smoothing["head"]["alpha"]
    return decisions, {"rotation": rotation, **smoothing}, activation_ranges(model, batches)


@torch.no_grad()
def prepare_w4a8_(model, batches: list[torch.Tensor], spec: WeightQuantSpec, awq: AwqResult) -> tuple[dict, dict]:
    """In place, with `awq` searched on this (unrotated) model. Returns (per-module decisions, the
    activation ranges)."""
    decisions = quantize_model_(model, spec, awq=awq, head="int8")
    _int8_embedding_(model, decisions)
    return decisions, activation_ranges(model, batches)
