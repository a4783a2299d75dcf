"""Hugging Face <-> pocketlm conversion, and pocketlm's own model folder (config + safetensors)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketlm.runtime.errors import PocketLMError

from ..atomic import atomic_folder
from .config import ModelConfig, RopeScaling
from .transformer import Transformer

MODEL_FILE = "pocketlm_model.json"
WEIGHTS_FILE = "model.safetensors"


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a Hugging Face config dict to a ModelConfig, refusing what pocketlm cannot represent."""
    model_type = hf.get("model_type")
    if hf.get("mlp_bias"):
        raise PocketLMError("unsupported: mlp_bias=true; pocketlm's MLP has no biases")
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        raise PocketLMError(
            "unsupported: Mistral sliding_window attention; only models with sliding_window=null load"
        )
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise PocketLMError("unsupported: Qwen2 use_sliding_window=true")
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=rope_params["factor"],
            low_freq_factor=rope_params["low_freq_factor"],
            high_freq_factor=rope_params["high_freq_factor"],
            original_max_position_embeddings=rope_params["original_max_position_embeddings"],
        )
    elif rope_type != "default":
        raise PocketLMError(f"unsupported rope_type '{rope_type}'; pocketlm supports 'default' and 'llama3'")
    n_heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig.uniform(
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        hidden_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        norm_eps=hf["rms_norm_eps"],
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        architecture=model_type,
    )


def from_hf_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Build a Transformer from Hugging Face-named weights (names map one to one)."""
    model = Transformer(config)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise PocketLMError(f"weights do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.float().eval()


def from_hf_model(hf_model) -> Transformer:
    """Convert an in-memory Hugging Face model."""
    return from_hf_state(config_from_hf(hf_model.config.to_dict()), hf_model.state_dict())


def load_hf_folder(folder: Path) -> Transformer:
    """Load a Hugging Face folder's safetensors straight into pocketlm's Transformer (float32)."""
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return from_hf_state(config, {k: v.float() for k, v in state.items()})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def save_pocketlm(
    model: Transformer, folder: str | os.PathLike, tokenizer_dir: Path | None = None, extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write pocketlm's own model folder atomically: pocketlm_model.json, model.safetensors, tokenizer,
    and any extra text files (name -> content) a stage records beside the weights."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"config": model.config.to_dict(), **(extra or {})}
        (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    return folder


def load_pocketlm(folder: Path) -> Transformer:
    meta = json.loads((folder / MODEL_FILE).read_text())
    config = ModelConfig.from_dict(meta["config"])
    state = load_file(str(folder / WEIGHTS_FILE))
    model = Transformer(config)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def pocketlm_meta(folder: Path) -> dict:
    """What earlier stages recorded in a pocketlm folder (stages, quantization), beside the config."""
    return json.loads((Path(folder) / MODEL_FILE).read_text())
