"""The compiled loops behind :mod:`qlib.engine.fused` (numba; imported on first use).

Defined at module level so that numba can cache their machine code on disk: the cache directory
is ``$NUMBA_CACHE_DIR``, which :mod:`qlib.engine.fused` points beside qlib's other caches before
this module is imported.
"""

import numpy as np
from numba import njit, prange

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@njit(inline="always")
def multiply(v, m0, left, right):
    """MultiplyByQuantizedMultiplier: the saturating left shift, the rounding doubling high multiply
    ``(v M0 + 2^30) >> 31``, then the rounding right shift with ties away from zero."""
    v = min(max(v << left, INT32_MIN), INT32_MAX)
    high = (v * m0 + (1 << 30)) >> 31
    offset = (np.int64(1) << right) >> 1
    fix = np.int64(-1) if right > 0 else np.int64(0)
    return (high + offset + ((high >> 63) & fix)) >> right


@njit(parallel=True, cache=True, nogil=True)
def requantize_rows(acc, bias_shift, bias, m0, left, right, zero_point, lo, hi, out):
    """``acc``, ``out``: ``(rows, channels, length)``; one multiplier and bias per channel."""
    rows, channels, length = acc.shape
    for i in prange(rows):
        for c in range(channels):
            b, m, sl, sr = bias[c], m0[c], left[c], right[c]
            for j in range(length):
                v = (np.int64(acc[i, c, j]) << bias_shift) + b
                y = multiply(v, m, sl, sr) + zero_point
                out[i, c, j] = min(max(y, lo), hi)


@njit(parallel=True, cache=True, nogil=True)
def requantize_rows_transposed(acc, bias_shift, bias, m0, left, right, zero_point, lo, hi, out):
    """``acc``: ``(rows, channels, length)``; ``out``: ``(rows, length, channels)`` (channels-last).

    Each row goes through a small buffer: storing the bytes straight into the transposed layout,
    ``channels`` bytes apart, measured 17 times slower than this."""
    rows, channels, length = acc.shape
    for i in prange(rows):
        row = np.empty((channels, length), dtype=out.dtype)
        for c in range(channels):
            b, m, sl, sr = bias[c], m0[c], left[c], right[c]
            for j in range(length):
                v = (np.int64(acc[i, c, j]) << bias_shift) + b
                y = multiply(v, m, sl, sr) + zero_point
                row[c, j] = min(max(y, lo), hi)
        for j in range(length):
            for c in range(channels):
                out[i, j, c] = row[c, j]


@njit(parallel=True, cache=True, nogil=True)
def centre_flat(codes, zero_point, out):
    for i in prange(codes.size):
        out[i] = np.float32(np.int32(codes[i]) - zero_point)


@njit(parallel=True, cache=True, nogil=True)
def add_flat(qa, qb, za, zb, shift, ma, a_left, a_right, mb, b_left, b_right, mo, o_left, o_right,
             zero_point, lo, hi, out):
    for i in prange(qa.size):
        xa = (np.int64(qa[i]) - za) << shift
        xb = (np.int64(qb[i]) - zb) << shift
        total = multiply(xa, ma, a_left, a_right) + multiply(xb, mb, b_left, b_right)
        y = multiply(total, mo, o_left, o_right) + zero_point
        out[i] = min(max(y, lo), hi)


@njit(parallel=True, cache=True, nogil=True)
def requantize_last(acc, bias_shift, bias, m0, left, right, zero_point, lo, hi, out):
    """``acc``, ``out``: ``(rows, channels)``, the channel last (a linear layer, or channels-last
    feature maps): the inner loop runs along the channels."""
    rows, channels = acc.shape
    for r in prange(rows):
        for c in range(channels):
            v = (np.int64(acc[r, c]) << bias_shift) + bias[c]
            y = multiply(v, m0[c], left[c], right[c]) + zero_point
            out[r, c] = min(max(y, lo), hi)
