"""The least-squared-error clip search, written once (calibration, LSQ+, PACT and APoT use it).

Narrowing a grid's range trades clipping error (values beyond it) for rounding error (a coarser
grid covers less, so a finer one fits); the best trade depends on the bits and the level set. The
search tries a fraction ``f`` of the data's range for each candidate and keeps the one whose
quantized values are closest to the data in mean squared error.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_bits, check_bool, check_int
from ..affine import qrange

__all__ = ["clip_errors", "least_squares_fraction", "mse_clip_range", "mse_step"]

#: Candidates evaluated together (memory: chunk x samples values).
_CHUNK_VALUES = 2**22


def clip_errors(x: torch.Tensor, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                fractions: torch.Tensor) -> torch.Tensor:
    """The mean squared error of ``project`` at every candidate fraction.

    ``project(values, f)`` gets the flat values ``(N,)`` and a column of fractions ``(K, 1)`` and
    returns the quantized values ``(K, N)``. Candidates are evaluated in chunks (bounded memory).
    """
    flat = x.reshape(-1)
    errors = []
    chunk = max(1, _CHUNK_VALUES // max(1, flat.numel()))
    for start in range(0, len(fractions), chunk):
        f = fractions[start:start + chunk, None]
        errors.append(((project(flat, f) - flat[None, :]) ** 2).mean(dim=1))
    return torch.cat(errors)


def least_squares_fraction(x: torch.Tensor, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           candidates: int = 100, max_samples: int = 2**16) -> float:
    """The fraction ``f`` in ``{1/K, 2/K, ..., 1}`` (``K = candidates``) with the least squared error.

    ``x`` is subsampled with an even stride to at most ``max_samples`` values first.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError("x must be a non-empty floating-point torch.Tensor")
    candidates = check_int(candidates, "candidates", 1)
    max_samples = check_int(max_samples, "max_samples", 1)
    flat = x.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("x must be finite")
    if flat.numel() > max_samples:
        flat = flat[:: flat.numel() // max_samples]
    fractions = torch.linspace(1.0 / candidates, 1.0, candidates, device=flat.device)
    return float(fractions[int(torch.argmin(clip_errors(flat, project, fractions)))])


def mse_clip_range(x: torch.Tensor, bits: int, signed: bool = False, candidates: int = 100,
                   max_samples: int = 2**16) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range ``f * [min(x, 0), max(x, 0)]`` whose uniform grid of ``2^bits`` levels
    (offset not rounded to an integer) quantizes ``x`` with the least squared error.

    Used to initialise LSQ+ (as its paper proposes) and PACT's clip for fine-tuning. Returns
    ``(lo, hi)`` as 0-d tensors.
    """
    qmin, qmax = qrange(check_bits(bits), check_bool(signed, "signed"))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError("x must be a non-empty floating-point torch.Tensor")
    flat = x.detach().reshape(-1).float()
    low, high = flat.min().clamp(max=0), flat.max().clamp(min=0)

    def project(values, f):
        lo, hi = f * low, f * high
        step = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
        offset = lo - qmin * step
        return torch.round(torch.clamp((values - offset) / step, qmin, qmax)) * step + offset

    f = least_squares_fraction(flat, project, candidates, max_samples)
    return f * low, f * high


def mse_step(x: torch.Tensor, bits: int, signed: bool = True, axis: int | None = None, candidates: int = 100,
             max_samples: int = 2**16) -> torch.Tensor:
    """The step ``s`` of the zero-point-free grid ``s * {qmin, ..., qmax}`` that quantizes ``x`` with the
    least squared error: ``s = f * max|x| / qmax`` for the best fraction ``f``, per tensor (a 0-d
    tensor) or one per channel along ``axis`` (a 1-d tensor, each channel searched on its own).

    What post-training quantization starts per-channel weights from (LSQ's ``init="mse"``).
    """
    qmin, qmax = qrange(check_bits(bits), check_bool(signed, "signed"))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError("x must be a non-empty floating-point torch.Tensor")
    if axis is not None:
        axis = check_int(axis, "axis", 0)
        if axis >= x.ndim:
            raise ValueError(f"axis must be below x.ndim = {x.ndim}, got {axis}")

    def one(values):
        top = (values.abs().max() if signed else values.max()).clamp(min=1e-8)

        def project(v, f):
            step = f * top / qmax
            return torch.clamp(torch.round(v / step), qmin, qmax) * step

        return least_squares_fraction(values, project, candidates, max_samples) * top / qmax

    flat = x.detach().float()
    if axis is None:
        return one(flat.reshape(-1)).to(x.dtype)
    channels = flat.transpose(0, axis).reshape(x.shape[axis], -1)
    return torch.stack([one(c) for c in channels]).to(x.dtype)
