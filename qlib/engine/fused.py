"""The engine's fast route (``backend="fast"``): every elementwise integer step in one compiled loop.

The readable route (``backend="float32"``, the one the book teaches) requantizes an accumulator
with more than a dozen whole-tensor operations on int64 tensors (the widening cast, the bias
shift, the bias, the high multiply, its nudge and shift, the rounding offset and sign fix, the
rounding shift, the zero-point, the clamp, the narrowing cast), each reading and writing eight
bytes per element. The loops here do the same integer arithmetic one element at a time, reading
the accumulator once and writing one byte per code, compiled by numba and spread over the cores
with ``prange``:

* :func:`requantize` / :class:`FusedRequantizer`: accumulator (float32 holding exact integers,
  int32, int64 or codes) -> shift by ``bias_shift`` -> + bias -> gemmlowp's
  ``MultiplyByQuantizedMultiplier`` per channel -> + zero-point -> clamp -> uint8/int8 codes.
  Feature maps ``(N, C, H, W)`` come out channels-last, the layout the fast route keeps;
* :func:`centre`: codes -> ``q - Z`` as float32, the input of the float32 convolution kernels;
* :func:`add`: TensorFlow Lite's residual add (:class:`~qlib.engine.IntAdd`) in one pass.

Every loop gives the readable route's codes bit for bit (the tests check it with hypothesis over
accumulators, multipliers, shifts and zero-points up to the int32 extremes). The multiply uses
the closed forms of :class:`qlib.fixedpoint.FixedPointMultiplier`. The layers' sums on the fast
route are in :class:`qlib.engine.IntLayer` (``fast_route``): ``torch._int_mm`` on the int8 codes
where the codes already are the GEMM's rows, PyTorch's float32 kernels elsewhere.

numba is imported on first use; the compiled loops are cached on disk (``$NUMBA_CACHE_DIR``, by
default beside qlib's other caches), so only the first run on a machine pays for compiling them.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from .._cache import cache_dir

__all__ = ["requantize", "centre", "add", "FusedRequantizer"]

_kernels = None
_lock = threading.Lock()


def _build():
    """Import numba and the loops (once per process), with the disk cache beside qlib's."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))
    import numba

    if not numba.config.CACHE_DIR:   # numba was imported before the variable was set
        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    from . import _loops as loops

    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return {"requantize_rows": loops.requantize_rows, "requantize_last": loops.requantize_last,
            "requantize_rows_transposed": loops.requantize_rows_transposed,
            "centre": loops.centre_flat, "add": loops.add_flat}


def _loops():
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels = _build()
    return _kernels


