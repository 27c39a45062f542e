"""The two halves of every quantizer: a grid, and a rounding with its gradient.

A quantizer maps a real tensor ``x`` onto a finite set of levels. Two choices make a method, and
they are independent:

* the **grid** (:class:`Quantizer` subclasses): where the levels are and how they are learned
  or observed. It maps ``x`` into grid units ``u`` (steps for a uniform grid, the clip-normalised
  value for a level set), lets the rounding pick a level, and maps back: for a uniform grid
  ``x_hat = s (round(clamp(x / s + Z)) - Z)``;
* the **rounding** (:class:`Rounding` subclasses): the forward pass always takes the nearest
  level, so the network computes exactly what the integer engine will; the backward pass is the
  method's (the straight-through estimator, DSQ, DAQ, EWGS).

So ``LSQ(4, rounding=EWGS())`` or ``APoT(2, rounding=EWGS())`` is one line. Every grid exports
the same way (:meth:`qlib.quantizers.Quantizer.export`): integer codes and the scale and zero-point that map them
back, for the integer engine and the shift-add layer alike.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_bits, check_bool, check_float
from ..affine import QuantParams, qrange

__all__ = ["Rounding", "STE", "Quantizer", "Exported", "clamp_round", "enclosing_levels", "nearest_level",
           "round_ste", "scale_gradient"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, gradient 1 backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, gradient times ``g`` backward (LSQ's gradient scale)."""
    return x * g + (x - x * g).detach()


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, value)`` of the level nearest to each element of ``u``; ``levels`` ascending.

    A value exactly halfway between two levels goes to the lower one.
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = torch.bucketize(u, midpoints)
    return index, levels[index]


