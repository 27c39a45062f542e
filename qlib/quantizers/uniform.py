"""Uniform grids for training: observed ranges (Jacob et al.), PACT, LSQ and LSQ+ (chapters 5 and 6).

Each grid maps ``x`` into steps, lets its rounding (:mod:`qlib.quantizers.base`) pick the
nearest code, and maps back; the learned parameters get their gradients from autograd through
that one expression, which each class's docstring derives.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .._checks import check_choice, check_float, check_int
from ..affine import SCHEMES, QuantParams, scale_zero_point
from ..observers import MinMaxObserver, MovingAverageObserver
from .base import STE, Quantizer, Rounding, clamp_round, round_ste, scale_gradient
from .clip import mse_clip_range, mse_step

__all__ = ["RangeFakeQuantizer", "PACT", "LSQ", "LSQPlus", "RANGE_MODES"]

RANGE_MODES = ("current", "ema")


def _channel_shape(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """The shape that broadcasts one value per channel along ``axis`` against ``x``."""
    if axis is None:
        return ()
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


class RangeFakeQuantizer(Quantizer):
    """Simulated quantization as in Jacob et al. (2018), sec. 3.1: the grid comes from observed ranges.

    An observer from :mod:`qlib.observers` keeps the range: ``range="current"`` the min and max of
    the tensor at hand (weights, which change every step), ``range="ema"`` a moving average of
    per-batch min and max (activations), updated in training mode only. Scale and zero-point
    follow :func:`qlib.affine.qparams_from_range` (zero nudged onto the grid), computed in torch on
    the tensor's device. Forward: ``x_hat = S round(clamp(x / S, qmin - Z, qmax - Z))``. Backward
    with the straight-through rounding: ``d x_hat / dx = 1`` for ``S (qmin - Z) <= x <= S (qmax - Z)``
    and 0 outside, the clipped STE exactly as written (PyTorch's fused kernels pass the gradient
    half a step further on either side).
    """

    def __init__(self, bits: int = 8, signed: bool = False, scheme: str = "asymmetric", narrow_range: bool = False,
                 axis: int | None = None, range: str = "ema", decay: float = 0.99, rounding: Rounding | None = None):
        super().__init__(bits, signed, rounding)
        self.scheme = check_choice(scheme, "scheme", SCHEMES)
        self.narrow_range = bool(narrow_range)
        self.axis = None if axis is None else check_int(axis, "axis", 0)
        self.range = check_choice(range, "range", RANGE_MODES)
        decay = check_float(decay, "decay", 0.0, 1.0, high_open=True)
        self.observer = MinMaxObserver(self.axis) if self.range == "current" else MovingAverageObserver(decay, self.axis)

    @property
    def code_range(self) -> tuple[int, int]:
        qmin, qmax = super().code_range
        return qmin + int(self.narrow_range), qmax

    def fake_quantize(self, x):
        if self.range == "current":
            self.observer.reset()
        if self.range == "current" or self.training or not self.observer.seen:
            self.observer.observe(x.detach())
        scale, zero_point = scale_zero_point(self.observer.min_val, self.observer.max_val, self.bits, self.scheme,
                                             self.signed, self.narrow_range)
        shape = _channel_shape(x, self.axis)
        scale, zero_point = scale.to(x.dtype).reshape(shape), zero_point.to(x.dtype).reshape(shape)
        qmin, qmax = self.code_range
        return clamp_round(x, scale, qmin - zero_point, qmax - zero_point, self.rounding)

    def qparams(self) -> QuantParams:
        if not self.observer.seen:
            raise ValueError("RangeFakeQuantizer has seen no data yet: call it on a tensor first")
        return self.observer.qparams(self.bits, self.scheme, self.signed, self.narrow_range)

    def extra_repr(self):
        return f"{super().extra_repr()}, scheme={self.scheme}, axis={self.axis}, range={self.range}"


class PACT(Quantizer):
    """PACT (Choi et al. 2018): clip activations to a learned ``[0, alpha]``, then quantize uniformly.

    Forward: ``y = clamp(x, 0, alpha)`` on the grid ``alpha / (2^b - 1) * {0, ..., 2^b - 1}``.
    Backward (straight-through rounding, the step detached): ``dy/dx = 1`` for ``0 <= x < alpha``
    else 0, and ``dy/dalpha = 1`` for ``x >= alpha`` else 0. The paper adds an L2 penalty on
    ``alpha``; with AdamW that is not what weight decay does (it decays decoupled from the
    gradient), so pass your own penalty if you want the paper's.

    ``alpha``: the initial clipping level (the paper trains from scratch with 10), or ``None`` to
    set it on the first batch to the least-squared-error clip (:func:`mse_clip_range`), which
    suits fine-tuning a trained network.
    """

    def __init__(self, bits: int = 4, alpha: float | None = 10.0, rounding: Rounding | None = None):
        super().__init__(bits, signed=False, rounding=rounding)
        start = 1.0 if alpha is None else check_float(alpha, "alpha", 0.0, low_open=True)
        self.alpha = nn.Parameter(torch.tensor(start))
        if alpha is not None:
            self.initialized.fill_(True)

    def initialize(self, x):
        self.alpha.fill_(float(mse_clip_range(x.clamp(min=0), self.bits)[1].clamp(min=1e-6)))

    def fake_quantize(self, x):
        alpha = self.alpha.clamp(min=1e-6)
        clipped = torch.where(x < alpha, torch.relu(x), alpha)  # gradient to alpha exactly where x >= alpha
        step = alpha.detach() / (2**self.bits - 1)
        return self.rounding(clipped / step) * step

    def qparams(self) -> QuantParams:
        self._require_initialized()
        step = float(self.alpha.detach().clamp(min=1e-6)) / (2**self.bits - 1)
        return QuantParams(step, 0, self.bits, False, False, None)


class LSQ(Quantizer):
    """LSQ (Esser et al. 2020): a learned step size ``s`` with a scaled gradient.

    ``y = round(clamp(x / s, Qn, Qp)) * s``. With the straight-through rounding, the gradient with
    respect to ``s`` is ``round(x/s) - x/s`` inside the range and ``Qn`` or ``Qp`` outside, scaled by
    ``g = 1 / sqrt(N Qp)`` (``N``: the number of elements that share the step). ``s`` starts at
    ``2 mean|x| / sqrt(Qp)`` on the first batch (``init="lsq"``, the paper's), or at the
    least-squared-error step (``init="mse"``, :func:`mse_step`: what post-training quantization
    starts from); the step used is ``|s|`` (see :meth:`positive_step`). ``axis`` gives one step
    per channel.
    """

    MIN_STEP = 1e-8
    INITS = ("lsq", "mse")

    def __init__(self, bits: int = 4, signed: bool = True, axis: int | None = None, rounding: Rounding | None = None,
                 init: str = "lsq"):
        super().__init__(bits, signed, rounding)
        self.axis = None if axis is None else check_int(axis, "axis", 0)
        self.init = check_choice(init, "init", LSQ.INITS)
        self.step = nn.Parameter(torch.tensor(1.0))

    def positive_step(self) -> torch.Tensor:
        """``|s|`` floored at ``MIN_STEP``: an optimizer step that overshoots below zero flips the sign
        of the parameter but not of the step, and the gradient keeps flowing (a clamp would freeze it)."""
        return self.step.abs().clamp(min=self.MIN_STEP)

    def elements_per_step(self, x: torch.Tensor) -> int:
        """``N`` of the gradient scale: how many elements of ``x`` share one step."""
        return x.numel() if self.axis is None else x.numel() // x.shape[self.axis]

    def gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N Qp)``."""
        return 1.0 / math.sqrt(self.elements_per_step(x) * self.code_range[1])

    def initialize(self, x):
        _, qp = self.code_range
        if self.init == "mse":
            init = mse_step(x, self.bits, self.signed, self.axis)
        else:
            magnitude = x.abs()
            if self.axis is not None:
                magnitude = magnitude.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
            init = 2 * magnitude.mean(dim=None if self.axis is None else 1) / math.sqrt(qp)
        # a new Parameter: per-channel steps take their shape from the data (create optimizers after this)
        self.step = nn.Parameter(init.clamp(min=self.MIN_STEP).to(x.dtype))

    def fake_quantize(self, x):
        qn, qp = self.code_range
        step = self.positive_step().reshape(_channel_shape(x, self.axis))
        return clamp_round(x, step, qn, qp, self.rounding, self.gradient_scale(x))

    def qparams(self) -> QuantParams:
        self._require_initialized()
        step = self.positive_step().detach().double().cpu().numpy()
        return QuantParams(step, np.zeros(step.shape, dtype=np.int32), self.bits, self.signed, False, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "step" in state_dict:  # per-channel steps take their shape from the data
            self.step = nn.Parameter(torch.empty_like(state_dict[prefix + "step"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _LSQPlusSTE(torch.autograd.Function):
    """LSQ+'s straight-through fake quantization as one autograd node, from the raw parameters.

    The same values and gradients as autograd through :meth:`LSQPlus.fake_quantize`'s readable
    form (tests check it), without its dozen scalar operations and their backward nodes (a
    training step on a small network is overhead-bound). With ``s = max(|step|, MIN_STEP)``,
    ``Z = clamp(round(-beta / s), Qn, Qp)``, ``v = x / s`` and the code ``q = round(clamp(v, Qn - Z,
    Qp - Z))``, the output is ``q s`` and, ``g`` being LSQ's gradient scale::

        dy/dx    = 1 inside (Qn - Z <= v <= Qp - Z), else 0
        dL/ds    = g [sum dL/dy (q - v inside) - s zmask (beta / s^2) sum_outside dL/dy]
        dL/dbeta = g zmask sum_outside dL/dy

    (``zmask``: whether ``round(-beta / s)`` is inside ``[Qn, Qp]``, the zero-point clamp's gradient),
    and ``dL/dstep = sign(step) dL/ds`` where ``|step| >= MIN_STEP``.
    """

    @staticmethod
    def forward(ctx, x, step, offset, qn, qp, gradient_scale, min_step):
        s = step.abs().clamp(min=min_step)
        unclamped = torch.round(-offset / s)
        zero_point = unclamped.clamp(qn, qp)
        lo, hi = qn - zero_point, qp - zero_point
        v = x / s
        q = torch.clamp(v, lo, hi).round_()
        ctx.save_for_backward(step, offset, s, unclamped, v, q, lo, hi)
        ctx.qn, ctx.qp, ctx.gradient_scale, ctx.min_step = qn, qp, gradient_scale, min_step
        return q * s

    @staticmethod
    def backward(ctx, grad):
        step, offset, s, unclamped, v, q, lo, hi = ctx.saved_tensors
        below, above = v < lo, v > hi
        outside = below | above
        grad_x = grad.masked_fill(outside, 0.0) if ctx.needs_input_grad[0] else None
        clipped = grad.masked_fill(~outside, 0.0).sum()
        zmask = float(ctx.qn <= float(unclamped) <= ctx.qp)
        g = ctx.gradient_scale
        grad_step = grad_offset = None
        if ctx.needs_input_grad[1]:
            direct = (grad * torch.where(outside, q, q - v)).sum()
            through_zero_point = -s * zmask * (offset / s**2) * clipped
            passes = float(step.abs() >= ctx.min_step)
            grad_step = g * (direct + through_zero_point) * torch.sign(step) * passes
        if ctx.needs_input_grad[2]:
            grad_offset = g * zmask * clipped
        return grad_x, grad_step, grad_offset, None, None, None, None


class LSQPlus(LSQ):
    """LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset ``beta`` for asymmetric activations.

    ``y = s round(clamp(x / s, Qn - Z, Qp - Z))`` with the zero-point ``Z = round(-beta / s)``:
    the learned offset is used as a whole number of steps, so that 0 stays exact and the integer
    engine computes the same grid (the paper keeps ``beta`` real). With the straight-through
    rounding (also through ``Z``), ``dy/dbeta`` is 0 inside the range and 1 where clipped, ``dy/ds``
    is LSQ's, and both gradients are scaled by ``g``. ``init="mse"`` (the paper's proposal) starts
    from the least-squared-error clipping range (:func:`mse_clip_range`); ``init="minmax"`` covers
    the whole first batch, which at 2 bits wastes most of the grid on rare large values.
    """

    INITS = ("mse", "minmax")

    def __init__(self, bits: int = 4, signed: bool = False, init: str = "mse", rounding: Rounding | None = None):
        super().__init__(bits, signed, axis=None, rounding=rounding)
        self.init = check_choice(init, "init", self.INITS)
        self.offset = nn.Parameter(torch.tensor(0.0))

    def initialize(self, x):
        qn, qp = self.code_range
        lo, hi = mse_clip_range(x, self.bits, self.signed) if self.init == "mse" else (x.min(), x.max())
        step = ((hi - lo) / (qp - qn)).clamp(min=self.MIN_STEP)
        self.step = nn.Parameter(step.to(x.dtype))
        self.offset = nn.Parameter((lo - qn * step).to(x.dtype))

    def fake_quantize(self, x):
        qn, qp = self.code_range
        g = self.gradient_scale(x)
        if type(self.rounding) is STE and self.rounding.scale == 1.0:  # the fused form, same numbers
            return _LSQPlusSTE.apply(x, self.step, self.offset, qn, qp, g, self.MIN_STEP)
        step = scale_gradient(self.positive_step(), g)
        # the zero-point is one number: its rounding is always straight-through
        zero_point = torch.clamp(round_ste(-scale_gradient(self.offset, g) / step), qn, qp)
        return self.rounding(torch.clamp(x / step, qn - zero_point, qp - zero_point)) * step

    def _zero_point(self) -> int:
        qmin, qmax = self.code_range
        return int(min(max(round(-float(self.offset.detach()) / float(self.positive_step().detach())), qmin), qmax))

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """``s * (q - Z)`` for every code ``q``, with the zero-point ``Z = round(-beta / s)``."""
        self._require_initialized()
        qmin, qmax = self.code_range
        step = self.positive_step()
        return (torch.arange(qmin, qmax + 1, dtype=step.dtype, device=step.device) - self._zero_point()) * step

    def qparams(self) -> QuantParams:
        self._require_initialized()
        return QuantParams(float(self.positive_step().detach()), self._zero_point(), self.bits, self.signed, False,
                           None)