def _check_cpu(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: the fast route runs on the CPU (use backend='float32')")


def _multiplier_arrays(multiplier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(M0, left shift, right shift)`` of a :class:`~qlib.fixedpoint.FixedPointMultiplier` as int64."""
    as_array = lambda t: np.ascontiguousarray(np.asarray(t, dtype=np.int64).reshape(-1))  # noqa: E731
    return as_array(multiplier.multiplier), as_array(multiplier.left), as_array(multiplier.right)


class FusedRequantizer:
    """The epilogue of one layer, precomputed for :func:`requantize`.

    ``multiplier``: a :class:`~qlib.fixedpoint.FixedPointMultiplier` (one, or one per channel);
    ``bias``: int32/int64 codes per channel (or ``None``); ``bias_shift``: the left shift of the
    accumulator before the bias (0 to 16); ``zero_point``, ``lo``, ``hi``: the output grid and its
    fused clamp; ``dtype``: ``torch.uint8`` or ``torch.int8``.
    """

    def __init__(self, multiplier, bias, bias_shift: int, zero_point: int, lo: int, hi: int, dtype):
        if dtype not in (torch.uint8, torch.int8):
            raise TypeError(f"dtype must be torch.uint8 or torch.int8, got {dtype}")
        self.m0, self.left, self.right = _multiplier_arrays(multiplier)
        channels = len(self.m0)
        bias = np.zeros(channels, np.int64) if bias is None else np.asarray(bias, dtype=np.int64).reshape(-1)
        if len(bias) != channels:
            if channels != 1:
                raise ValueError(f"bias has {len(bias)} entries for {channels} multipliers")
            self.m0, self.left, self.right = (np.repeat(a, len(bias)) for a in (self.m0, self.left, self.right))
        self.bias = np.ascontiguousarray(bias)
        if not 0 <= int(bias_shift) <= 30:
            raise ValueError(f"bias_shift must be in [0, 30], got {bias_shift}")
        self.bias_shift, self.zero_point, self.lo, self.hi = int(bias_shift), int(zero_point), int(lo), int(hi)
        self.dtype = dtype

    @property
    def channels(self) -> int:
        return len(self.m0)

    def __call__(self, acc: torch.Tensor) -> torch.Tensor:
        """Accumulator ``(N, C, ...)`` or ``(N, C)`` -> codes of the same shape.

        Feature maps ``(N, C, H, W)`` come out channels-last (the layout in which PyTorch's float
        convolutions run fastest), whatever the accumulator's layout; other shapes keep theirs.
        """
        _check_cpu(acc, "acc")
        if acc.dtype not in (torch.float32, torch.int32, torch.int64, torch.uint8, torch.int8):
            raise TypeError(f"acc must be float32 (exact integers), int32, int64 or 8-bit codes, got {acc.dtype}")
        if acc.ndim < 1:
            raise ValueError("acc must have at least one dimension")
        loops = _loops()
        args = (self.bias_shift, self.bias, self.m0, self.left, self.right, self.zero_point, self.lo, self.hi)
        if self.channels == 1:                     # one multiplier: any layout, element by element
            if not (acc.is_contiguous() or _is_channels_last(acc)):
                acc = acc.contiguous()
            out = torch.empty_like(acc, dtype=self.dtype)
            flat_in, flat_out = _flat(acc), _flat(out)
            loops["requantize_last"](flat_in.reshape(-1, 1), *args, flat_out.reshape(-1, 1))
            return out
        if acc.ndim < 2 or acc.shape[1] != self.channels:
            raise ValueError(f"acc must be (N, {self.channels}, ...) for {self.channels} channels, "
                             f"got shape {tuple(acc.shape)}")
        if acc.ndim == 2:
            out = torch.empty(acc.shape, dtype=self.dtype)
            loops["requantize_last"](acc.contiguous().numpy(), *args, out.numpy())
            return out
        if _is_channels_last(acc):
            out = _empty_channels_last(acc.shape, self.dtype)
            loops["requantize_last"](_channels_last_rows(acc), *args, _channels_last_rows(out))
            return out
        rows = acc.contiguous().numpy().reshape(acc.shape[0], self.channels, -1)
        if acc.ndim == 4:   # (N, C, H, W) in, channels-last out
            out = _empty_channels_last(acc.shape, self.dtype)
            loops["requantize_rows_transposed"](rows, *args, _channels_last_rows(out).reshape(
                acc.shape[0], -1, self.channels))
        else:
            out = torch.empty(acc.shape, dtype=self.dtype)
            loops["requantize_rows"](rows, *args, out.numpy().reshape(rows.shape))
        return out


def _is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``(N, C, *spatial)`` is stored as ``(N, *spatial, C)`` (and is not also contiguous)."""
    return t.ndim >= 3 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def _empty_channels_last(shape, dtype) -> torch.Tensor:
    return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype).movedim(-1, 1)


def _channels_last_rows(t: torch.Tensor) -> np.ndarray:
    """A channels-last ``(N, C, *spatial)`` tensor's memory as an ``(N * spatial, C)`` array (no copy)."""
    return t.movedim(1, -1).numpy().reshape(-1, t.shape[1])


def _flat(t: torch.Tensor) -> np.ndarray:
    """The elements of a dense tensor in memory order (no copy for contiguous or channels-last)."""
    if _is_channels_last(t):
        return t.movedim(1, -1).numpy().reshape(-1)
    if not t.is_contiguous():
        raise ValueError("expected a contiguous or channels-last tensor")
    return t.numpy().reshape(-1)


def requantize(acc: torch.Tensor, multiplier, bias=None, bias_shift: int = 0, zero_point: int = 0,
               lo: int = 0, hi: int = 255, dtype=torch.uint8) -> torch.Tensor:
    """``clamp(Z + MBQM(2^k acc + bias), lo, hi)`` in one pass (see :class:`FusedRequantizer`)."""
    return FusedRequantizer(multiplier, bias, bias_shift, zero_point, lo, hi, dtype)(acc)


def centre(codes: torch.Tensor, zero_point: int) -> torch.Tensor:
    """``codes - zero_point`` as float32 (exact), in one pass."""
    _check_cpu(codes, "codes")
    if codes.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"codes must be uint8 or int8, got {codes.dtype}")
    if not (codes.is_contiguous() or _is_channels_last(codes)):
        codes = codes.contiguous()
    out = torch.empty_like(codes, dtype=torch.float32)       # the same layout
    _loops()["centre"](_flat(codes), int(zero_point), _flat(out))
    return out


def add(qa: torch.Tensor, qb: torch.Tensor, za: int, zb: int, left_shift: int, ma, mb, mo,
        zero_point: int, lo: int, hi: int, dtype) -> torch.Tensor:
    """TensorFlow Lite's quantized add of two same-shaped code tensors in one pass.

    ``out = clamp(Z + MBQM(MBQM((qa - za) << s, ma) + MBQM((qb - zb) << s, mb), mo), lo, hi)``;
    ``ma``, ``mb``, ``mo``: per-tensor :class:`~qlib.fixedpoint.FixedPointMultiplier` s.
    """
    if qa.shape != qb.shape:
        raise ValueError(f"qa and qb must have the same shape, got {tuple(qa.shape)} and {tuple(qb.shape)}")
    arrays = [_multiplier_arrays(m) for m in (ma, mb, mo)]
    if any(len(a[0]) != 1 for a in arrays):
        raise ValueError("ma, mb and mo must be single (per-tensor) multipliers")
    scalars = [int(v[0]) for a in arrays for v in a]
    _check_cpu(qa, "qa"), _check_cpu(qb, "qb")
    if not (qa.is_contiguous() or _is_channels_last(qa)):
        qa = qa.contiguous()
    if qb.stride() != qa.stride():
        qb = torch.empty_like(qa, dtype=qb.dtype).copy_(qb)      # qa's layout
    out = torch.empty_like(qa, dtype=dtype)
    _loops()["add"](_flat(qa), _flat(qb), int(za), int(zb), int(left_shift), *scalars, int(zero_point), int(lo),
                    int(hi), _flat(out))
    return out

