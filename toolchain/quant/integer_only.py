"""Preparing a float model for the integer-only program: residual-stream rotation, then the weights
and the activation ranges behind the static scales.

- w8a8-int: SmoothQuant searched per site, int8 weights everywhere (linears, LM head, embedding).
- w4a8-int: AWQ searched on the rotated model (its scales move activation outliers into the weights
  as SmoothQuant's do, and its clipping search sets the int4 ranges), int4 group-wise linears, int8
  LM head and embedding (on SmolLM2, w4-rtn g64 measured PPL 22.76 with an int4 head, 18.68 with int8).

The result is still a float Transformer, with every weight on its grid; the export turns it and the
recorded ranges into the integer program (toolchain/export/integer_program.py).
"""

from __future__ import annotations

import torch

from .activation_ranges import activation_ranges
from .awq import AwqConfig, AwqResult, awq_search, quantize_model_
from .rotation import rotate_residual_
from .rtn import INT8_PER_CHANNEL, WeightQuantSpec, fake_quant
from .smoothquant import SITES, smooth_

SITE_OF = {consumer: site for site, s in SITES.items() for consumer in s.consumers}


def _int8_embedding_(model, decisions: dict) -> None:
    """The rotation untied the head: the embedding is its own int8 table, one scale per token row."""
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
def prepare_w4a8_(model, batches: list[torch.Tensor], spec: WeightQuantSpec, awq: AwqResult | None = None,
                  awq_config: AwqConfig | None = None) -> tuple[dict, dict, dict, AwqResult]:
    """In place. `awq`: a saved search of this rotated model to re-apply (else searched here).
    Returns (per-module decisions, the rotation record, the activation ranges, the AWQ result)."""
    rotation = rotate_residual_(model)
    if awq is None:
        awq = awq_search(model, batches, spec, awq_config)
        awq.info["rotation"] = rotation  # its scales hold for the rotated model only
    decisions = quantize_model_(model, spec, awq=awq, head="int8")
    _int8_embedding_(model, decisions)
    return decisions, {"rotation": rotation}, activation_ranges(model, batches), awq
