"""Rotary position embeddings (half-split convention, as Hugging Face Llama stores q/k weights)."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, [head_dim // 2], float64; one definition, shared with the runtime."""
    from pocketlm.runtime.rope import inv_freq as np_inv_freq

    s = config.rope_scaling
    return torch.from_numpy(np_inv_freq(config.head_dim, config.rope_theta, s.__dict__ if s else None))


def cos_sin(freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions [T] -> two [T, head_dim] float32 tensors.

    Angles are formed in float64 and reduced modulo 2*pi before the cast, so a position of
    100,000 rotates as precisely as a position of 10.
    """
    angles = positions.to(torch.float64)[:, None] * freq[None, :]
    angles = torch.remainder(angles, 2 * math.pi)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos + rotate_half(x) * sin
