"""Integer matrix multiplication with zero-points, int32 accumulation and requantization.

Chapter 3 of the book. With ``r1 = S1 (q1 - Z1)``, ``r2 = S2 (q2 - Z2)`` and the product
``r3 = r1 r2 = S3 (q3 - Z3)``, Jacob et al. (2018) write (eqs. 4, 7, 8)::

    q3[i,k] = Z3 + M * sum_j (q1[i,j] - Z1) (q2[j,k] - Z2),          M = S1 S2 / S3
            = Z3 + M * ( sum_j q1[i,j] q2[j,k]                      (the core integer GEMM)
                         - Z2 a1[i] - Z1 a2[k] + N Z1 Z2 ),         a1 = row sums of q1,
                                                                     a2 = column sums of q2

so the zero-points cost O(N^2) extra work (row and column sums) instead of 2 N^3
subtractions inside the inner loop. A bias enters the int32 accumulator with scale S1 S2 and
zero-point 0. The accumulator is then requantized with the fixed-point multiplier of
:mod:`qlib.fixedpoint`, offset by Z3 and clamped to the output code range, which is also
where a ReLU or ReLU6 disappears.

The core product ``q1 @ q2`` has several exact backends (``BACKENDS``):

* ``"float32"``: float BLAS over the integer values, split along ``K`` so that every
  partial sum stays below 2^24 (every float32 integer up to 2^24 is exact, so the result is
  the exact integer). Fast, because it is the BLAS everyone tunes.
* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32); uint8 operands are centred by
  -128 first and the shift is folded back with the same row/column-sum trick. Integer dtypes
  throughout.
* ``"int64"``: a plain int64 ``matmul``, the reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._checks import check_choice
from .fixedpoint import INT32_MAX, multiply_by_quantized_multiplier

__all__ = ["integer_matmul", "accumulator_bound", "quantized_matmul", "requantize", "unfold_windows",
           "im2col", "BACKENDS", "FLOAT32_EXACT"]

#: The exact backends of :func:`integer_matmul`.
BACKENDS = ("float32", "int_mm", "int64")
FLOAT32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32


def _check_code_matrix(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array of uint8/int8 codes, got {type(x).__name__}")
    if x.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold uint8 or int8 codes, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d matrix, got shape {tuple(x.shape)}")
    return x


def _code_bound(dtype) -> int:
    return 255 if dtype == torch.uint8 else 128


def integer_matmul(a, b, backend: str = "float32") -> torch.Tensor:
    """The exact integer product ``a @ b`` of uint8/int8 matrices, as int64.

    Every backend returns the same numbers; only the speed differs (see the module docstring).
    """
    a, b = _check_code_matrix(a, "a"), _check_code_matrix(b, "b")
    check_choice(backend, "backend", BACKENDS)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a and b do not chain: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if backend == "int64":
        return a.to(torch.int64) @ b.to(torch.int64)
    if backend == "int_mm":
        return _int_mm_product(a, b)
    return _float32_product(a, b)


def _float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    chunk = max(1, (FLOAT32_EXACT - 1) // (_code_bound(a.dtype) * _code_bound(b.dtype)))
    af, bf = a.to(torch.float32), b.to(torch.float32)
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for start in range(0, k, chunk):  # each partial sum < 2^24: exact in float32
        total += (af[:, start:start + chunk] @ bf[start:start + chunk]).to(torch.int64)
    return total


def _int_mm_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # _int_mm wants int8 x int8. Centre uint8 operands: a = ac + ca with ca = 128, and
    # (ac + ca)(bc + cb) = ac bc + cb rowsum(ac) + ca colsum(bc) + K ca cb.
    ca = 128 if a.dtype == torch.uint8 else 0
    cb = 128 if b.dtype == torch.uint8 else 0
    ac = (a.to(torch.int16) - ca).to(torch.int8)
    bc = (b.to(torch.int16) - cb).to(torch.int8)
    core = torch._int_mm(ac, bc).to(torch.int64)  # |partial sums| <= K * 2^14: exact in int32 for K <= 2^17
    if ca or cb:
        core = (core + cb * ac.to(torch.int64).sum(1, keepdim=True) + ca * bc.to(torch.int64).sum(0, keepdim=True)
                + a.shape[1] * ca * cb)
    return core


def accumulator_bound(k: int, a_dtype, b_dtype, a_zero_point: int = 0, b_zero_point=0, bias_bound: int = 0) -> int:
    """The largest possible ``|sum_j (q1 - Z1)(q2 - Z2) + bias|`` for codes of the given dtypes."""
    def span(dtype, zero_point):
        lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
        z = np.asarray(zero_point, dtype=np.int64)
        return int(np.max(np.maximum(np.abs(lo - z), np.abs(hi - z))))
    return k * span(a_dtype, a_zero_point) * span(b_dtype, b_zero_point) + int(bias_bound)


def quantized_matmul(q1, z1: int, q2, z2=0, bias=None, backend: str = "float32") -> torch.Tensor:
    """The int32 accumulator ``sum_j (q1[i,j] - Z1)(q2[j,k] - Z2) + bias[k]`` via eq. (8).

    ``q1`` is ``(M, K)``, ``q2`` is ``(K, N)`` (uint8 or int8 codes); ``z2`` may be a scalar or one
    zero-point per output column; ``bias`` is int32 of shape ``(N,)`` with scale ``S1 S2``.
    Raises ``ValueError`` when the worst case could overflow int32 (K too large).
    """
    q1, q2 = _check_code_matrix(q1, "q1"), _check_code_matrix(q2, "q2")
    k = q1.shape[1]
    z2 = torch.as_tensor(z2, dtype=torch.int64).reshape(-1)
    if z2.numel() not in (1, q2.shape[1]):
        raise ValueError(f"z2 must be a scalar or have one entry per column of q2 ({q2.shape[1]}), got {z2.numel()}")
    bias_bound = 0
    if bias is not None:
        bias = torch.as_tensor(bias)
        if bias.dtype != torch.int32:
            raise TypeError(f"bias must be int32 (scale S1*S2, zero-point 0), got {bias.dtype}")
        if bias.shape != (q2.shape[1],):
            raise ValueError(f"bias must have shape ({q2.shape[1]},), got {tuple(bias.shape)}")
        bias_bound = int(bias.abs().max()) if bias.numel() else 0
    bound = accumulator_bound(k, q1.dtype, q2.dtype, int(z1), z2.numpy(), bias_bound)
    if bound > INT32_MAX:
        raise ValueError(f"K={k} could overflow the int32 accumulator (worst case {bound} > 2^31 - 1); "
                         "split the product along K and requantize the parts")
    acc = integer_matmul(q1, q2, backend)
    row_sums = q1.to(torch.int64).sum(1, keepdim=True)            # a1[i]
    col_sums = q2.to(torch.int64).sum(0, keepdim=True)            # a2[k]
    acc = acc - z2 * row_sums - int(z1) * col_sums + k * int(z1) * z2
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return acc.to(torch.int32)


def requantize(acc, multiplier, shift, zero_point: int, qmin: int, qmax: int, dtype=torch.uint8) -> torch.Tensor:
    """int32 accumulator -> output codes: ``clamp(Z3 + MBQM(acc, M0, shift), qmin, qmax)``.

    ``multiplier``/``shift`` may be per-channel (broadcast along the last axis, or shaped to
    broadcast). A fused ReLU is ``qmin = Z3``; a fused ReLU6 also lowers ``qmax`` to
    ``Z3 + round(6 / S3)``.
    """
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32:
        raise TypeError("acc must be an int32 torch tensor (the accumulator)")
    scaled = multiply_by_quantized_multiplier(acc, multiplier, shift)
    return (scaled + int(zero_point)).clamp(int(qmin), int(qmax)).to(dtype)


def unfold_windows(x: torch.Tensor, kernel, stride, padding=0, dilation=1, pad_value: int = 0) -> torch.Tensor:
    """The sliding windows of ``x`` (``(N, C, *spatial)``) as trailing dimensions: ``(N, C, *out, *kernel)``.

    ``kernel``, ``stride``, ``dilation``: an int or one per spatial dimension; ``padding``: an int,
    one per dimension, or one ``(before, after)`` pair per dimension, filled with ``pad_value``.
    Works on integer tensors too (``Tensor.unfold``; ``F.unfold`` takes floats only), which is what
    the integer engine's convolutions (im2col), its pooling and the shift-add layer all build on.
    """
    dims = x.ndim - 2

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    kernel, stride, dilation, padding = per_dim(kernel), per_dim(stride), per_dim(dilation), per_dim(padding)
    pairs = [p if isinstance(p, (tuple, list)) else (p, p) for p in padding]
    pad = [side for pair in reversed(pairs) for side in pair]
    if any(pad):
        x = torch.nn.functional.pad(x, pad, value=pad_value)
    for d in range(dims):
        x = x.unfold(2 + d, (kernel[d] - 1) * dilation[d] + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., ::dilation[d]]
    return x


def im2col(x: torch.Tensor, kernel, stride, padding=0, dilation=1, groups: int = 1,
           pad_value: int = 0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A convolution's input as matrices: ``(N, groups, C / groups * prod(kernel), L)`` and the output's
    spatial shape (``L`` its size), so that ``W_g @ columns`` is the convolution of group ``g``.

    Rows are ordered channel-major, then kernel position, as ``weight[g].reshape(out, -1)`` is.
    """
    windows = unfold_windows(x, kernel, stride, padding, dilation, pad_value)
    n, dims = x.shape[0], x.ndim - 2
    spatial = tuple(windows.shape[2:2 + dims])
    # (N, C, *out, *kernel) -> (N, C, *kernel, *out) -> (N, groups, C / groups * kernel, L)
    windows = windows.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return windows.reshape(n, groups, -1, math.prod(spatial)), spatial
