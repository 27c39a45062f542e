"""The engine's fused loops (qlib.engine.fused) against the readable tensor-op route, bit for bit."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib import fixedpoint as fp
from qlib import engine
from qlib.engine import fused

I32_MIN, I32_MAX = fp.INT32_MIN, fp.INT32_MAX
RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def readable_requantize(acc, m0, shift, bias, bias_shift, zero_point, lo, hi, dtype):
    """The engine's readable epilogue, through gemmlowp's checked MultiplyByQuantizedMultiplier."""
    shape = (1, -1, 1)
    v = (acc.to(torch.int64) << bias_shift) + bias.reshape(shape)
    scaled = fp.multiply_by_quantized_multiplier(v, m0.reshape(shape), shift.reshape(shape)).to(torch.int64)
    return (scaled + zero_point).clamp(lo, hi).to(dtype)


@st.composite
def epilogues(draw):
    """A per-channel epilogue and an accumulator whose shifted, biased values fill the int32 range."""
    n, channels, length = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    m0 = draw(st.lists(st.integers(2**30, I32_MAX), min_size=channels, max_size=channels))
    shift = draw(st.lists(st.integers(fp.MIN_SHIFT, fp.MAX_SHIFT), min_size=channels, max_size=channels))
    bias_shift = draw(st.integers(0, 16))
    half = 2**30 >> bias_shift          # |acc << k| <= 2^30 and |bias| < 2^30: the sum fits int32
    acc = draw(st.lists(st.integers(-half, half - 1), min_size=n * channels * length,
                        max_size=n * channels * length))
    bias = draw(st.lists(st.integers(-(2**30), 2**30 - 1), min_size=channels, max_size=channels))
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    qmin, qmax = RANGES[dtype]
    lo = draw(st.integers(qmin, qmax))
    hi = draw(st.integers(lo, qmax))
    zero_point = draw(st.integers(qmin, qmax))
    return (torch.tensor(acc, dtype=torch.int32).reshape(n, channels, length), torch.tensor(m0),
            torch.tensor(shift), torch.tensor(bias), bias_shift, zero_point, lo, hi, dtype)


@settings(max_examples=300, deadline=None)
@given(epilogues())
def test_requantize_is_the_readable_epilogue_bit_for_bit(case):
    acc, m0, shift, bias, bias_shift, zero_point, lo, hi, dtype = case
    multiplier = fp.FixedPointMultiplier(m0.reshape(1, -1, 1), shift.reshape(1, -1, 1))
    ours = fused.requantize(acc, multiplier, bias, bias_shift, zero_point, lo, hi, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, readable_requantize(acc, m0, shift, bias, bias_shift, zero_point, lo, hi, dtype))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([I32_MIN, I32_MIN + 1, -1, 0, 1, I32_MAX - 1, I32_MAX])
                | st.integers(I32_MIN, I32_MAX), min_size=1, max_size=40),
       st.integers(2**30, I32_MAX), st.integers(fp.MIN_SHIFT, fp.MAX_SHIFT))
def test_requantize_at_the_int32_extremes(values, m0, shift):
    # no bias, no shift: the accumulator itself spans int32; an int32 output grid shows every bit
    acc = torch.tensor(values, dtype=torch.int32).reshape(1, 1, -1)
    multiplier = fp.FixedPointMultiplier(torch.tensor([m0]), torch.tensor([shift]))
    expected = fp.multiply_by_quantized_multiplier(acc, m0, shift)
    for lo, hi, dtype in ((-128, 127, torch.int8), (0, 255, torch.uint8)):
        ours = fused.requantize(acc, multiplier, None, 0, 0, lo, hi, dtype)
        assert torch.equal(ours, expected.clamp(lo, hi).to(dtype))
    # the output clamp hides most of the multiply; rescale so that the result lands inside [-128, 127]
    wide = fused.requantize(acc, fp.FixedPointMultiplier.from_reals(2.0**-25), None, 0, 0, -128, 127, torch.int8)
    assert torch.equal(wide, fp.multiply_by_quantized_multiplier(acc, *fp.quantize_multiplier(2.0**-25))
                       .clamp(-128, 127).to(torch.int8))


@settings(max_examples=100, deadline=None)
@given(epilogues())
def test_float32_and_int64_accumulators_give_the_same_codes(case):
    acc, m0, shift, bias, bias_shift, zero_point, lo, hi, dtype = case
    acc = acc.clamp(-(2**24), 2**24)    # float32 holds these integers exactly
    multiplier = fp.FixedPointMultiplier(m0.reshape(1, -1, 1), shift.reshape(1, -1, 1))
    codes = [fused.requantize(a, multiplier, bias, bias_shift, zero_point, lo, hi, dtype)
             for a in (acc, acc.float(), acc.to(torch.int64))]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])


def test_requantize_shapes_per_tensor_and_linear():
    g = torch.Generator().manual_seed(0)
    multipliers = fp.FixedPointMultiplier.from_reals([0.003, 0.02, 0.5], (1, -1))
    acc = torch.randint(-5000, 5000, (7, 3), generator=g, dtype=torch.int32)       # a linear layer's (N, C)
    bias = torch.tensor([10, -20, 30])
    expected = readable_requantize(acc.unsqueeze(-1), multipliers.multiplier.reshape(-1), torch.tensor(
        fp.quantize_multipliers([0.003, 0.02, 0.5])[1]).long(), bias, 0, 5, 0, 255, torch.uint8).squeeze(-1)
    assert torch.equal(fused.requantize(acc, multipliers, bias, 0, 5, 0, 255, torch.uint8), expected)
    one = fp.FixedPointMultiplier.from_reals(0.01)                 # one multiplier for any shape
    conv = torch.randint(-5000, 5000, (2, 4, 3, 5), generator=g, dtype=torch.int32)
    assert torch.equal(fused.requantize(conv, one, None, 0, -3, -128, 127, torch.int8),
                       (one.apply_unchecked(conv.long()) - 3).clamp(-128, 127).to(torch.int8))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([torch.uint8, torch.int8]), st.integers(-255, 255), st.integers(1, 50))
def test_centre(dtype, zero_point, size):
    lo, hi = RANGES[dtype]
    codes = torch.randint(lo, hi + 1, (size, 3), dtype=torch.int32).to(dtype)
    ours = fused.centre(codes, zero_point)
    assert ours.dtype == torch.float32 and torch.equal(ours, (codes.to(torch.int32) - zero_point).float())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([torch.uint8, torch.int8]), st.sampled_from([torch.uint8, torch.int8]),
       st.floats(1e-2, 10.0), st.floats(1e-2, 10.0), st.floats(1e-2, 10.0), st.data())
def test_add_is_the_readable_residual_add(dtype_a, dtype_b, scale_a, scale_b, scale_out, data):
    specs = []
    for dtype, scale in ((dtype_a, scale_a), (dtype_b, scale_b), (dtype_a, scale_out)):
        lo, hi = RANGES[dtype]
        specs.append(engine.ActSpec(scale, data.draw(st.integers(lo, hi)), lo, hi, dtype))
    op = engine.IntAdd("add", ["a", "b"], *specs, data.draw(st.sampled_from([None, "relu", "relu6"])))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    qa, qb = (torch.randint(s.qmin, s.qmax + 1, (3, 4, 5), generator=g).to(s.dtype) for s in specs[:2])
    assert torch.equal(op.forward(qa, qb, backend="fast"), op.forward(qa, qb))


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-3, 10.0), st.floats(1e-3, 10.0), st.integers(0, 255), st.integers(-128, 127))
def test_requantize_op_moves_codes_between_grids_as_the_readable_route(scale_in, scale_out, z_in, z_out):
    op = engine.IntRequantize("r", ["x"], engine.ActSpec(scale_in, z_in, 0, 255, torch.uint8),
                              engine.ActSpec(scale_out, z_out, -128, 127, torch.int8))
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 4, 16)
    assert torch.equal(op.forward(x, backend="fast"), op.forward(x))


def test_fast_route_of_a_shift_add_layer():
    g = torch.Generator().manual_seed(0)
    codes = torch.tensor([-10, -8, -5, -4, -2, -1, 0, 1, 2, 4, 5, 8, 10])[torch.randint(0, 13, (6, 4, 3, 3),
                                                                                       generator=g)]
    spec_in, spec_out = engine.ActSpec(0.05, 17, 0, 255, torch.uint8), engine.ActSpec(0.2, 3, 0, 255, torch.uint8)
    scales = torch.rand(6, generator=g).double().numpy() * 0.01 + 0.001
    layer = engine.IntShiftAdd("s", ["x"], codes, scales, torch.randn(6, generator=g).double(), spec_in, spec_out,
                               "relu", ((2, 1), (1, 1), (1, 1), 2))
    x = torch.randint(0, 256, (3, 8, 7, 6), generator=g).to(torch.uint8)
    assert torch.equal(layer.forward(x, backend="fast"), layer.forward(x))


def test_fast_route_falls_back_to_int32_sums_where_float32_would_not_be_exact():
    # 64 inputs x 255 x 127 per output: past 2^24 at full width, so the sums are split, in int32
    layer = engine.IntLayer("fc", ["x"], torch.full((3, 1100), 127, dtype=torch.int8), 0, [1e-3] * 3, None,
                            engine.ActSpec(0.1, 0, 0, 255, torch.uint8), engine.ActSpec(50.0, 0, 0, 255, torch.uint8),
                            None)
    x = torch.full((2, 1100), 255, dtype=torch.uint8)
    assert layer._fast_accumulator(x).dtype == torch.int32
    assert torch.equal(layer.forward(x, backend="fast"), layer.forward(x))


def test_bad_input():
    one = fp.FixedPointMultiplier.from_reals([0.5, 0.25], (1, -1, 1))
    with pytest.raises(TypeError, match="acc must be float32"):
        fused.requantize(torch.zeros(1, 2, 1, dtype=torch.float64), one)
    with pytest.raises(TypeError, match="acc must be a torch tensor"):
        fused.requantize(np.zeros((1, 2, 1), np.int32), one)
    with pytest.raises(ValueError, match=r"acc must be \(N, 2, ...\)"):
        fused.requantize(torch.zeros(1, 3, 1, dtype=torch.int32), one)
    with pytest.raises(TypeError, match="dtype must be torch.uint8 or torch.int8"):
        fused.requantize(torch.zeros(1, 2, 1, dtype=torch.int32), one, dtype=torch.int32)
    with pytest.raises(ValueError, match="bias_shift must be in"):
        fused.requantize(torch.zeros(1, 2, 1, dtype=torch.int32), one, bias_shift=31)
    with pytest.raises(ValueError, match="bias has 3 entries for 2 multipliers"):
        fused.requantize(torch.zeros(1, 2, 1, dtype=torch.int32), one, bias=[1, 2, 3])
    with pytest.raises(TypeError, match="codes must be uint8 or int8"):
        fused.centre(torch.zeros(3, dtype=torch.int32), 0)
    single = fp.FixedPointMultiplier.from_reals(0.5)
    with pytest.raises(ValueError, match="qa and qb must have the same shape"):
        fused.add(torch.zeros(2, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), 0, 0, 20, single, single,
                  single, 0, 0, 255, torch.uint8)
    with pytest.raises(ValueError, match="single"):
        fused.add(torch.zeros(2, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), 0, 0, 20, one, single,
                  single, 0, 0, 255, torch.uint8)
    with pytest.raises(ValueError, match="runs on the CPU"):
        fused.centre(torch.zeros(3, dtype=torch.uint8, device="meta"), 0)


@pytest.mark.parametrize("dtype, zero_point", [(torch.uint8, 3), (torch.uint8, 200), (torch.int8, -5)])
@pytest.mark.parametrize("kind, shape, conv", [
    ("linear", (4, 12), None),
    ("conv1d", (4, 6, 11), ((2,), (2,), (1,), 1)),
    ("conv1d", (4, 6, 11), ((1,), (0,), (1,), 1)),
    ("conv2d", (4, 6, 5, 7), ((2, 1), (0, 0), (1, 1), 1)),
])
def test_int8_gemm_route_is_the_exact_accumulator_less_the_folded_zero_point(dtype, zero_point, kind, shape, conv):
    g = torch.Generator().manual_seed(0)
    lo, hi = RANGES[dtype]
    cin = shape[1]
    weight_shape = (5, cin) if kind == "linear" else (5, cin, 3) if kind == "conv1d" else (5, cin, 1, 1)
    weights = torch.randint(-127, 128, weight_shape, generator=g).to(torch.int8)
    spec_in = engine.ActSpec(0.05, zero_point, lo, hi, dtype)
    layer = engine.IntLayer("l", ["x"], weights, 0, [1e-2] * 5, torch.randn(5, generator=g).double(), spec_in,
                            engine.ActSpec(0.5, 0, lo, hi, dtype), None, conv)
    x = torch.randint(lo, hi + 1, shape, generator=g).to(dtype)
    plan = layer._int8_plan()
    assert plan is not None
    raw = layer._int8_accumulator(x, plan[0]).to(torch.int64)
    offset = 128 - zero_point if dtype == torch.uint8 else -zero_point
    column_sums = weights.to(torch.int64).reshape(5, -1).sum(1).reshape(1, -1, *[1] * (x.ndim - 2))
    assert torch.equal(raw + offset * column_sums, layer.accumulate(x).to(torch.int64))
    assert torch.equal(layer.forward(x, backend="fast"), layer.forward(x))


def test_int8_gemm_route_only_where_it_applies():
    spec = engine.ActSpec(0.05, 3, 0, 255, torch.uint8)

    def route(zero_point, conv, weights=torch.ones(4, 4, 3, dtype=torch.int8)):
        return engine.IntLayer("l", ["x"], weights, zero_point, [1e-2] * 4, None, spec, spec, None, conv).fast_route

    assert route(0, ((1,), (1,), (1,), 1)) == "int8 GEMM"
    assert route(1, ((1,), (1,), (1,), 1)) == "float32 kernels"                 # weight zero-points
    assert route(0, ((1,), (1,), (1,), 2), torch.ones(4, 2, 3, dtype=torch.int8)) == "float32 kernels"  # groups
    assert route(0, ((1,), (2,), (2,), 1)) == "float32 kernels"                 # dilation
    assert route(0, ((1, 1), (1, 1), (1, 1), 1), torch.ones(4, 4, 3, 3, dtype=torch.int8)) == "float32 kernels"
    assert route(0, ((2, 2), (0, 0), (1, 1), 1), torch.ones(4, 4, 1, 1, dtype=torch.int8)) == "int8 GEMM"
