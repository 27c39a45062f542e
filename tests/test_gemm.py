"""Integer GEMM: every backend exact against an int64 reference; zero-point folding; requantization."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib import fixedpoint as fp
from qlib import gemm


def codes(shape, dtype, generator, extreme=None):
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    if extreme is not None:  # every entry at one end of the range: the worst case for the accumulator
        return torch.full(shape, lo if extreme == "low" else hi - 1, dtype=dtype)
    return torch.randint(lo, hi, shape, generator=generator).to(dtype)


@pytest.mark.parametrize("backend", gemm.BACKENDS)
@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.uint8, torch.int8), (torch.int8, torch.int8),
                                              (torch.uint8, torch.uint8), (torch.int8, torch.uint8)])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 7), (64, 576, 32), (17, 2000, 9)])
def test_integer_matmul_exact(backend, a_dtype, b_dtype, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    for extreme in (None, "low", "high"):
        a, b = codes((m, k), a_dtype, g, extreme), codes((k, n), b_dtype, g, extreme)
        reference = a.to(torch.int64) @ b.to(torch.int64)
        assert torch.equal(gemm.integer_matmul(a, b, backend), reference)


def test_float32_without_splitting_would_not_be_exact():
    # Why the K-split matters: one float32 dot product over K = 2000 worst-case values is wrong.
    a = torch.full((1, 2000), 255, dtype=torch.uint8)
    b = torch.full((2000, 1), 127, dtype=torch.int8)
    a[0, ::2] = 254
    exact = (a.to(torch.int64) @ b.to(torch.int64)).item()
    naive = (a.float() @ b.float()).item()
    assert exact > 2**24 and naive != exact
    assert gemm.integer_matmul(a, b, "float32").item() == exact


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 6), st.integers(0, 255), st.integers(-20, 20),
       st.booleans(), st.sampled_from(gemm.BACKENDS), st.integers(0, 2**16))
def test_zero_point_folding_equals_direct_sum(m, k, n, z1, z2, per_channel, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q1, q2 = codes((m, k), torch.uint8, g), codes((k, n), torch.int8, g)
    z2v = torch.randint(-20, 21, (n,), generator=g) if per_channel else torch.tensor(z2)
    bias = torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int32)
    direct = (q1.to(torch.int64) - z1) @ (q2.to(torch.int64) - z2v) + bias.to(torch.int64)
    folded = gemm.quantized_matmul(q1, z1, q2, z2v if per_channel else z2, bias, backend)
    assert folded.dtype == torch.int32 and torch.equal(folded.to(torch.int64), direct)


def test_accumulator_bound_refuses_overflow():
    k_ok = (2**31 - 1) // (255 * 128)
    assert gemm.accumulator_bound(k_ok, torch.uint8, torch.int8, 0, 0) <= 2**31 - 1
    q1 = torch.zeros(1, k_ok + 1, dtype=torch.uint8)
    q2 = torch.zeros(k_ok + 1, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="could overflow the int32 accumulator"):
        gemm.quantized_matmul(q1, 0, q2, 0)
    gemm.quantized_matmul(q1[:, :k_ok], 0, q2[:k_ok], 0)  # one less is fine


def test_requantize_matches_fixed_point_and_real_arithmetic():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-200_000, 200_000, (50, 4), generator=g, dtype=torch.int32)
    reals = [0.0004, 0.0011, 0.00007, 0.0023]
    m0, shift = fp.quantize_multipliers(reals)
    out = gemm.requantize(acc, m0, shift, zero_point=10, qmin=0, qmax=255)
    assert out.dtype == torch.uint8
    expected = (fp.multiply_by_quantized_multiplier(acc, m0, shift) + 10).clamp(0, 255)
    assert torch.equal(out.to(torch.int32), expected)
    real = (acc.double() * torch.tensor(reals, dtype=torch.float64) + 10).round().clamp(0, 255)
    assert (out.double() - real).abs().max() <= 1


def test_relu_is_the_clamp():
    acc = torch.tensor([[-5000, -1, 0, 1, 5000]], dtype=torch.int32)
    m0, shift = fp.quantize_multiplier(0.01)
    relu = gemm.requantize(acc, m0, shift, zero_point=20, qmin=20, qmax=255)
    assert relu.tolist() == [[20, 20, 20, 20, 70]]


def test_bad_input():
    with pytest.raises(TypeError, match="a must hold uint8 or int8 codes"):
        gemm.integer_matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="a and b do not chain"):
        gemm.integer_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="backend must be one of"):
        gemm.integer_matmul(torch.zeros(2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8), "cuda")
    with pytest.raises(ValueError, match="q1 must be a 2-d matrix"):
        gemm.quantized_matmul(torch.zeros(2, dtype=torch.uint8), 0, torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="bias must be int32"):
        gemm.quantized_matmul(torch.zeros(1, 2, dtype=torch.uint8), 0, torch.zeros(2, 3, dtype=torch.int8),
                              bias=torch.zeros(3))
    with pytest.raises(ValueError, match="z2 must be a scalar or have one entry per column"):
        gemm.quantized_matmul(torch.zeros(1, 2, dtype=torch.uint8), 0, torch.zeros(2, 3, dtype=torch.int8),
                              z2=[1, 2])
    with pytest.raises(TypeError, match="acc must be an int32 torch tensor"):
        gemm.requantize(torch.zeros(2), 2**30, 0, 0, 0, 255)
    with pytest.raises(TypeError, match="must be a torch tensor or numpy array"):
        gemm.integer_matmul([[1]], [[1]])


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [(3, 1, 1, 1, 1), (3, 2, 0, 1, 2),
                                                                   ((2, 3), (1, 2), (1, 0), (2, 1), 1), (1, 1, 0, 1, 4)])
def test_im2col_is_the_convolution_as_a_matrix_product(kernel, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (2, 4, 7, 8), generator=g)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randint(-9, 9, (8, 4 // groups, *k), generator=g)
    columns, spatial = gemm.im2col(x, k, stride, padding, dilation, groups)
    assert columns.dtype == torch.int64
    per_group = 8 // groups
    out = torch.stack([w[gi * per_group:(gi + 1) * per_group].reshape(per_group, -1) @ columns[:, gi]
                       for gi in range(groups)], dim=1).reshape(2, 8, *spatial)
    expected = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    assert torch.equal(out.double(), expected)


def test_unfold_windows_pads_with_the_given_code_and_takes_pairs():
    x = torch.arange(6, dtype=torch.int64).reshape(1, 1, 6)
    windows = gemm.unfold_windows(x, 3, 3, padding=[(1, 2)], pad_value=7)
    assert windows.tolist() == [[[[7, 0, 1], [2, 3, 4], [5, 7, 7]]]]
    assert gemm.unfold_windows(x, 2, 2).shape == (1, 1, 3, 2)
