"""The architecture description of pocketlm's own decoder.

Per-layer sizes are data, not a single global number: structured pruning leaves layers with
different head counts and MLP widths, and the exporter and the bundle manifest read them from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerSpec:
    """The sizes of one decoder layer; n_heads must be a multiple of n_kv_heads (GQA)."""

    n_heads: int
    n_kv_heads: int
    hidden_dim: int

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.n_kv_heads < 1 or self.hidden_dim < 1:
            raise ValueError(f"layer sizes must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "every KV head must be shared by the same number of query heads"
            )


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency scaling ("llama3" rope_type); absent for plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    vocab_size: int
    dim: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_seq_len: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def uniform(cls, *, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int, **kw) -> "ModelConfig":
        return cls(layers=tuple(LayerSpec(n_heads, n_kv_heads, hidden_dim) for _ in range(n_layers)), **kw)

    def is_uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
