"""The affine map r = S (q - Z) between real values and integer codes.

This is chapter 1 of the book. A real value ``r`` is represented by an integer code
``q`` in ``[qmin, qmax]`` through a positive real *scale* ``S`` and an integer
*zero-point* ``Z`` (Jacob et al. 2018, eq. 1)::

    q = clamp(round(r / S) + Z, qmin, qmax)        (quantize)
    r_hat = S (q - Z)                              (dequantize)

Conventions used throughout qlib:

* Rounding is round-half-to-even (what ``numpy.round`` and ``torch.round`` do, and
  what PyTorch's quantized kernels use).
* The real range is always widened to contain 0 and the zero-point is an integer,
  so the real value 0 is represented *exactly* (by the code ``Z``): zero padding and
  ReLU outputs lose nothing.
* ``scheme="asymmetric"``: ``S = (rmax - rmin) / (qmax - qmin)`` and
  ``Z = round(qmin - rmin / S)`` clamped to the code range ("nudging").
* ``scheme="symmetric"``: ``S = max(|rmin|, |rmax|) / ((qmax - qmin) / 2)``;
  ``Z = 0`` for signed codes and the middle code (128 for 8 bits) for unsigned ones.
  With ``narrow_range=True`` the signed codes are ``[-127, 127]`` for 8 bits, so the
  grid is exactly symmetric; the full range ``[-128, 127]`` follows PyTorch and maps
  ``+amax`` to 127.5, which clamps to 127.
* A scale is never below ``float32 eps`` (about 1.2e-7), as in PyTorch: an all-zero
  tensor gets that scale instead of a division by zero, and a tensor whose whole range is
  narrower than about ``eps * 2^bits`` is quantized with that step (mostly to zero).

Everything works on numpy arrays and torch tensors alike; per-channel parameters
apply along any ``axis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import check_axis, check_bits, check_bool, check_choice, check_float_array

__all__ = ["qrange", "QuantParams", "as_float64_numpy", "qparams_from_range", "scale_zero_point",
           "tensor_range", "qparams_from_tensor", "quantize", "dequantize", "fake_quantize",
           "quantization_mse", "sqnr_db", "SCHEMES", "SCALE_EPS"]

SCHEMES = ("asymmetric", "symmetric")
SCALE_EPS = float(np.finfo(np.float32).eps)


def qrange(bits: int = 8, signed: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """Return ``(qmin, qmax)``, the integer code range.

    Unsigned codes span ``[0, 2^b - 1]``, signed codes ``[-2^(b-1), 2^(b-1) - 1]``.
    ``narrow_range`` drops the lowest code (``[-127, 127]`` or ``[1, 255]`` for 8 bits).
    """
    bits = check_bits(bits)
    signed = check_bool(signed, "signed")
    narrow_range = check_bool(narrow_range, "narrow_range")
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return qmin + int(narrow_range), qmax


def _numpy_int_dtype(qmin: int, qmax: int):
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int32)


def _torch_int_dtype(qmin: int, qmax: int):
    for dtype in (torch.uint8, torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int32


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale, zero-point and code range of an affine quantizer.

    ``scale`` (float32) and ``zero_point`` (int32) are 0-d numpy arrays for a per-tensor
    quantizer and 1-d arrays of one entry per channel when ``axis`` is set.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int = 8
    signed: bool = False
    narrow_range: bool = False
    axis: int | None = None

    def __post_init__(self):
        qmin, qmax = qrange(self.bits, self.signed, self.narrow_range)
        scale = np.asarray(self.scale, dtype=np.float32)
        zero_point = np.asarray(self.zero_point)
        if not np.issubdtype(zero_point.dtype, np.integer):
            if not np.array_equal(zero_point, np.round(zero_point)):
                raise ValueError(f"zero_point must hold integers, got {zero_point}")
        zero_point = zero_point.astype(np.int32)
        if self.axis is None and (scale.ndim != 0 or zero_point.ndim != 0):
            raise ValueError("a per-tensor QuantParams (axis=None) needs scalar scale and zero_point")
        if self.axis is not None and (scale.ndim != 1 or scale.shape != zero_point.shape):
            raise ValueError("a per-channel QuantParams needs 1-d scale and zero_point of equal length, "
                             f"got shapes {scale.shape} and {zero_point.shape}")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if ((zero_point < qmin) | (zero_point > qmax)).any():
            raise ValueError(f"zero_point must lie in [{qmin}, {qmax}], got {zero_point}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def real_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The real values of the lowest and highest codes, i.e. the range the grid covers."""
        return (self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point))

    def levels(self) -> np.ndarray:
        """All representable real values (per-tensor parameters only), ascending."""
        if self.per_channel:
            raise ValueError("levels() is defined for per-tensor parameters; index a channel with channel(i)")
        codes = np.arange(self.qmin, self.qmax + 1, dtype=np.float64)
        return (float(self.scale) * (codes - int(self.zero_point))).astype(np.float32)

    def channel(self, index: int) -> QuantParams:
        """The per-tensor parameters of one channel of a per-channel quantizer."""
        if not self.per_channel:
            raise ValueError("channel() needs per-channel parameters (axis is None)")
        return QuantParams(self.scale[index], self.zero_point[index], self.bits, self.signed, self.narrow_range)

    def __repr__(self):
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis}, C={self.scale.size})"
        kind = "int" if self.signed else "uint"
        scale = float(self.scale) if self.axis is None else f"[{self.scale.min():.4g}..{self.scale.max():.4g}]"
        zp = int(self.zero_point) if self.axis is None else f"[{self.zero_point.min()}..{self.zero_point.max()}]"
        return (f"QuantParams({kind}{self.bits}{' narrow' if self.narrow_range else ''}, {where}, "
                f"scale={scale}, zero_point={zp})")


