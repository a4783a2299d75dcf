"""The calibrated ranges behind integer-only mode's static scales.

Integer-only mode quantizes matmul inputs per token at run time, but everything between matmuls
(the residual stream, q/k/v, gate/up, SwiGLU's product) is an int32 at a fixed scale, and the KV
cache an int16 at a fixed scale; those scales come from the largest magnitudes seen on calibration
text, recorded here as plain data. For q and k the recorded number is the largest norm of a RoPE
pair (x_d, x_{d + head_dim/2}): a rotation never takes a component above its pair's norm, so the
range holds at every position, not only the calibrated ones.
"""

from __future__ import annotations

import torch

from ..model import rope
from ..model.transformer import Transformer, causal_mask


def _pair_norm_max(x: torch.Tensor, n_heads: int, head_dim: int) -> float:
    h = x.reshape(-1, n_heads, head_dim)
    half = head_dim // 2
    return float((h[..., :half].pow(2) + h[..., half:].pow(2)).sqrt().max())


@torch.no_grad()
def activation_ranges(model: Transformer, batches: list[torch.Tensor]) -> dict:
    """{"residual": max |x| of the residual stream, "layers": [{q, k (pair norms), v, gate, up,
    down_in}], "tokens": n} over the calibration batches, run through the float model."""
    c = model.config
    layers = [{k: 0.0 for k in ("q", "k", "v", "gate", "up", "down_in")} for _ in c.layers]
    residual, tokens = 0.0, 0
    for batch in batches:
        t = batch.shape[1]
        cos, sin = rope.cos_sin(model.rope_inv_freq, torch.arange(t))
        mask = causal_mask(t)
        x = model.model.embed_tokens(batch)
        residual = max(residual, float(x.abs().max()))
        for spec, layer, rec in zip(c.layers, model.model.layers, layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            rec["q"] = max(rec["q"], _pair_norm_max(attn.q_proj(h), spec.n_heads, c.head_dim))
            rec["k"] = max(rec["k"], _pair_norm_max(attn.k_proj(h), spec.n_kv_heads, c.head_dim))
            rec["v"] = max(rec["v"], float(attn.v_proj(h).abs().max()))
            x = x + attn(h, cos, sin, mask)
            residual = max(residual, float(x.abs().max()))
            h = layer.post_attention_layernorm(x)
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            product = torch.nn.functional.silu(gate) * up
            rec["gate"] = max(rec["gate"], float(gate.abs().max()))
            rec["up"] = max(rec["up"], float(up.abs().max()))
            rec["down_in"] = max(rec["down_in"], float(product.abs().max()))
            x = x + mlp.down_proj(product)
            residual = max(residual, float(x.abs().max()))
        tokens += batch.numel()
    return {"residual": residual, "layers": layers, "tokens": tokens}