def enclosing_levels(u: torch.Tensor, levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two neighbouring levels ``(lower, upper)`` around each element of ``u`` (detached).

    ``levels=None`` is the integer grid (``floor(u)`` and ``floor(u) + 1``); otherwise an ascending
    level set, clamped so that values on the outermost levels still get an interval of the grid.
    """
    u = u.detach()
    if levels is None:
        lower = torch.floor(u)
        return lower, lower + 1
    index = (torch.bucketize(u, levels, right=True) - 1).clamp(0, len(levels) - 2)
    return levels[index], levels[index + 1]


class Rounding(nn.Module, abc.ABC):
    """Rounding to the nearest level, with a method's own backward pass.

    ``forward(u, levels)``: ``u`` is in grid units (already clamped to the grid's range);
    ``levels=None`` means the integer grid, otherwise an ascending 1-d tensor in ``u``'s units.
    The value returned is always the nearest level (ties: half to even on the integer grid, down
    on a level set); subclasses implement :meth:`round`, which gets that nearest level and
    returns it with their gradient with respect to ``u``.
    """

    def forward(self, u: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        u_q = torch.round(u.detach()) if levels is None else nearest_level(u.detach(), levels)[1]
        return self.round(u, u_q, levels)

    @abc.abstractmethod
    def round(self, u: torch.Tensor, u_q: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        """``u_q`` in value, the method's gradient with respect to ``u`` in the backward pass."""


class STE(Rounding):
    """The straight-through estimator (Bengio et al. 2013): the backward pass treats rounding as the identity.

    ``scale`` multiplies that gradient (1 by default): ``STE(0.5)`` is a control for chapter 7, a
    rounding gradient that is the STE's, uniformly smaller.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = check_float(scale, "scale", 0.0)

    def round(self, u, u_q, levels):
        if self.scale == 1.0:
            return u + (u_q - u).detach()
        return u * self.scale + (u_q - u * self.scale).detach()

    def extra_repr(self):
        return "" if self.scale == 1.0 else f"scale={self.scale}"


class _ClampRoundSTE(torch.autograd.Function):
    """``step * round(clamp(x / step, lo, hi))`` with the clipped straight-through gradient, fused.

    The same values and gradients as autograd through ``STE()(torch.clamp(x / step, lo, hi)) * step``
    (tests check it), in fewer passes over the tensor: ``d/dx = 1`` where ``lo <= x / step <= hi``
    and 0 outside; ``d/d step`` is ``round(v) - v`` inside and the clamped value outside (``v = x /
    step``), summed to the step's shape and multiplied by ``gradient_scale`` (LSQ's ``g``).
    """

    @staticmethod
    def forward(ctx, x, step, lo, hi, gradient_scale):
        v = x / step
        q = torch.clamp(v, lo, hi).round_()
        ctx.save_for_backward(v, q, lo, hi)
        ctx.step_shape, ctx.gradient_scale = step.shape, gradient_scale
        return q * step

    @staticmethod
    def backward(ctx, grad):
        v, q, lo, hi = ctx.saved_tensors
        inside = (v >= lo) & (v <= hi)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            local = grad * torch.where(inside, q - v, q)
            summed = local.sum() if len(ctx.step_shape) == 0 else local.sum_to_size(ctx.step_shape)
            grad_step = summed * ctx.gradient_scale
        return grad_x, grad_step, None, None, None


def clamp_round(x: torch.Tensor, step: torch.Tensor, lo, hi, rounding: Rounding,
                gradient_scale: float = 1.0) -> torch.Tensor:
    """``step * rounding(clamp(x / step, lo, hi))``: a uniform grid's fake quantization.

    ``step``, ``lo`` and ``hi`` broadcast against ``x`` (per channel, or 0-d); the gradient reaching
    ``step`` is multiplied by ``gradient_scale``. With the plain straight-through rounding this runs
    as one fused autograd function; any other rounding (DSQ, DAQ, EWGS, or a subclass of
    :class:`STE`) goes through autograd step by step, the readable form.
    """
    if type(rounding) is STE and rounding.scale == 1.0:
        lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
        return _ClampRoundSTE.apply(x, step, lo, hi, gradient_scale)
    step = scale_gradient(step, gradient_scale) if gradient_scale != 1.0 else step
    return rounding(torch.clamp(x / step, lo, hi)) * step


@dataclass(frozen=True)
class Exported:
    """A tensor exported as integers: ``x_hat = scale * (codes - zero_point)``.

    ``codes`` are int64; ``scale`` and ``zero_point`` are 0-d (per tensor) or 1-d along ``axis``
    (per channel). ``grid`` says which codes can occur: ``"uniform"`` (every integer in
    ``[qmin, qmax]``), ``"pot"`` or ``"apot"`` (sums of one or two powers of two, zero-point 0:
    the shift-and-add form of chapter 8).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    grid: str = "uniform"

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def dequantize(self) -> torch.Tensor:
        """The real values the codes stand for, in float64."""
        return self._shaped(self.scale.double()) * (self.codes.double() - self._shaped(self.zero_point.double()))

    def channel_scales(self, channels: int) -> np.ndarray:
        """The scale of each of ``channels`` output channels (a per-tensor scale repeated), float64."""
        return np.broadcast_to(self.scale.double().cpu().numpy(), (channels,)).copy()

    def channel_zero_points(self, channels: int) -> np.ndarray:
        """The zero-point of each of ``channels`` output channels, int64."""
        return np.broadcast_to(self.zero_point.to(torch.int64).cpu().numpy(), (channels,)).copy()


class Quantizer(nn.Module, abc.ABC):
    """A grid: fake quantization in ``forward``, and the integers the engine needs.

    ``forward(x)`` returns ``x`` fake-quantized, with the gradient of the grid's learned
    parameters from autograd and the rounding's gradient (``rounding``, the straight-through
    estimator by default). A grid whose parameters come from data sets them on the first batch
    it sees (:meth:`initialize`). ``enabled=False`` makes the quantizer the identity (to delay
    activation quantization, as Jacob et al. do).
    """

    def __init__(self, bits: int, signed: bool, rounding: Rounding | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = check_bool(signed, "signed")
        if rounding is not None and not isinstance(rounding, Rounding):
            raise TypeError(f"rounding must be a qlib.quantizers.Rounding, got {type(rounding).__name__}")
        self.rounding = STE() if rounding is None else rounding
        self.enabled = True
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def code_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the integer codes."""
        return qrange(self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating torch tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if not self.enabled:
            return x
        if not bool(self.initialized):
            with torch.no_grad():
                self.initialize(x.detach())
            self.initialized.fill_(True)
        return self.fake_quantize(x)

    def initialize(self, x: torch.Tensor) -> None:
        """Set data-driven parameters from the first batch (no-op unless a grid needs it)."""

    @abc.abstractmethod
    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the grid, differentiably."""

    def _require_initialized(self):
        if not bool(self.initialized):
            raise ValueError(f"{type(self).__name__} has not been initialised: call it on a tensor first")

    def qparams(self) -> QuantParams:
        """Scale and zero-point of the current grid, for uniform grids (the engine's activation grids)."""
        raise ValueError(f"{type(self).__name__} has no uniform integer grid; export() gives its codes")

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> Exported:
        """``x`` as integer codes with the scale and zero-point that map them back (see :class:`Exported`).

        The codes are read off this quantizer's own output (``round(forward(x) / S) + Z``, in eval
        mode so that no moving range moves), so they are exactly the levels the forward pass chose,
        whatever its arithmetic. This default serves every uniform grid through :meth:`qparams`.
        """
        if not self.enabled:
            raise ValueError(f"{type(self).__name__} is disabled: its input has no integer codes")
        was_training = self.training
        self.eval()
        try:
            y = self(x.detach())
        finally:
            self.train(was_training)
        qp = self.qparams()
        scale = torch.from_numpy(qp.scale.astype(np.float64))
        zero_point = torch.from_numpy(qp.zero_point.astype(np.int64))
        shape = [1] * x.ndim
        if qp.axis is not None:
            shape[qp.axis] = -1
        codes = torch.round(y.detach().cpu().double() / scale.reshape(shape)) + zero_point.reshape(shape)
        return Exported(codes.clamp(qp.qmin, qp.qmax).to(torch.int64), scale, zero_point, qp.qmin, qp.qmax, qp.axis)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """The real values the quantizer can output (per-tensor grids), ascending."""
        return torch.from_numpy(self.qparams().levels())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"
