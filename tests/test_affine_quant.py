"""Affine quantization helpers: the rounding rule, the parameter conventions, and the group-size
refusal. Golden values use scales that are exact in float32 (powers of two) so they can be derived
by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.quant import affine as A


def test_quantize_rounds_ties_to_even_before_adding_the_zero_point():
    x = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -0.51]
    assert A.quantize(x, 1.0, 0, -128, 127).tolist() == [0, 2, 2, 0, -2, -2, 0, -1]
    assert A.quantize(x, 1.0, 3, -128, 127).tolist() == [3, 5, 5, 3, 1, 1, 3, 2]
    assert A.quantize([0.75, 1.25], 0.5, 0, -128, 127).tolist() == [2, 2]  # 1.5 -> 2, 2.5 -> 2


def test_quantize_clamps_and_picks_the_smallest_integer_type():
    q = A.quantize([1000.0, -1000.0, np.inf, -np.inf], 1.0, 0, -128, 127)
    assert q.dtype == np.int8 and q.tolist() == [127, -128, 127, -128]
    u = A.quantize([-3.0, 300.0, 7.0], 1.0, 128, 0, 255)
    assert u.dtype == np.uint8 and u.tolist() == [125, 255, 135]
    q4 = A.quantize([-9.0, 9.0], 1.0, 0, -7, 7)
    assert q4.dtype == np.int8 and q4.tolist() == [-7, 7]


def test_quantize_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        A.quantize([1.0, np.nan], 1.0, 0, -128, 127)


def test_dequantize_subtracts_the_zero_point_then_scales_in_float32():
    r = A.dequantize(np.array([-128, 0, 127], np.int8), 0.5, -3)
    assert r.dtype == np.float32
    assert r.tolist() == [-62.5, 1.5, 65.0]


def test_roundtrip_error_is_at_most_half_a_step_inside_the_range():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 5, 10_000).astype(np.float32)
    p = A.minmax_activation_params(x)
    err = np.abs(p.dequantize(p.quantize(x)) - x)
    assert err.max() <= p.scale * 0.5 * (1 + 1e-5)


# -- weights --------------------------------------------------------------------------------------


def test_per_channel_symmetric_weights_golden():
    w = np.array([[31.75, -10.0, 0.125, 0.375], [0, 0, 0, 0], [1.0, -2.0, 0.0, 0.5]], np.float32)
    p = A.per_channel_symmetric_params(w)
    assert (p.qmin, p.qmax) == (-127, 127)
    assert p.scale.shape == (3, 1) and p.scale.dtype == np.float32
    assert p.scale[0, 0] == 0.25  # 31.75 / 127
    assert p.scale[1, 0] == 1.0  # an all-zero row gets scale 1, not 0
    assert np.all(p.zero_point == 0)
    q = p.quantize(w)
    assert q.dtype == np.int8
    assert q[0].tolist() == [127, -40, 0, 2]  # 0.125/0.25 = 0.5 -> 0, 0.375/0.25 = 1.5 -> 2
    assert q[1].tolist() == [0, 0, 0, 0]
    assert q[2, 1] == -127  # the row's absmax reaches the end of the range


def test_negated_weights_quantize_to_negated_integers():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    for p, neg in [
        (A.per_channel_symmetric_params(w), A.per_channel_symmetric_params(-w)),
        (A.groupwise_params(w, 4, 32), A.groupwise_params(-w, 4, 32)),
    ]:
        np.testing.assert_array_equal(p.scale, neg.scale)
        np.testing.assert_array_equal(neg.quantize(-w), -p.quantize(w).astype(np.int32))


def test_symmetric_int4_groups_golden():
    w = np.array([[3.5, -1.25, 0.25, 0.75, -0.875, 0.0625, 0.1875, 0.3125]], np.float32)
    p = A.groupwise_params(w, bits=4, group_size=4)
    assert (p.qmin, p.qmax, p.group_size) == (-7, 7, 4)
    assert p.scale.tolist() == [[0.5, 0.125]]
    assert p.zero_point.tolist() == [[0, 0]]
    assert p.quantize(w).tolist() == [[7, -2, 0, 2, -7, 0, 2, 2]]
    np.testing.assert_array_equal(p.dequantize(p.quantize(w)), [[3.5, -1.0, 0.0, 1.0, -0.875, 0.0, 0.25, 0.25]])


def test_asymmetric_int4_groups_are_unsigned_and_include_zero_in_the_range():
    w = np.array([[-1.5, 2.25, 0.5, 0.125, 1.0, 2.0, 3.0, 3.75]], np.float32)
    p = A.groupwise_params(w, bits=4, group_size=4, symmetric=False)
    assert (p.qmin, p.qmax) == (0, 15)
    assert p.scale.tolist() == [[0.25, 0.25]]  # 3.75 / 15 both times: the second range widens to [0, 3.75]
    assert p.zero_point.tolist() == [[6, 0]]
    q = p.quantize(w)
    assert q.dtype == np.uint8
    assert q.tolist() == [[0, 15, 8, 6, 4, 8, 12, 15]]  # 0.125/0.25 = 0.5 -> 0, + 6
    assert p.dequantize(p.quantize(np.zeros_like(w))).tolist() == [[0.0] * 8]  # zero is exact


def test_groups_run_along_the_input_dimension():
    w = np.ones((3, 8), np.float32)
    w[:, 4:] *= 10.0  # the second group of every row is ten times larger
    p = A.groupwise_params(w, bits=4, group_size=4)
    assert p.scale.shape == (3, 2)
    np.testing.assert_allclose(p.scale[:, 1] / p.scale[:, 0], 10.0, rtol=1e-6)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_group_reconstruction_error_is_at_most_half_a_step(bits, symmetric):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((8, 128)) * rng.uniform(0.01, 2, (8, 1))).astype(np.float32)
    p = A.groupwise_params(w, bits, 32, symmetric)
    err = np.abs(p.dequantize(p.quantize(w)) - w)
    assert np.all(err <= np.repeat(p.scale, 32, axis=-1) * 0.5 * (1 + 1e-5))
    if bits == 8:
        assert err.max() < 0.01 * np.abs(w).max()


@pytest.mark.parametrize(
    "width,group,message",
    [
        (576, 128, "group size 128 does not divide the layer width 576; use 32 or 64"),
        (960, 128, "group size 128 does not divide the layer width 960; use 32 or 64"),
        (96, 64, "group size 64 does not divide the layer width 96; use 32"),
        (48, 32, "group size 32 does not divide the layer width 48; use 4, 8 or 16"),
        (6, 4, "group size 4 does not divide the layer width 6; use per-channel quantization instead"),
    ],
)
def test_a_group_size_that_does_not_divide_the_width_is_refused_with_the_valid_choices(width, group, message):
    with pytest.raises(PocketLMError) as e:
        A.groupwise_params(np.zeros((2, width), np.float32), 4, group)
    assert str(e.value) == message


def test_valid_group_sizes_are_accepted():
    for g in (32, 64, 128):
        A.check_group_size(1536, g)


# -- activations ----------------------------------------------------------------------------------


def test_minmax_params_map_the_extremes_to_the_ends_of_the_range():
    x = np.array([-1.0, 0.3, 3.0], np.float32)
    p = A.minmax_activation_params(x)
    assert p.scale.dtype == np.float32
    assert p.scale == pytest.approx(4 / 255, rel=1e-6)
    assert int(p.zero_point) == -64  # rint(-128 + 1 / (4/255)) = rint(-64.25)
    assert p.quantize(x).tolist()[::2] == [-128, 127]
    assert p.dequantize(p.quantize(0.0)) == 0.0


def test_an_all_positive_range_still_represents_zero():
    p = A.minmax_activation_params(np.array([2.0, 5.1], np.float32))
    assert int(p.zero_point) == -128
    assert p.dequantize(p.quantize(0.0)) == 0.0


def test_a_constant_zero_tensor_gets_scale_one():
    p = A.minmax_activation_params(np.zeros(10, np.float32))
    assert p.scale == 1.0 and p.dequantize(p.quantize(np.zeros(3))).tolist() == [0.0] * 3


def test_symmetric_activation_params_have_zero_point_zero():
    p = A.minmax_activation_params(np.array([-1.0, 12.7], np.float32), symmetric=True)
    assert int(p.zero_point) == 0
    assert p.scale == pytest.approx(0.1, rel=1e-6)


def test_percentile_params_clip_outliers_that_minmax_keeps():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(100_000), [1000.0]]).astype(np.float32)
    mm = A.minmax_activation_params(x)
    pc = A.percentile_activation_params(x, 99.9)
    assert pc.scale < mm.scale / 50
    assert pc.quantize(np.float32(1000.0)) == 127
    assert A.percentile_activation_params(x, 100.0).scale == mm.scale
    with pytest.raises(PocketLMError, match="percentile"):
        A.percentile_activation_params(x, 30.0)


def test_dynamic_per_token_params_equal_per_tensor_params_for_each_token():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 16)) * rng.uniform(0.1, 10, (2, 5, 1))).astype(np.float32)
    x[1, 2] = 0.0
    p = A.dynamic_per_token_params(x)
    assert p.scale.shape == (2, 5, 1) and p.zero_point.shape == (2, 5, 1)
    q = p.quantize(x)
    for i in range(2):
        for t in range(5):
            row = A.minmax_activation_params(x[i, t])
            assert p.scale[i, t, 0] == row.scale and p.zero_point[i, t, 0] == row.zero_point
            np.testing.assert_array_equal(q[i, t], row.quantize(x[i, t]))
    live = np.ones((2, 5), bool)
    live[1, 2] = False
    assert np.all(q.min(axis=-1)[live] == -128) and np.all(q.max(axis=-1)[live] == 127)


def test_weights_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        A.per_channel_symmetric_params(np.zeros(4, np.float32))