def as_float64_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a numpy array or torch tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _range_to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        value = np.asarray(value, dtype=np.float64)
    elif isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{name} must be real-valued, got numpy array of {value.dtype}")
        value = value.astype(np.float64)
    else:
        raise TypeError(f"{name} must be a number, a numpy array or a torch tensor, got {type(value).__name__}")
    if value.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(value).all():
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def qparams_from_range(rmin, rmax, bits: int = 8, scheme: str = "asymmetric", signed: bool = False,
                       narrow_range: bool = False, axis: int | None = None) -> QuantParams:
    """Choose scale and zero-point so that the grid covers ``[rmin, rmax]`` (widened to hold 0).

    Parameters
    ----------
    rmin, rmax : float or array
        The real range; 1-d arrays (one entry per channel) when ``axis`` is given.
    bits : int
        Code width, 2 to 16.
    scheme : str
        ``"asymmetric"`` or ``"symmetric"``; see the module docstring for the formulas.
    signed : bool
        Signed (``int``) or unsigned (``uint``) codes.
    narrow_range : bool
        Drop the lowest code, e.g. ``[-127, 127]`` for signed 8-bit weights.
    axis : int or None
        The channel axis of the tensors these parameters will quantize (``None``: per tensor).
    """
    check_choice(scheme, "scheme", SCHEMES)
    qmin, qmax = qrange(bits, signed, narrow_range)
    lo, hi = _range_to_numpy(rmin, "rmin"), _range_to_numpy(rmax, "rmax")
    if lo.shape != hi.shape:
        raise ValueError(f"rmin and rmax must have the same shape, got {lo.shape} and {hi.shape}")
    if axis is None and lo.ndim != 0:
        raise ValueError(f"per-tensor parameters (axis=None) need scalar rmin and rmax, got shape {lo.shape}")
    if axis is not None and lo.ndim != 1:
        raise ValueError(f"per-channel parameters (axis={axis}) need 1-d rmin and rmax, got shape {lo.shape}")
    if (lo > hi).any():
        raise ValueError(f"rmin must be <= rmax, got rmin={lo} and rmax={hi}")
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)

    if scheme == "asymmetric":
        scale = np.maximum((hi - lo) / (qmax - qmin), SCALE_EPS).astype(np.float32)
        zero_point = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax)
    else:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / ((qmax - qmin) / 2), SCALE_EPS).astype(np.float32)
        middle = 0 if signed else (qmin + qmax + 1) // 2
        zero_point = np.full(amax.shape, middle)
    return QuantParams(scale, zero_point.astype(np.int32), bits, signed, narrow_range, axis)


