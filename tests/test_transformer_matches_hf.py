"""pocketlm's own decoder reproduces the Hugging Face model's logits (float32 rounding only)."""

import dataclasses

import pytest
import torch

from pocketlm.toolchain.model import convert, surgery
from pocketlm.toolchain.model.config import ModelConfig

from conftest import TINY_VOCAB, tiny_hf_model

TOKENS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _max_diff(ours, hf, tokens=TOKENS) -> float:
    with torch.no_grad():
        return (ours(tokens) - hf(tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"num_key_value_heads": 6}),  # plain multi-head attention (Llama 2 / TinyLlama shape)
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": None}),
    ],
)
def test_tiny_logits_match_hugging_face(model_type, overrides):
    hf = tiny_hf_model(model_type, **overrides)
    ours = convert.from_hf_model(hf)
    assert _max_diff(ours, hf) < 1e-5


def test_heterogeneous_layers_match_hf_with_the_dropped_groups_zeroed():
    """Dropping a KV group or MLP channels equals zeroing their outputs in the uniform HF model."""
    hf = tiny_hf_model()
    ours = convert.from_hf_model(hf)
    hd, group = hf.config.head_dim, 3
    with torch.no_grad():
        # layer 0: drop KV head 1 (query heads 3..5); layer 1: drop MLP channels 0..39
        hf.model.layers[0].self_attn.o_proj.weight[:, 1 * group * hd : 2 * group * hd] = 0
        hf.model.layers[1].mlp.down_proj.weight[:, :40] = 0
    surgery.keep_kv_heads_(ours, 0, [0])
    surgery.keep_mlp_channels_(ours, 1, list(range(40, 96)))
    assert not ours.config.is_uniform()
    assert ours.config.layers[0].n_heads == 3 and ours.config.layers[0].n_kv_heads == 1
    assert ours.config.layers[1].hidden_dim == 56
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (3 * hd, 48)
    assert _max_diff(ours, hf) < 1e-5


def test_heterogeneous_model_survives_a_save_and_load(tmp_path):
    ours = convert.from_hf_model(tiny_hf_model())
    surgery.keep_kv_heads_(ours, 1, [1])
    convert.save_pocketlm(ours, tmp_path / "m")
    again = convert.load_pocketlm(tmp_path / "m")
    assert again.config == ours.config
    with torch.no_grad():
        assert torch.equal(again(TOKENS), ours(TOKENS))


def test_config_round_trips_through_json():
    config = convert.config_from_hf(tiny_hf_config_dict())
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert dataclasses.replace(config, layers=config.layers[:1]).n_layers == 1


def tiny_hf_config_dict():
    return tiny_hf_model().config.to_dict()


@pytest.mark.real_model
def test_real_default_model_logits_match_hugging_face(real):
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n",
        "Once upon a time, in a land far away, there lived a dragon who loved",
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    for prompt in prompts:
        ids = torch.tensor([real.tokenizer(prompt)["input_ids"]])
        assert _max_diff(real.model, real.hf, ids) <= 1e-3, prompt


@pytest.mark.real_model
def test_real_default_model_is_smollm2_135m(real):
    c = real.model.config
    assert (c.n_layers, c.dim, c.vocab_size, c.head_dim) == (30, 576, 49152, 64)
    assert c.layers[0].n_heads == 9 and c.layers[0].n_kv_heads == 3 and c.tie_embeddings
    assert real.model.num_parameters() == 134_515_008
