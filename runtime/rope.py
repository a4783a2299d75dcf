"""RoPE tables on the host, in float64 with angles reduced modulo 2*pi before the float32 cast.

The exported programs take cos/sin as inputs, so a position of 1,000,000 rotates as precisely as
a position of 10 and the graph never needs float64.
"""

from __future__ import annotations

import math

import numpy as np


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair frequencies [head_dim // 2]; `scaling` is Llama 3's rope_scaling dict, or None."""
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not scaling:
        return freq
    orig = scaling["original_max_position_embeddings"]
    lo, hi, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelen = 2 * math.pi / freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * freq / factor + smooth * freq
    scaled = np.where(wavelen > orig / lo, freq / factor, freq)
    return np.where((wavelen <= orig / lo) & (wavelen >= orig / hi), blended, scaled)


def cos_sin(freq: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    """Integer positions [T] -> cos, sin tables [T, head_dim] float32 (half-split layout)."""
    pos = np.asarray(positions, dtype=np.int64)
    angles = np.remainder(pos[:, None].astype(np.float64) * freq[None, :], 2 * math.pi)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
