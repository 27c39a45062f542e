"""Fixed-point requantization against plain Python-int references written from gemmlowp's definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib import fixedpoint as fp

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
int32s = st.integers(I32_MIN, I32_MAX)


def ref_srdhm(a: int, b: int) -> int:
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    return int(math.copysign(abs(total) // (1 << 31), total)) if total else 0  # C: truncate toward zero


def ref_rdbpot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_mbqm(x: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    return ref_rdbpot(ref_srdhm(max(I32_MIN, min(I32_MAX, x << left)), m0), right)


def test_quantize_multiplier_paper_example():
    # S1 = 0.1, S2 = 0.2, S3 = 0.05 -> M = 0.4 = 2^-1 * 0.8
    m0, shift = fp.quantize_multiplier(0.1 * 0.2 / 0.05)
    assert shift == -1 and m0 == round(0.8 * 2**31)
    assert m0 * 2.0 ** (shift - 31) == pytest.approx(0.4, rel=1e-9)


@pytest.mark.parametrize("real", [1e-9, 2**-32, 0.25, 0.5, 0.7071067811865476, 0.9999999999, 1.0, 3.75, 2**29])
def test_quantize_multiplier_is_normalised_and_accurate(real):
    m0, shift = fp.quantize_multiplier(real)
    assert 2**30 <= m0 < 2**31
    assert abs(m0 * 2.0 ** (shift - 31) - real) <= 2.0 ** (shift - 32)  # half a unit in the last place


def test_quantize_multiplier_renormalises_when_rounding_reaches_one():
    m0, shift = fp.quantize_multiplier(1 - 2**-40)  # mantissa rounds up to 2^31
    assert (m0, shift) == (2**30, 1)


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (2**31, ValueError), (2**-40, ValueError),
                                        ("0.5", TypeError), (True, TypeError)])
def test_quantize_multiplier_bad_input(bad, error):
    with pytest.raises(error, match="real must"):
        fp.quantize_multiplier(bad)


EDGE = [I32_MIN, I32_MIN + 1, -(2**30), -3, -2, -1, 0, 1, 2, 3, 2**30, I32_MAX - 1, I32_MAX]


def test_srdhm_edge_cases_exhaustively():
    a = np.array([x for x in EDGE for _ in EDGE], dtype=np.int32)
    b = np.array([y for _ in EDGE for y in EDGE], dtype=np.int32)
    expected = [ref_srdhm(int(x), int(y)) for x, y in zip(a, b)]
    assert fp.saturating_rounding_doubling_high_mul(a, b).tolist() == expected
    assert fp.saturating_rounding_doubling_high_mul(torch.from_numpy(a), torch.from_numpy(b)).tolist() == expected
    assert fp.saturating_rounding_doubling_high_mul(np.int32(I32_MIN), np.int32(I32_MIN)) == I32_MAX


def test_srdhm_ties_round_up():
    # a * b / 2^31 = +0.5 -> 1 and -0.5 -> 0 (toward +inf), +1.5 -> 2, -1.5 -> -1
    half = 2**30
    a = np.array([half, -half, 3 * 2**29, -3 * 2**29])
    assert fp.saturating_rounding_doubling_high_mul(a, np.array([1, 1, 2, 2])).tolist() == [1, 0, 2, -1]


def test_rdbpot_every_exponent_and_ties():
    xs = np.array(EDGE + [5, -5, 6, -6, 7, -7], dtype=np.int32)
    for exponent in range(32):
        expected = [ref_rdbpot(int(x), exponent) for x in xs]
        assert fp.rounding_divide_by_pot(xs, exponent).tolist() == expected
        assert fp.rounding_divide_by_pot(torch.from_numpy(xs), exponent).tolist() == expected
    # ties away from zero: 5/2 -> 3, -5/2 -> -3, 6/4 -> 2, -6/4 -> -2
    assert fp.rounding_divide_by_pot(np.array([5, -5, 6, -6]), np.array([1, 1, 2, 2])).tolist() == [3, -3, 2, -2]


def test_mbqm_every_shift():
    xs = np.array(EDGE + [12345, -12345, 255 * 127 * 1000], dtype=np.int32)
    for shift in range(fp.MIN_SHIFT, fp.MAX_SHIFT + 1):
        for m0 in (2**30, 2**30 + 12345, I32_MAX):
            expected = [ref_mbqm(int(x), m0, shift) for x in xs]
            assert fp.multiply_by_quantized_multiplier(xs, m0, shift).tolist() == expected


def test_mbqm_per_channel_broadcast_torch():
    x = torch.tensor([[1000, -1000, 77], [5, 6, -7]], dtype=torch.int32)
    m0 = np.array([2**30, 1717986918, 2**31 - 1], dtype=np.int32)
    shift = np.array([-1, -3, 0], dtype=np.int32)
    out = fp.multiply_by_quantized_multiplier(x, m0, shift)
    assert out.dtype == torch.int32
    expected = [[ref_mbqm(int(v), int(m), int(s)) for v, m, s in zip(row, m0, shift)] for row in x.tolist()]
    assert out.tolist() == expected


@settings(max_examples=300, deadline=None)
@given(int32s, int32s)
def test_srdhm_matches_reference(a, b):
    assert int(fp.saturating_rounding_doubling_high_mul(np.array([a]), np.array([b]))[0]) == ref_srdhm(a, b)


@settings(max_examples=300, deadline=None)
@given(int32s, st.floats(2**-32, 2**29, allow_nan=False, allow_infinity=False))
def test_mbqm_matches_reference_and_is_close_to_the_real_product(x, real):
    m0, shift = fp.quantize_multiplier(real)
    got = int(fp.multiply_by_quantized_multiplier(np.array([x], dtype=np.int64), m0, shift)[0])
    assert got == ref_mbqm(x, m0, shift)
    exact = x * m0 * 2.0 ** (shift - 31)
    if abs(exact) < 2**31 - 2 and (shift <= 0 or abs(x) < 2 ** (31 - shift)):  # no saturation
        assert abs(got - exact) <= 1.0  # two roundings: at most one unit off the exact product


def test_bad_input():
    with pytest.raises(TypeError, match="a must be an integer"):
        fp.saturating_rounding_doubling_high_mul(np.array([1.5]), np.array([1]))
    with pytest.raises(TypeError, match="x must be an integer tensor"):
        fp.multiply_by_quantized_multiplier(torch.tensor([1.0]), 2**30, 0)
    with pytest.raises(ValueError, match="outside the int32 range"):
        fp.rounding_divide_by_pot(np.array([2**31]), 1)
    with pytest.raises(ValueError, match="exponent must be in \\[0, 31\\]"):
        fp.rounding_divide_by_pot(np.array([1]), 32)
    with pytest.raises(ValueError, match="exponent must be in \\[0, 31\\]"):
        fp.rounding_divide_by_pot(np.array([1, 2]), np.array([1, -1]))
    with pytest.raises(ValueError, match="multiplier must be a Q31 mantissa"):
        fp.multiply_by_quantized_multiplier(np.array([1]), 12345, 0)
    with pytest.raises(ValueError, match="shift must be in \\[-31, 30\\]"):
        fp.multiply_by_quantized_multiplier(np.array([1]), 2**30, 31)
    with pytest.raises(TypeError, match="x must be a numpy integer array or a torch integer tensor"):
        fp.rounding_divide_by_pot([1, 2], 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(int32s, min_size=1, max_size=50), st.floats(2**-32, 2**29, allow_nan=False, allow_infinity=False))
def test_fast_multiplier_equals_the_chained_primitives(xs, real):
    m0, shift = fp.quantize_multiplier(real)
    x = torch.tensor(xs, dtype=torch.int32)
    fast = fp.FixedPointMultiplier.from_reals(real)(x)
    left, right = max(shift, 0), max(-shift, 0)
    shifted = (x.to(torch.int64) << left).clamp(I32_MIN, I32_MAX)
    chained = fp.rounding_divide_by_pot(fp.saturating_rounding_doubling_high_mul(shifted, m0), right)
    assert fast.dtype == torch.int32 and torch.equal(fast, chained)
    with pytest.raises(TypeError, match="x must be an int32 torch tensor"):
        fp.FixedPointMultiplier.from_reals(real)(x.to(torch.int64))


def test_apply_unchecked_numpy_and_torch_per_channel_equal_the_reference():
    # Per-channel multipliers with right shifts, no shift and a left shift, on int32 edge values.
    reals = [3e-4, 0.75, 3.5]
    m0, shift = fp.quantize_multipliers(np.array(reals))
    values = np.array([I32_MIN, -(2**30), -12345, -1, 0, 1, 7, 2**20 + 3, I32_MAX], dtype=np.int64)
    x = np.tile(values, (3, 1))  # one row per channel
    in_numpy = fp.FixedPointMultiplier(m0.astype(np.int64).reshape(3, 1), shift.astype(np.int64).reshape(3, 1))
    in_torch = fp.FixedPointMultiplier.from_reals(reals, shape=(3, 1))
    got_numpy = in_numpy.apply_unchecked(x)
    got_torch = in_torch.apply_unchecked(torch.from_numpy(x))
    expected = [[ref_mbqm(int(v), int(m0[c]), int(shift[c])) for v in values] for c in range(3)]
    assert got_numpy.tolist() == expected and got_torch.tolist() == expected
    assert torch.equal(in_torch(torch.from_numpy(x).to(torch.int32)).to(torch.int64), got_torch)