def scale_zero_point(rmin: torch.Tensor, rmax: torch.Tensor, bits: int = 8, scheme: str = "asymmetric",
                     signed: bool = False, narrow_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams_from_range` in torch, on the ranges' device: ``(scale, zero_point)`` tensors.

    The same formulas, computed in float64 with the scale rounded to float32, so the results equal
    :func:`qparams_from_range`'s bit for bit; for training, where the ranges live on the model's
    device and a trip through numpy every step would stall it. ``zero_point`` is returned as a
    float32 tensor holding integers (what fake quantization adds and subtracts).
    """
    check_choice(scheme, "scheme", SCHEMES)
    qmin, qmax = qrange(bits, signed, narrow_range)
    lo, hi = rmin.detach().double().clamp(max=0.0), rmax.detach().double().clamp(min=0.0)
    if scheme == "asymmetric":
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_EPS).float()
        zero_point = torch.clamp(torch.round(qmin - lo / scale.double()), qmin, qmax)
    else:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=SCALE_EPS).float()
        zero_point = torch.full_like(lo, 0 if signed else (qmin + qmax + 1) // 2)
    return scale, zero_point.float()


def tensor_range(x, axis: int | None = None):
    """``(min, max)`` of ``x`` over everything (``axis=None``) or over all but ``axis``.

    Returns numpy float64 scalars or 1-d arrays (one entry per channel).
    """
    check_float_array(x, "x", allow_empty=False)
    axis = check_axis(axis, x.ndim)
    x = as_float64_numpy(x)
    if axis is None:
        return np.float64(x.min()), np.float64(x.max())
    flat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    return flat.min(axis=1), flat.max(axis=1)


def qparams_from_tensor(x, bits: int = 8, scheme: str = "asymmetric", signed: bool = False,
                        narrow_range: bool = False, axis: int | None = None) -> QuantParams:
    """Min-max parameters for ``x`` (per tensor, or per channel along ``axis``)."""
    rmin, rmax = tensor_range(x, axis)
    return qparams_from_range(rmin, rmax, bits, scheme, signed, narrow_range,
                              None if axis is None else axis % x.ndim)


def _broadcast(qp: QuantParams, x):
    """Scale and zero-point shaped to broadcast against ``x``, in ``x``'s library and dtype."""
    if qp.axis is None:
        shape = ()
    else:
        if qp.axis >= x.ndim or x.shape[qp.axis] != qp.scale.size:
            raise ValueError(f"per-channel parameters with {qp.scale.size} channels on axis {qp.axis} "
                             f"do not fit an input of shape {tuple(x.shape)}")
        shape = [1] * x.ndim
        shape[qp.axis] = qp.scale.size
    scale, zero_point = qp.scale.reshape(shape), qp.zero_point.reshape(shape)
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        return (torch.as_tensor(scale, dtype=dtype, device=x.device),
                torch.as_tensor(zero_point, dtype=torch.int32, device=x.device))
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return scale.astype(dtype), zero_point


def _check_qparams(qp):
    if not isinstance(qp, QuantParams):
        raise TypeError(f"qparams must be a QuantParams, got {type(qp).__name__}")


def quantize(x, qparams: QuantParams):
    """Real values to integer codes: ``clamp(round(x / S) + Z, qmin, qmax)``.

    Returns the smallest integer dtype that holds the code range (uint8 for unsigned
    8-bit codes, int8 for signed ones), as a numpy array or a torch tensor like ``x``.
    """
    _check_qparams(qparams)
    check_float_array(x, "x")
    scale, zero_point = _broadcast(qparams, x)
    if isinstance(x, torch.Tensor):
        codes = torch.clamp(torch.round(x / scale) + zero_point.to(x.dtype), qparams.qmin, qparams.qmax)
        return codes.to(_torch_int_dtype(qparams.qmin, qparams.qmax))
    codes = np.clip(np.round(x / scale) + zero_point, qparams.qmin, qparams.qmax)
    return codes.astype(_numpy_int_dtype(qparams.qmin, qparams.qmax))


def dequantize(q, qparams: QuantParams):
    """Integer codes to real values: ``S (q - Z)``, as float32."""
    _check_qparams(qparams)
    if isinstance(q, torch.Tensor):
        if torch.is_floating_point(q) or q.dtype == torch.bool or torch.is_complex(q):
            raise TypeError(f"q must hold integer codes, got torch tensor of {q.dtype}")
        out_of_range = q.numel() and (int(q.min()) < qparams.qmin or int(q.max()) > qparams.qmax)
    elif isinstance(q, np.ndarray):
        if not np.issubdtype(q.dtype, np.integer):
            raise TypeError(f"q must hold integer codes, got numpy array of {q.dtype}")
        out_of_range = q.size and (int(q.min()) < qparams.qmin or int(q.max()) > qparams.qmax)
    else:
        raise TypeError(f"q must be a numpy array or a torch tensor, got {type(q).__name__}")
    if out_of_range:
        raise ValueError(f"q holds codes outside [{qparams.qmin}, {qparams.qmax}]")
    scale, zero_point = _broadcast(qparams, q)
    if isinstance(q, torch.Tensor):
        return (q.to(torch.int32) - zero_point).to(torch.float32) * scale.to(torch.float32)
    return (q.astype(np.int32) - zero_point).astype(np.float32) * scale.astype(np.float32)


def fake_quantize(x, qparams: QuantParams):
    """Quantize then dequantize, staying in ``x``'s floating dtype: the value the grid gives ``x``."""
    _check_qparams(qparams)
    check_float_array(x, "x")
    scale, zero_point = _broadcast(qparams, x)
    if isinstance(x, torch.Tensor):
        zero_point = zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + zero_point, qparams.qmin, qparams.qmax) - zero_point) * scale
    codes = np.clip(np.round(x / scale) + zero_point, qparams.qmin, qparams.qmax)
    return ((codes - zero_point) * scale).astype(x.dtype, copy=False)


def quantization_mse(x, qparams: QuantParams) -> float:
    """Mean squared error between ``x`` and its fake-quantized version."""
    xq = fake_quantize(x, qparams)
    if isinstance(x, torch.Tensor):
        return float(((xq - x).double() ** 2).mean())
    return float(((xq.astype(np.float64) - x) ** 2).mean())


def sqnr_db(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    Infinite when ``x_hat`` equals ``x`` exactly.
    """
    check_float_array(x, "x", allow_empty=False)
    check_float_array(x_hat, "x_hat", allow_empty=False)
    a, b = as_float64_numpy(x), as_float64_numpy(x_hat)
    if a.shape != b.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {a.shape} and {b.shape}")
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
