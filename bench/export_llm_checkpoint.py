"""The default model's weights in the checkpoint layout ExecuTorch's export_llm reads (for the peer benchmark).

export_llm's Llama model takes Meta's parameter names and Meta's rotary layout (interleaved pairs,
`use_hf_rope: false` in its SmolLM2 params), so the q/k projections are un-permuted from Hugging
Face's half-split layout; the tied embedding is also the output head. Writes CHECKPOINT.pth and
params.json (ExecuTorch's SmolLM2-135M params) into OUT_DIR, for the export script whose text
bench/export_llm_peer.py --made-by records.

Usage: python bench/export_llm_checkpoint.py OUT_DIR [--source default]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split rows of each head back to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state(hf_state: dict, n_heads: int, n_kv_heads: int, n_layers: int) -> dict:
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    out["output.weight"] = hf_state.get("lm_head.weight", out["tok_embeddings.weight"])
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(n_layers):
        for hf, meta in names.items():
            w = hf_state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = unpermute(w, n_heads)
            elif hf == "self_attn.k_proj":
                w = unpermute(w, n_kv_heads)
            out[f"layers.{i}.{meta}.weight"] = w.contiguous()
    return out


def rope_theta(config) -> float:
    """transformers 5 keeps it in rope_parameters; older releases as rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--source", default="default")
    args = ap.parse_args()
    from pocketlm.toolchain.load import load_hf_model

    hf = load_hf_model(args.source)
    c = hf.config
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(meta_state(state, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers), out / "smollm2_135m.pth")
    params = {"dim": c.hidden_size, "ffn_dim_multiplier": 1, "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers, "norm_eps": c.rms_norm_eps,
              "rope_theta": rope_theta(c), "use_scaled_rope": False, "vocab_size": c.vocab_size, "use_hf_rope": False,
              "attention_qkv_bias": False}
    (out / "params.json").write_text(json.dumps(params, indent=1))
    print(f"wrote {out / 'smollm2_135m.pth'} and params.json")


if __name__ == "__main__":
    main()
