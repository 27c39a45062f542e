"""The affine map: formulas, exactness, properties (hypothesis) and bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qlib import affine
from qlib.affine import (QuantParams, dequantize, fake_quantize, qparams_from_range, qparams_from_tensor, quantize,
                         qrange)

SCHEME_CHOICES = [("asymmetric", False, False), ("asymmetric", True, False), ("symmetric", True, False),
                  ("symmetric", True, True), ("symmetric", False, False), ("asymmetric", False, True)]


def test_qrange_values():
    assert qrange(8) == (0, 255)
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(8, signed=True, narrow_range=True) == (-127, 127)
    assert qrange(8, narrow_range=True) == (1, 255)
    assert qrange(2, signed=True) == (-2, 1)
    assert qrange(16) == (0, 65535)


def test_worked_example_from_the_chapter():
    # [-1, 3] on uint8: S = 4/255, Z = round(63.75) = 64.
    qp = qparams_from_range(-1.0, 3.0, bits=8)
    assert np.isclose(float(qp.scale), 4 / 255, rtol=1e-7)
    assert int(qp.zero_point) == 64
    codes = quantize(np.array([-1.0, 0.0, 1.0, 3.0]), qp)
    assert codes.dtype == np.uint8
    assert codes.tolist() == [0, 64, 128, 255]


def test_symmetric_formulas():
    qp = qparams_from_range(-2.0, 1.0, bits=8, scheme="symmetric", signed=True, narrow_range=True)
    assert np.isclose(float(qp.scale), 2.0 / 127) and int(qp.zero_point) == 0
    qp = qparams_from_range(-2.0, 1.0, bits=8, scheme="symmetric", signed=True)
    assert np.isclose(float(qp.scale), 2.0 / 127.5)  # PyTorch's full-range convention
    qp = qparams_from_range(-2.0, 1.0, bits=8, scheme="symmetric", signed=False)
    assert int(qp.zero_point) == 128


def test_matches_pytorch_fake_quantize_per_tensor():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    qp = qparams_from_tensor(x, bits=8)
    ours = fake_quantize(x, qp)
    theirs = torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
    assert torch.equal(ours, theirs)


def test_matches_pytorch_fake_quantize_per_channel():
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 4).reshape(1, 4, 1)
    qp = qparams_from_tensor(x, 4, "symmetric", True, axis=1)
    theirs = torch.fake_quantize_per_channel_affine(x, torch.from_numpy(qp.scale), torch.from_numpy(qp.zero_point),
                                                    1, qp.qmin, qp.qmax)
    assert torch.equal(fake_quantize(x, qp), theirs)


def test_numpy_and_torch_agree():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    for axis in (None, 0, 1):
        qp = qparams_from_tensor(x, 4, "asymmetric", False, axis=axis)
        assert np.array_equal(quantize(x, qp), quantize(torch.from_numpy(x), qp).numpy())
        assert np.array_equal(fake_quantize(x, qp), fake_quantize(torch.from_numpy(x), qp).numpy())
        from_torch = dequantize(quantize(torch.from_numpy(x), qp), qp).numpy()
        assert np.array_equal(dequantize(quantize(x, qp), qp), from_torch)


def test_constant_and_zero_tensors_get_a_valid_scale():
    for x in (np.zeros(10), np.full(10, 3.0), np.full(10, -2.0)):
        for scheme, signed, narrow in SCHEME_CHOICES:
            qp = qparams_from_tensor(x, 8, scheme, signed, narrow)
            assert np.isfinite(qp.scale) and qp.scale > 0
            xq = fake_quantize(x, qp)
            assert np.all(np.isfinite(xq))
            # A constant inside the range is reproduced to within half a step.
            assert np.all(np.abs(xq - x) <= float(qp.scale) / 2 + 1e-6 * np.abs(x).max(initial=1))


def test_real_range_and_levels():
    qp = qparams_from_range(-1.0, 3.0, bits=3)
    levels = qp.levels()
    assert len(levels) == 8 and np.all(np.diff(levels) > 0)
    assert 0.0 in levels
    lo, hi = qp.real_range
    assert np.isclose(levels[0], lo) and np.isclose(levels[-1], hi)
    with pytest.raises(ValueError, match="per-tensor"):
        qparams_from_tensor(np.ones((2, 2)), axis=0).levels()


def test_channel_extracts_per_tensor_params():
    x = np.random.default_rng(1).normal(size=(3, 10))
    qp = qparams_from_tensor(x, 4, axis=0)
    assert float(qp.channel(1).scale) == qp.scale[1]
    with pytest.raises(ValueError, match="per-channel"):
        qparams_from_tensor(x).channel(0)


def test_quantization_mse_and_sqnr():
    x = np.linspace(-1, 1, 10001)
    qp = qparams_from_range(-1.0, 1.0, 8, "symmetric", True, True)
    mse = affine.quantization_mse(x, qp)
    assert np.isclose(mse, float(qp.scale) ** 2 / 12, rtol=0.02)  # uniform data: exactly the S^2/12 model
    assert affine.sqnr_db(x, x) == float("inf")
    assert np.isclose(affine.sqnr_db(np.ones(4), np.full(4, 0.9)), 20.0)


# ---------------------------------------------------------------- properties ------------

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=finite)
schemes = st.sampled_from(SCHEME_CHOICES)
bit_widths = st.integers(2, 16)


@settings(max_examples=150, deadline=None)
@given(tensors, bit_widths, schemes, st.sampled_from([None, 0, 1]))
def test_codes_within_range_and_zero_exact(x, bits, scheme, axis):
    name, signed, narrow = scheme
    qp = qparams_from_tensor(x, bits, name, signed, narrow, axis)
    q = quantize(x, qp)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    zero_codes = quantize(np.zeros_like(x), qp)
    expected = np.broadcast_to(qp.zero_point.reshape([-1 if d == axis else 1 for d in range(x.ndim)]), x.shape)
    assert np.array_equal(zero_codes.astype(np.int64), expected)  # 0 maps exactly to Z
    assert np.all(fake_quantize(np.zeros_like(x), qp) == 0)  # and back to exactly 0


@settings(max_examples=150, deadline=None)
@given(tensors, bit_widths, schemes)
def test_error_at_most_half_a_step_inside_the_range(x, bits, scheme):
    name, signed, narrow = scheme
    qp = qparams_from_tensor(x, bits, name, signed, narrow)
    lo, hi = (float(v) for v in qp.real_range)
    inside = (x >= lo) & (x <= hi)
    err = np.abs(dequantize(quantize(x, qp), qp).astype(np.float64) - x)[inside]
    step = float(qp.scale)
    # half a step, plus float32 rounding of x / S and S * (q - Z)
    assert np.all(err <= step / 2 + 4 * np.finfo(np.float32).eps * (np.abs(x[inside]) + step))


@settings(max_examples=100, deadline=None)
@given(tensors, bit_widths, schemes, st.sampled_from([0, 1]))
def test_per_channel_equals_per_tensor_on_each_channel(x, bits, scheme, axis):
    name, signed, narrow = scheme
    qp = qparams_from_tensor(x, bits, name, signed, narrow, axis)
    q = quantize(x, qp)
    for c in range(x.shape[axis]):
        channel = np.take(x, c, axis=axis)
        per_tensor = qparams_from_tensor(channel, bits, name, signed, narrow)
        assert float(per_tensor.scale) == qp.scale[c] and int(per_tensor.zero_point) == qp.zero_point[c]
        assert np.array_equal(np.take(q, c, axis=axis), quantize(channel, per_tensor))


@settings(max_examples=150, deadline=None)
@given(tensors, bit_widths, schemes)
def test_idempotent_on_the_grid(x, bits, scheme):
    name, signed, narrow = scheme
    qp = qparams_from_tensor(x, bits, name, signed, narrow)
    once = fake_quantize(x, qp)
    assert np.array_equal(fake_quantize(once, qp), once)
    assert np.array_equal(quantize(once, qp), quantize(x, qp))


# ---------------------------------------------------------------- bad input -------------

@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be in \\[2, 16\\]"):
        qparams_from_range(0.0, 1.0, bits=bits)


@pytest.mark.parametrize("bits", [4.0, "8", None, True])
def test_bits_wrong_type(bits):
    with pytest.raises(TypeError, match="bits must be an integer"):
        qrange(bits)


def test_nan_and_inf_rejected():
    for bad in (np.array([1.0, np.nan]), np.array([np.inf, 0.0]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            qparams_from_tensor(bad)
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            quantize(bad, qparams_from_range(0.0, 1.0))
    with pytest.raises(ValueError, match="rmax must be finite"):
        qparams_from_range(0.0, float("inf"))


def test_min_greater_than_max():
    with pytest.raises(ValueError, match="rmin must be <= rmax"):
        qparams_from_range(2.0, 1.0)


def test_empty_tensors():
    with pytest.raises(ValueError, match="x is empty"):
        qparams_from_tensor(np.zeros(0))
    with pytest.raises(ValueError, match="rmin is empty"):
        qparams_from_range(np.zeros(0), np.zeros(0), axis=0)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="scheme must be one of 'asymmetric', 'symmetric'"):
        qparams_from_range(0.0, 1.0, scheme="affine")


def test_wrong_dtypes():
    qp = qparams_from_range(0.0, 1.0)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        quantize(np.arange(4), qp)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        quantize(torch.arange(4), qp)
    with pytest.raises(TypeError, match="x must be a numpy array or a torch tensor"):
        quantize([0.1, 0.2], qp)
    with pytest.raises(TypeError, match="q must hold integer codes"):
        dequantize(np.zeros(3), qp)
    with pytest.raises(TypeError, match="qparams must be a QuantParams"):
        quantize(np.zeros(3), (0.1, 0))
    with pytest.raises(TypeError, match="signed must be True or False"):
        qrange(8, signed=1)


def test_codes_out_of_range_on_dequantize():
    qp = qparams_from_range(-1.0, 1.0, bits=4)
    with pytest.raises(ValueError, match="q holds codes outside \\[0, 15\\]"):
        dequantize(np.array([0, 16]), qp)


def test_per_channel_shape_mismatch():
    qp = qparams_from_tensor(np.ones((3, 4)), axis=0)
    with pytest.raises(ValueError, match="do not fit an input of shape"):
        quantize(np.ones((4, 3)), qp)
    with pytest.raises(ValueError, match="axis must be None or in"):
        qparams_from_tensor(np.ones((3, 4)), axis=2)


def test_quantparams_validation():
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        QuantParams(np.float32(0.0), np.int32(0))
    with pytest.raises(ValueError, match="zero_point must lie in"):
        QuantParams(np.float32(1.0), np.int32(300))
    with pytest.raises(ValueError, match="zero_point must hold integers"):
        QuantParams(np.float32(1.0), 2.5)


def test_tensor_range_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -3.0], [2.0, 5.0], [0.5, 0.25]])
    assert affine.tensor_range(x) == (-3.0, 5.0)
    lo, hi = affine.tensor_range(x, axis=1)
    assert lo.tolist() == [0.5, -3.0] and hi.tolist() == [2.0, 5.0]
    lo, hi = affine.tensor_range(x.numpy(), axis=-2)
    assert lo.tolist() == [-3.0, 2.0, 0.25]


def test_tiny_ranges_get_the_minimum_scale():
    # found by hypothesis: a denormal range once gave a float32 scale of exactly 0
    for x in (np.array([6.8e-43], dtype=np.float32), np.array([-1e-45, 1e-45], dtype=np.float32)):
        for scheme, signed, narrow in SCHEME_CHOICES:
            qp = qparams_from_tensor(x, 8, scheme, signed, narrow)
            assert float(qp.scale) == np.float32(affine.SCALE_EPS)
            assert np.all(np.isfinite(fake_quantize(x, qp)))


def test_as_float64_numpy_copies_and_detaches():
    t = torch.tensor([1.5, -2.0], requires_grad=True)
    a = affine.as_float64_numpy(t)
    assert a.dtype == np.float64 and a.tolist() == [1.5, -2.0]
    a[0] = 9.0
    assert t[0].item() == 1.5  # a copy, not a view of the tensor
    assert affine.as_float64_numpy([1, 2]).dtype == np.float64
    assert affine.as_float64_numpy(np.float32(0.5)).shape == ()


def test_per_channel_flag_follows_the_axis():
    w = torch.randn(3, 5)
    per_tensor = qparams_from_tensor(w, 4, "symmetric")
    per_channel = qparams_from_tensor(w, 4, "symmetric", axis=0)
    assert not per_tensor.per_channel and per_tensor.levels().size == 16
    assert per_channel.per_channel and per_channel.scale.shape == (3,)
    # symmetric: scale = max|w| / ((qmax - qmin) / 2), here over the 16 unsigned codes 0..15
    assert per_channel.channel(1).scale == pytest.approx(w[1].abs().max().item() / 7.5, rel=1e-6)
