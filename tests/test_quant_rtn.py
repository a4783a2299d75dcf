"""Round-to-nearest weight quantization: code ranges, the scale/2 error bound, group-size errors,
clipping, the straight-through estimator and BitNet ternary codes."""

import pytest
import torch

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain.quant.rtn import (
    WeightQuantSpec,
    fake_quant,
    fake_quant_ste,
    fake_ternary,
    fake_ternary_ste,
    quantize_weight,
    ternary_quantize,
    valid_group_sizes,
)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


SPECS = [
    WeightQuantSpec(8, None, True),
    WeightQuantSpec(4, 32, True),
    WeightQuantSpec(4, 32, False),
    WeightQuantSpec(8, 16, False),
    WeightQuantSpec(3, 64, True),
]


def weight(out=24, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 5] = 1.0  # an outlier; and a row that is all positive, and one that is all zero
    w[7] = w[7].abs() + 0.01
    w[9] = 0.0
    return w


def per_element_scale(qw):
    return qw.scales.repeat_interleave(qw.group_size, dim=-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_codes_in_range_and_error_within_half_a_step(spec):
    w = weight()
    qw = quantize_weight(w, spec)
    assert qw.codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    codes = qw.codes.to(torch.int32)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert qw.scales.shape == (w.shape[0], w.shape[1] // (spec.group_size or w.shape[1]))
    if spec.symmetric:
        assert qw.zero_points is None and codes.min() >= -spec.qmax  # restricted range: -2^(b-1) unused
    else:
        zp = qw.zero_points.to(torch.int32)
        assert zp.min() >= 0 and zp.max() <= spec.qmax
    deq = qw.dequantize()
    err = (deq - w).abs()
    assert (err <= per_element_scale(qw) / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(deq, fake_quant(w, spec))
    assert torch.equal(deq[9], torch.zeros_like(deq[9]))  # an all-zero row stays exactly zero
    # every group uses its extreme code (nothing wasted), except all-zero groups
    live = w.reshape(w.shape[0], -1, qw.group_size).abs().amax(-1) > 0
    if spec.symmetric:
        used = codes.reshape(*live.shape, -1).abs().amax(-1) == spec.qmax
        assert used[live].all()


def test_real_zero_is_exact_for_asymmetric():
    spec = WeightQuantSpec(4, 32, False)
    w = weight()
    w[0, :32] = torch.linspace(0.2, 0.9, 32)  # an all-positive group: range widened to include 0
    w[0, 40] = 0.0
    deq = fake_quant(w, spec)
    assert deq[0, 40] == 0.0
    qw = quantize_weight(w, spec)
    assert (deq[0, :32] - w[0, :32]).abs().max() <= qw.scales[0, 0] / 2 * (1 + 1e-5)


def test_groups_are_independent_rows_scale_equivariantly():
    spec = WeightQuantSpec(4, 32, True)
    w = weight()
    qw = quantize_weight(w, spec)
    w2 = w.clone()
    w2[:, 32:64] *= 10  # another group of the same rows: the other groups' codes don't move
    q2 = quantize_weight(w2, spec)
    assert torch.equal(qw.codes[:, :32], q2.codes[:, :32]) and torch.equal(qw.codes[:, 64:], q2.codes[:, 64:])
    # a row scaled by a power of two keeps its codes (AWQ folds scales into rows)
    w3 = w.clone()
    w3[4] *= 4
    assert torch.equal(quantize_weight(w3, spec).codes, qw.codes)


def test_batched_weights_quantize_like_one_at_a_time():
    spec = WeightQuantSpec(4, 16, False)
    ws = torch.stack([weight(seed=s) for s in range(3)])
    assert torch.equal(fake_quant(ws, spec), torch.stack([fake_quant(w, spec) for w in ws]))


@pytest.mark.parametrize("width,group", [(576, 128), (96, 40), (1536, 1000)])
def test_group_size_must_divide_width(width, group):
    w = torch.randn(4, width)
    spec = WeightQuantSpec(4, group, True)
    with pytest.raises(PocketLMError) as e:
        fake_quant(w, spec)
    msg = str(e.value)
    assert str(width) in msg and str(group) in msg
    assert ", ".join(map(str, valid_group_sizes(width))) in msg and "None" in msg
    assert all(width % g == 0 for g in valid_group_sizes(width))
    assert 64 in valid_group_sizes(576) and 128 not in valid_group_sizes(576)


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(bits=4, group_size=0), dict(bits=4.0)])
def test_bad_specs_are_refused(kw):
    with pytest.raises(PocketLMError):
        WeightQuantSpec(**kw)


@pytest.mark.parametrize("spec", [WeightQuantSpec(4, 32, True), WeightQuantSpec(4, 32, False)], ids=lambda s: s.describe())
def test_clip_ratios_shrink_the_range(spec):
    w = weight()
    assert torch.equal(fake_quant(w, spec, clip=torch.ones(24, 4)), fake_quant(w, spec))
    ratio = torch.full((24, 4), 0.5)
    ratio[0] = 1.0
    deq = fake_quant(w, spec, clip=ratio)
    qw = quantize_weight(w, spec, clip=ratio)
    assert torch.equal(deq, qw.dequantize())
    gmax = w.reshape(24, 4, 32).abs().amax(-1)
    dmax = deq.reshape(24, 4, 32).abs().amax(-1)
    # the shrunk range bounds the dequantized weights (asymmetric: the rounded zero point moves the
    # range's ends by at most half a step); the outlier group's range halves
    slack = 0.0 if spec.symmetric else qw.scales[1:] / 2
    assert (dmax[1:] <= 0.5 * gmax[1:] * (1 + 1e-5) + slack).all()
    assert torch.equal(deq[0], fake_quant(w, spec)[0]) and dmax[3, 0] < 0.6  # ratio 1 = no clip, per group
    assert (fake_quant(w, spec, clip=0.5) - deq)[1:].abs().max() == 0  # one number = a ratio for every group
    with pytest.raises(PocketLMError):
        fake_quant(w, spec, clip=torch.ones(24, 3))


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.describe())
def test_ste_forward_is_fake_quant_and_gradient_is_identity(spec):
    w = weight().requires_grad_(True)
    out = fake_quant_ste(w, spec)
    assert torch.allclose(out, fake_quant(w, spec), atol=1e-7)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
    # the plain quantizer has no gradient path: QAT must use the STE version
    assert not fake_quant(w, spec).requires_grad


def test_ternary_absmean():
    w = weight()
    codes, scale = ternary_quantize(w)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.isclose(scale, w.abs().mean())
    assert torch.equal(fake_ternary(w), codes.float() * scale)
    # |w| below scale/2 rounds to 0, above to +-1
    small = w.abs() < scale / 2 * 0.999
    big = w.abs() > scale / 2 * 1.001
    assert (codes[small] == 0).all() and (codes[big] == torch.sign(w[big]).to(torch.int8)).all()
    assert torch.equal(ternary_quantize(torch.zeros(3, 4))[0], torch.zeros(3, 4, dtype=torch.int8))


def test_ternary_ste_gradient_is_identity():
    w = weight().requires_grad_(True)
    out = fake_ternary_ste(w)
    assert torch.allclose(out, fake_ternary(w), atol=1e-7)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
