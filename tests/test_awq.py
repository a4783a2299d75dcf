"""AWQ on tiny random models: folding is exact in float, the search beats RTN when there are outlier
input channels, GQA skips v->o, clipping lowers each linear's error, and a serialised result
reproduces the same weights on a fresh model."""

import copy

import pytest
import torch

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain.model import convert
from pocketlm.toolchain.quant.awq import AwqConfig, AwqResult, apply_awq, awq_search, quantize_model_
from pocketlm.toolchain.quant.rtn import WeightQuantSpec, fake_quant

from conftest import TINY_VOCAB, tiny_hf_model


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass

OUTLIERS = [3, 17, 40]
INT4 = WeightQuantSpec(4, 16, True)
GQA = {}  # conftest's SmolLM2 shape: 6 query heads share 2 KV heads
MHA = {"num_key_value_heads": 6}


def tiny(outliers=True, **overrides):
    """pocketlm's Transformer from conftest's tiny model; a few input channels of both norms of every
    layer 20x larger, so AWQ has outliers to protect."""
    model = convert.from_hf_model(tiny_hf_model(**overrides))
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[OUTLIERS] *= 20
                layer.post_attention_layernorm.weight[OUTLIERS] *= 20
    return model


def tokens(seed, batch=8, seq=32):
    return torch.randint(0, TINY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CALIB, HELD_OUT = tokens(1), tokens(2, batch=4)


@torch.no_grad()
def logits(model, ids=HELD_OUT):
    return model(ids)


@pytest.mark.parametrize("heads", [GQA, MHA], ids=["gqa", "mha"])
def test_folding_scales_leaves_the_float_model_unchanged(heads):
    model = tiny(**heads)
    result = awq_search(model, CALIB, INT4)
    folded = apply_awq(copy.deepcopy(model), result)
    assert (logits(folded) - logits(model)).abs().max() <= 1e-5
    # ... and the folding did something: outlier channels' norm weights shrank, their columns grew
    for i, (a, b) in enumerate(zip(model.model.layers, folded.model.layers)):
        s = torch.tensor(result.layers[i]["qkv"]["scales"])
        assert result.layers[i]["qkv"]["alpha"] > 0 and s[OUTLIERS].min() > s.median()
        assert torch.allclose(b.input_layernorm.weight, a.input_layernorm.weight / s)
        assert torch.allclose(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight * s)
        assert not torch.equal(b.mlp.up_proj.weight, a.mlp.up_proj.weight)  # gate_up columns and down rows


def test_search_does_not_change_the_model():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awq_search(model, CALIB, INT4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("heads", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("spec", [INT4, WeightQuantSpec(4, 16, False), WeightQuantSpec(3, None, True)], ids=lambda s: s.describe())
def test_awq_beats_rtn_with_outlier_channels(heads, spec):
    model = tiny(**heads)
    result = awq_search(model, CALIB, spec)
    for entry in result.layers:  # alpha = 0 is RTN, so the search can only improve on its data
        for group in entry.values():
            assert "skipped" in group or group["loss"] <= group["rtn_loss"]
    ref = logits(model)
    rtn, awq = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model_(rtn, spec)
    quantize_model_(awq, spec, awq=result)
    rtn_err = (logits(rtn) - ref).pow(2).mean()
    awq_err = (logits(awq) - ref).pow(2).mean()
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)


def test_gqa_skips_v_to_o_and_mha_searches_it():
    gqa = awq_search(tiny(**GQA), CALIB, INT4)
    for entry in gqa.layers:
        assert "GQA" in entry["vo"]["skipped"] and "alpha" not in entry["vo"]
    assert gqa.info["vo_skipped_layers"] == [0, 1]
    model = tiny(**MHA)
    mha = awq_search(model, CALIB, INT4)
    assert "vo_skipped_layers" not in mha.info
    folded = apply_awq(copy.deepcopy(model), mha)
    for i, entry in enumerate(mha.layers):
        s = torch.tensor(entry["vo"]["scales"])
        o, o2 = model.model.layers[i].self_attn.o_proj.weight, folded.model.layers[i].self_attn.o_proj.weight
        assert s.numel() == o.shape[1] and 0 <= entry["vo"]["alpha"] < 1  # one scale per o_proj input channel
        assert torch.allclose(o2, o * s)


def test_scales_are_normalised_like_llm_awq():
    result = awq_search(tiny(), CALIB, INT4)
    for entry in result.layers:
        for group in entry.values():
            if "scales" in group:
                s = torch.tensor(group["scales"])
                assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-5)
                assert group["alpha"] in [i / 20 for i in range(20)]


@torch.no_grad()
def test_clip_search_lowers_each_linears_error():
    """Per-channel int4: each row is one group, so the clip objective is exactly that row's output
    error on the calibration tokens, and the chosen ratio can only lower it."""
    spec = WeightQuantSpec(4, None, True)
    model = tiny()
    result = awq_search(model, CALIB, spec)
    assert not any("q_proj" in n or "k_proj" in n for n in result.clip)  # q/k are not clipped (llm-awq)
    assert len(result.clip) == 5 * model.config.n_layers
    folded = apply_awq(copy.deepcopy(model), result)
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
        for n, m in folded.named_modules()
        if n in result.clip
    ]
    folded(CALIB)
    for h in hooks:
        h.remove()
    shrunk = 0
    for name, steps in result.clip.items():
        w, x = folded.get_submodule(name).weight, inputs[name]
        ratios = result.clip_ratios(name)
        assert ratios.shape == (w.shape[0], 1) and ratios.min() >= 0.55 and ratios.max() <= 1.0
        clipped = (x @ (fake_quant(w, spec, clip=ratios) - w).T).pow(2).sum(0)
        plain = (x @ (fake_quant(w, spec) - w).T).pow(2).sum(0)
        assert (clipped <= plain * (1 + 1e-4) + 1e-9).all(), name
        shrunk += int((ratios < 1).sum())
    assert shrunk > 0  # int4 per channel on Gaussian weights: clipping must pay somewhere


