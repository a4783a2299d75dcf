"""The two outlier-handling transforms of w8a8-int leave the float model's function unchanged and do
what they are for: rotation spreads the residual stream's outlier channels, smoothing never scores
worse than no smoothing on its own search data."""

from __future__ import annotations

import torch

from pocketlm.toolchain.model.convert import from_hf_model
from pocketlm.toolchain.quant.rotation import random_orthogonal, rotate_residual_
from pocketlm.toolchain.quant.smoothquant import smooth_

from conftest import TINY_VOCAB, tiny_hf_model

TOKENS = torch.randint(0, TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def _model():
    model = from_hf_model(tiny_hf_model())
    with torch.no_grad():  # an outlier channel in the residual stream, as LLMs have
        model.model.embed_tokens.weight[:, 5] *= 40
    return model


def test_rotation_folds_the_norm_gains_and_keeps_the_logits():
    model = _model()
    before = model(TOKENS)
    record = rotate_residual_(model, seed=3)
    assert torch.allclose(model(TOKENS), before, atol=1e-4)
    assert record["seed"] == 3 and not model.config.tie_embeddings
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in model.model.layers)
    q = random_orthogonal(48, 3)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)


def test_rotation_spreads_an_outlier_channel_over_all_channels():
    model = _model()
    ratio = lambda m: (lambda x: float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean()))(m.model.embed_tokens(TOKENS))  # noqa: E731
    peaked = ratio(model)
    rotate_residual_(model)
    assert ratio(model) < peaked / 2  # max/rms per token: the outlier no longer dominates


def test_smoothing_keeps_the_logits_and_never_loses_to_no_smoothing_on_its_data():
    model = _model()
    before = model(TOKENS)
    with torch.no_grad():
        record = smooth_(model, [TOKENS])
    assert torch.allclose(model(TOKENS), before, atol=1e-4)
    for site in [*[s for layer in record["layers"] for s in layer.values()], record["head"]]:
        assert site["loss"] <= site["losses"]["none"]
