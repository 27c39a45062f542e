"""Fixed-point requantization: multiplying an int32 by a real number with integers only.

This is the arithmetic of Jacob et al. (2018), eqs. (5)-(6), as gemmlowp's ``fixedpoint.h``
and TensorFlow Lite define it. A real multiplier ``M > 0`` (in practice
``M = S1 S2 / S3 < 1``) is stored as a Q31 integer ``M0`` and a power-of-two exponent::

    M = M0 * 2^(shift - 31),     M0 in [2^30, 2^31)   (i.e. M0 / 2^31 in [0.5, 1))

**Sign convention of** ``shift``: it is the exponent of ``M`` after normalising the mantissa
into ``[0.5, 1)``, as ``math.frexp`` returns it. ``shift <= 0`` means a *right* shift by
``n = -shift`` bits (the paper's ``M = 2^-n M0``); ``shift > 0`` a left shift (``M >= 1``).

Applying it to an integer ``x`` takes two roundings, exactly as integer-only runtimes do:

1. :func:`saturating_rounding_doubling_high_mul` ``(x, M0)``: the high 32 bits of ``2 x M0``,
   i.e. ``x * M0 / 2^31`` rounded to nearest with ties rounded *up* (toward +inf); the one
   overflowing case, ``INT32_MIN * INT32_MIN``, saturates to ``INT32_MAX``;
2. :func:`rounding_divide_by_pot` ``(y, n)``: ``y / 2^n`` rounded to nearest with ties away
   from zero.

:func:`multiply_by_quantized_multiplier` chains them (with a saturating left shift first when
``shift > 0``). Every function works elementwise on numpy integer arrays and torch integer
tensors (and broadcasts a per-channel ``M0``/``shift``); intermediates are int64, so nothing
overflows along the way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._checks import check_int

__all__ = ["quantize_multiplier", "quantize_multipliers", "saturating_rounding_doubling_high_mul",
           "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "FixedPointMultiplier", "INT32_MIN",
           "INT32_MAX", "MIN_SHIFT", "MAX_SHIFT"]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
MIN_SHIFT = -31
MAX_SHIFT = 30


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Represent ``real > 0`` as ``(M0, shift)`` with ``real ~= M0 * 2^(shift - 31)``.

    ``M0 = round(q * 2^31)`` for the mantissa ``q`` in ``[0.5, 1)`` (round half away from zero,
    like ``std::round``); if rounding reaches ``2^31`` the mantissa is renormalised to ``2^30``
    and ``shift`` grows by one. Supported: ``2^-32 <= real < 2^30`` (``shift`` in [-31, 30]).
    """
    if isinstance(real, bool) or not isinstance(real, (int, float, np.floating, np.integer)):
        raise TypeError(f"real must be a real number, got {type(real).__name__}")
    real = float(real)
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"real must be finite and > 0, got {real}")
    mantissa, shift = math.frexp(real)  # real = mantissa * 2^shift, mantissa in [0.5, 1)
    m0 = math.floor(mantissa * 2**31 + 0.5)  # exact: mantissa * 2^31 is a double with <= 53 bits
    if m0 == 2**31:
        m0, shift = 2**30, shift + 1
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise ValueError(f"real must be in [2^-32, 2^30) to be a quantized multiplier, got {real!r} "
                         f"(shift {shift} outside [{MIN_SHIFT}, {MAX_SHIFT}])")
    return int(m0), int(shift)


def quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` for each entry of a 1-d array (per-channel multipliers)."""
    reals = np.asarray(reals, dtype=np.float64).reshape(-1)
    pairs = [quantize_multiplier(float(r)) for r in reals]
    return (np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32))


# ---------------------------------------------------------------- backends -----------------

def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _as_int64(x, name: str):
    """Check that ``x`` holds int32-range integers and widen it to int64 (numpy or torch)."""
    if _is_torch(x):
        if torch.is_floating_point(x) or torch.is_complex(x) or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        wide = x.to(torch.int64)
        if wide.numel() and (int(wide.min()) < INT32_MIN or int(wide.max()) > INT32_MAX):
            raise ValueError(f"{name} holds values outside the int32 range")
        return wide
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy integer array or a torch integer tensor, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    wide = x.astype(np.int64)
    if wide.size and (wide.min() < INT32_MIN or wide.max() > INT32_MAX):
        raise ValueError(f"{name} holds values outside the int32 range")
    return wide


def _like(value, reference):
    """``value`` (array-like of int64) in the library of ``reference``."""
    if _is_torch(reference):
        return torch.as_tensor(np.asarray(value, dtype=np.int64) if not _is_torch(value) else value,
                               dtype=torch.int64, device=reference.device)
    return np.asarray(value.cpu().numpy() if _is_torch(value) else value, dtype=np.int64)


def _to_int32(x):
    return x.to(torch.int32) if _is_torch(x) else x.astype(np.int32)


def _where(cond, a, b):
    return torch.where(cond, a, b) if _is_torch(cond) else np.where(cond, a, b)


def _trunc_div_pow2_31(x):
    """``x / 2^31`` truncated toward zero (C integer division), for int64 ``x``."""
    # An arithmetic shift floors; adding 2^31 - 1 to negative numbers first makes it truncate.
    bias = (x >> 63) & (2**31 - 1)
    return (x + bias) >> 31


# ---------------------------------------------------------------- primitives ---------------

def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``(2 a b + 2^31) >> 32``, done exactly.

    For int32 ``a`` and ``b``: ``a * b / 2^31`` rounded to the nearest integer, ties toward
    +inf (the nudge is ``2^30`` for a non-negative product and ``1 - 2^30`` for a negative
    one, then C division truncates toward zero). ``a = b = INT32_MIN`` saturates to
    ``INT32_MAX``. Returns int32, broadcasting ``a`` against ``b``.
    """
    a64 = _as_int64(a, "a")
    b64 = _like(_as_int64(b, "b"), a64)  # b follows a's library
    product = a64 * b64  # |a b| <= 2^62: no overflow in int64
    nudge = _where(product >= 0, _like(1 << 30, product), _like(1 - (1 << 30), product))
    high = _trunc_div_pow2_31(product + nudge)
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return _to_int32(_where(overflow, _like(INT32_MAX, high), high))


def rounding_divide_by_pot(x, exponent):
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``exponent`` is an int (or an integer array broadcasting against ``x``) in [0, 31].
    Returns int32.
    """
    x64 = _as_int64(x, "x")
    if isinstance(exponent, (int, np.integer)) and not isinstance(exponent, bool):
        e = check_int(exponent, "exponent", 0, 31)
        e = _like(e, x64)
    else:
        e = _like(_as_int64(exponent, "exponent"), x64)
        if e.numel() if _is_torch(e) else e.size:
            if int(e.min()) < 0 or int(e.max()) > 31:
                raise ValueError("exponent must be in [0, 31]")
    one = _like(1, x64)
    mask = (one << e) - 1
    remainder = x64 & mask
    negative = (x64 < 0).to(torch.int64) if _is_torch(x64) else (x64 < 0).astype(np.int64)
    threshold = (mask >> 1) + negative
    return _to_int32((x64 >> e) + (remainder > threshold))


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """``x * M0 * 2^(shift - 31)`` in integers, TensorFlow Lite's ``MultiplyByQuantizedMultiplier``.

    ``shift > 0``: saturating left shift of ``x`` by ``shift`` bits, then the high multiply.
    ``shift <= 0``: the high multiply, then a rounding right shift by ``-shift`` bits.
    ``multiplier`` must be a Q31 mantissa in ``[2^30, 2^31)`` (as :func:`quantize_multiplier`
    returns) and ``shift`` in [-31, 30]; both may be per-channel arrays that broadcast
    against ``x``. Returns int32 (the same numbers as chaining
    :func:`saturating_rounding_doubling_high_mul` and :func:`rounding_divide_by_pot`).
    """
    x64 = _as_int64(x, "x")
    m = _like(_as_int64(multiplier, "multiplier"), x64)
    s = _like(_as_int64(shift, "shift"), x64)
    size = m.numel() if _is_torch(m) else m.size
    if size and (int(m.min()) < 2**30 or int(m.max()) > INT32_MAX):
        raise ValueError("multiplier must be a Q31 mantissa in [2^30, 2^31); use quantize_multiplier()")
    size = s.numel() if _is_torch(s) else s.size
    if size and (int(s.min()) < MIN_SHIFT or int(s.max()) > MAX_SHIFT):
        raise ValueError(f"shift must be in [{MIN_SHIFT}, {MAX_SHIFT}]")
    return _to_int32(FixedPointMultiplier(m, s).apply_unchecked(x64))


class FixedPointMultiplier:
    """Precomputed ``(M0, shift)`` pairs (one, or one per channel) applied with few integer operations.

    The two roundings of :func:`multiply_by_quantized_multiplier` have closed forms that need
    no branches, which is what makes them cheap on whole tensors:

    * ``SaturatingRoundingDoublingHighMul(v, M0) = (v * M0 + 2^30) >> 31`` (arithmetic shift;
      the saturating case needs ``M0 = INT32_MIN`` and cannot occur with ``M0 >= 2^30``);
    * ``RoundingDivideByPOT(h, n) = (h + 2^(n-1) + (h >> 63)) >> n`` for ``n >= 1`` (``h >> 63``
      is -1 for negative ``h``, which turns the tie rule from "up" into "away from zero"), and
      ``h`` itself for ``n = 0``.

    The tests check both identities against the literal gemmlowp definitions.
    """

    def __init__(self, multiplier, shift):
        self.multiplier = multiplier
        self.left = shift.clamp(min=0) if _is_torch(shift) else np.maximum(shift, 0)
        self.right = (-shift).clamp(min=0) if _is_torch(shift) else np.maximum(-shift, 0)
        self.offset = (_like(1, self.right) << self.right) >> 1  # 2^(n-1), or 0 for n = 0
        self.negative_fix = -(self.offset > 0).to(torch.int64) if _is_torch(shift) else -(self.offset > 0).astype(
            np.int64)  # -1 where n >= 1: "h >> 63" applies only when there is something to round
        self.any_left = bool((self.left > 0).any())

    @classmethod
    def from_reals(cls, reals, shape=(-1,)) -> FixedPointMultiplier:
        """Quantize real multipliers (a float or 1-d array) into torch int64 tensors shaped ``shape``."""
        m0, shift = quantize_multipliers(np.atleast_1d(np.asarray(reals, dtype=np.float64)))
        return cls(torch.from_numpy(m0.astype(np.int64)).reshape(shape),
                   torch.from_numpy(shift.astype(np.int64)).reshape(shape))

    def apply_unchecked(self, x64):
        """``x64`` (int64, int32-range values) times the multiplier; int64 result in the int32 range."""
        if self.any_left:
            x64 = x64 << self.left
            x64 = x64.clamp(INT32_MIN, INT32_MAX) if _is_torch(x64) else np.clip(x64, INT32_MIN, INT32_MAX)
        high = (x64 * self.multiplier + (1 << 30)) >> 31
        return (high + self.offset + ((high >> 63) & self.negative_fix)) >> self.right

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to an int32 torch tensor (e.g. an accumulator); returns int32."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            raise TypeError("x must be an int32 torch tensor")
        return self.apply_unchecked(x.to(torch.int64)).to(torch.int32)
