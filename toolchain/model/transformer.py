"""pocketlm's own Llama-family decoder.

Module and parameter names follow Hugging Face Llama (`model.layers.{i}.self_attn.q_proj`, ...) so
weights map one to one and recipe patterns match them. Unlike Hugging Face, every layer carries its
own head counts and MLP width, so a structurally pruned model is a smaller dense model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rope
from .config import LayerSpec, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # casts only when needed: a float32 model's graph then has no no-op casts (fewer nodes for
        # every export pass to walk)
        x32 = x if x.dtype == torch.float32 else x.float()
        # mean over a 4-D view [..., 1, dim] and dims (-2, -1): the same number, but the shape
        # XNNPACK delegates (its mean takes 4-D inputs over dims (2, 3)), so no graph break.
        lead, dim = x32.shape[:-1], x32.shape[-1]
        ms = x32.pow(2).view(*lead, 1, dim).mean((-2, -1), keepdim=True).view(*lead, 1)
        normed = x32 * torch.rsqrt(ms + self.eps)
        return self.weight * (normed if x.dtype == torch.float32 else normed.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, spec.n_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, spec.n_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, spec.n_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(spec.n_heads * config.head_dim, config.dim, bias=False)
        self.qkv_proj = None  # q|k|v as one linear: set by fuse.fuse_projections_ for export

    def project_qkv(self, x: torch.Tensor):
        """x: [B, T, dim] -> un-rotated q [B, n_heads, T, head_dim], k and v [B, n_kv_heads, T, head_dim]."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:  # slices, not split(): XNNPACK delegates a slice, not a split
            qkv, nq, nkv = self.qkv_proj(x), self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def project_qkv_packed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> un-rotated q|k|v [B, T, (n_heads + 2 n_kv_heads) * head_dim], one linear when fused."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [B, n_heads, T, hd]; k, v: [B, n_kv_heads, S, hd]; mask: additive [T, S] -> [B, T, dim]."""
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, mask):
        q, k, v = self.project_qkv(x)
        return self.attend(rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v, mask)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.gate_up_proj = None  # gate|up as one linear: set by fuse.fuse_projections_ for export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up, hidden = self.gate_up_proj(x), self.down_proj.in_features
            gate, up = gate_up[..., :hidden], gate_up[..., hidden:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, spec)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config.dim, spec.hidden_dim)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    """The decoder with its LM head. forward() runs plain causal attention over the given tokens."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_inv_freq", rope.inv_freq(config), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, vocab_size] (float32)."""
        t = tokens.shape[1]
        if positions is None:
            positions = torch.arange(t, device=tokens.device)
        cos, sin = rope.cos_sin(self.rope_inv_freq, positions)
        mask = causal_mask(t, tokens.device)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_mask(t: int, device=None) -> torch.Tensor:
    """Additive [t, t] mask: 0 where a query may see a key, -inf above the diagonal."""
    return torch.full((t, t), float("-inf"), device=device).triu(1)