def test_a_head_on_the_schemes_grid_is_clipped_on_the_final_norms_output():
    """config.head clips the tied LM head (no scale, which would untie it) against its real input,
    the final norm's output; quantize_model_ applies the clip only to a head on the scheme's grid."""
    model = tiny()
    assert "lm_head" not in awq_search(model, CALIB, INT4).clip  # an int8 or float head has nothing to use it for
    result = awq_search(model, CALIB, INT4, AwqConfig(head=True))
    ratios = result.clip_ratios("lm_head")
    w = model.lm_head.weight
    assert ratios.shape == (w.shape[0], w.shape[1] // 16) and (ratios < 1).any()
    inputs = []
    hook = model.model.norm.register_forward_hook(lambda m, a, o: inputs.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(CALIB)
    hook.remove()
    x = inputs[0]
    clipped = (x @ (fake_quant(w, INT4, clip=ratios) - w).T).pow(2).sum()
    plain = (x @ (fake_quant(w, INT4) - w).T).pow(2).sum()
    assert clipped < plain

    same = apply_awq(copy.deepcopy(model), result)
    expected = fake_quant(same.lm_head.weight, INT4, clip=ratios)
    d = quantize_model_(same, INT4, awq=result, head="same")
    assert "clip" in d["lm_head"] and d["lm_head"]["tied_to"] == "model.embed_tokens"
    assert same.model.embed_tokens.weight is same.lm_head.weight and torch.equal(same.lm_head.weight, expected)
    assert "clip" not in quantize_model_(copy.deepcopy(model), INT4, awq=result, head="int8")["lm_head"]


def test_serialised_result_reproduces_identical_weights(tmp_path):
    model = tiny()
    calib = [tokens(3, batch=4, seq=32), tokens(4, batch=2, seq=20)]  # batches of different lengths
    result = awq_search(model, calib, INT4, AwqConfig(search_tokens=100))
    assert result.info["calibration_tokens"] == 4 * 32 + 2 * 20 and result.info["search_tokens"] == 128
    loaded = AwqResult.load(result.save(tmp_path / "awq.json"))
    assert loaded.to_dict() == result.to_dict() and loaded.fingerprint() == result.fingerprint()
    a, b = copy.deepcopy(model), tiny()  # b: a fresh model, never searched on
    da = quantize_model_(a, INT4, awq=result)
    db = quantize_model_(b, INT4, awq=loaded)
    assert da == db
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the clip ratios were applied: a clipped linear differs from scales-only quantization
    name = next(n for n, s in result.clip.items() if any(any(r) for r in s))
    scales_only = tiny()
    quantize_model_(scales_only, INT4, awq=AwqResult(spec=INT4, layers=result.layers))
    assert not torch.equal(scales_only.get_submodule(name).weight, a.get_submodule(name).weight)


def test_apply_then_quantize_folds_once():
    model = tiny()
    result = awq_search(model, CALIB, INT4)
    a = apply_awq(copy.deepcopy(model), result)
    quantize_model_(a, INT4, awq=result)  # already folded: not again
    b = copy.deepcopy(model)
    quantize_model_(b, INT4, awq=result)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(PocketLMError, match="already folded"):
        apply_awq(a, result)
    other = awq_search(model, CALIB, INT4, AwqConfig(n_grid=4))
    with pytest.raises(PocketLMError, match="different AWQ result"):
        quantize_model_(a, INT4, awq=other)
    with pytest.raises(PocketLMError, match="searched for int4 g16 sym"):
        quantize_model_(copy.deepcopy(model), WeightQuantSpec(4, 16, False), awq=result)


def test_fold_mark_survives_save_and_load(tmp_path):
    from pocketlm.toolchain.model.convert import load_pocketlm, save_pocketlm

    model = tiny()
    result = awq_search(model, CALIB, INT4)
    folded = apply_awq(copy.deepcopy(model), result)
    assert model.config.extra.get("awq_fingerprint") is None  # the float model's config is untouched
    reloaded = load_pocketlm(save_pocketlm(folded, tmp_path / "m"))
    assert reloaded.config.extra["awq_fingerprint"] == result.fingerprint()
    quantize_model_(reloaded, INT4, awq=result)  # recognised as folded: not folded a second time
    fresh = copy.deepcopy(model)
    quantize_model_(fresh, INT4, awq=result)
    assert all(torch.equal(x, y) for x, y in zip(reloaded.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(PocketLMError, match="search on the float model"):
        awq_search(reloaded, CALIB, INT4)


def test_group_size_errors_name_the_width():
    model = tiny()
    with pytest.raises(PocketLMError, match=r"group size 32 does not divide the input width 48 of model\.layers\.0"):
        awq_search(model, CALIB, WeightQuantSpec(4, 32, True))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(PocketLMError, match="valid group sizes for width 48: 8, 12, 16, 24, 48"):
        quantize_model_(model, WeightQuantSpec(4, 32, True))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # refused before any change


def test_decisions_and_the_tied_head():
    model = tiny()
    embed = model.model.embed_tokens.weight.clone()
    d = quantize_model_(model, INT4, skip=("layers.1",))
    assert d["model.layers.0.mlp.down_proj"] == {"bits": 4, "group_size": 16, "symmetric": True}
    assert d["model.layers.1.self_attn.q_proj"] == {"float": True}
    assert d["lm_head"] == {"float": True, "tied_to": "model.embed_tokens"}
    assert d["model.embed_tokens"]["float"] and torch.equal(model.model.embed_tokens.weight, embed)
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, fake_quant(w, INT4))  # quantized weights lie on their grid

    model = tiny()
    d = quantize_model_(model, INT4, head="int8")
    assert d["lm_head"]["bits"] == 8 and d["lm_head"]["group_size"] is None
    assert d["model.embed_tokens"]["bits"] == 8  # tied: the embedding is the same matrix
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.allclose(model.model.embed_tokens.weight, embed, atol=float(embed.abs().amax()) / 127)
    assert quantize_model_(tiny(), INT4, head="same")["lm_head"]["bits"] == 4
    with pytest.raises(PocketLMError, match="head="):
        quantize_model_(tiny(), INT4, head="int4")
