"""Uniform quantizers for training: data ranges with the STE, PACT, LSQ and LSQ+.

Two one-line tools carry all the gradients (chapters 5 and 6):

* :func:`round_ste`: ``round`` in the forward pass, the identity in the backward pass (the
  straight-through estimator of Bengio et al., as used by Jacob et al. and LSQ);
* :func:`scale_gradient`: the identity in the forward pass, the gradient multiplied by ``g``
  in the backward pass (LSQ's gradient scale).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .._checks import check_bits, check_bool, check_choice, check_float, check_int
from ..affine import SCHEMES, QuantParams, qparams_from_range, qrange
from .base import Quantizer

RANGE_MODES = ("current", "ema")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, gradient 1 backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, gradient times ``g`` backward."""
    return x * g + (x - x * g).detach()


def mse_clip_range(x: torch.Tensor, bits: int, signed: bool = False, candidates: int = 100,
                   max_samples: int = 2**16) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range ``a * [min(x, 0), max(x, 0)]``, ``a`` in ``(0, 1]``, whose uniform grid of
    ``2^bits`` levels (offset not rounded to an integer) quantizes ``x`` with the least squared error.

    Narrowing the range trades clipping error for rounding error; the best trade depends on the
    bit width. Used to initialise LSQ+ (as its paper proposes) and PACT's clip for fine-tuning.
    Larger tensors are subsampled with an even stride to ``max_samples`` values.
    (:class:`qlib.observers.MSEObserver` makes the same search for calibration, with integer
    zero-points.) Returns ``(lo, hi)`` as 0-d tensors.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError("x must be a non-empty floating-point torch.Tensor")
    qmin, qmax = qrange(check_bits(bits), check_bool(signed, "signed"))
    candidates = check_int(candidates, "candidates", 1)
    max_samples = check_int(max_samples, "max_samples", 1)
    flat = x.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("x must be finite")
    if flat.numel() > max_samples:
        flat = flat[:: flat.numel() // max_samples]
    fractions = torch.linspace(1.0 / candidates, 1.0, candidates)
    lo, hi = fractions * flat.min().clamp(max=0), fractions * flat.max().clamp(min=0)
    steps = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)[:, None]
    offsets = lo[:, None] - qmin * steps
    quantized = torch.round(torch.clamp((flat - offsets) / steps, qmin, qmax)) * steps + offsets
    best = int(torch.argmin(((quantized - flat) ** 2).mean(dim=1)))
    return lo[best], hi[best]


class RangeFakeQuantizer(Quantizer):
    """Simulated quantization as in Jacob et al. (2018), sec. 3.1.

    The grid comes from the data: ``range="current"`` uses the min and max of the tensor at
    hand (weights, which change every step), ``range="ema"`` an exponential moving average of
    per-batch min and max, updated in training mode only (activations). Zero is nudged onto the
    grid (integer zero-point). The backward pass is the clipped straight-through estimator:
    gradient 1 inside the grid's range, 0 outside (PyTorch's fake-quantize kernels).
    """

    def __init__(self, bits: int = 8, signed: bool = False, scheme: str = "asymmetric", narrow_range: bool = False,
                 axis: int | None = None, range: str = "ema", decay: float = 0.99):
        super().__init__(bits, signed)
        self.scheme = check_choice(scheme, "scheme", SCHEMES)
        self.narrow_range = bool(narrow_range)
        self.axis = None if axis is None else check_int(axis, "axis", 0)
        self.range = check_choice(range, "range", RANGE_MODES)
        self.decay = check_float(decay, "decay", 0.0, 1.0, high_open=True)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _observe(self, x: torch.Tensor):
        with torch.no_grad():
            if self.axis is None:
                lo, hi = x.min(), x.max()
            else:
                flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
                lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
            if self.range == "current" or not bool(torch.isfinite(self.min_val).all()):
                self.min_val, self.max_val = lo.detach().clone(), hi.detach().clone()
            elif self.training:
                self.min_val = self.decay * self.min_val + (1 - self.decay) * lo
                self.max_val = self.decay * self.max_val + (1 - self.decay) * hi

    def qparams(self) -> QuantParams:
        if not bool(torch.isfinite(self.min_val).all()):
            raise ValueError("RangeFakeQuantizer has seen no data yet: call it on a tensor first")
        lo, hi = self.min_val.double().numpy(), self.max_val.double().numpy()
        return qparams_from_range(lo if lo.ndim else float(lo), hi if hi.ndim else float(hi), self.bits, self.scheme,
                                  self.signed, self.narrow_range, self.axis)

    def quantize(self, x):
        if self.range == "current" or self.training or not bool(torch.isfinite(self.min_val).all()):
            self._observe(x)
        qp = self.qparams()
        scale = torch.as_tensor(qp.scale, dtype=torch.float32, device=x.device)
        zero_point = torch.as_tensor(qp.zero_point, dtype=torch.int32, device=x.device)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qp.qmin, qp.qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, self.axis, qp.qmin, qp.qmax)

    def extra_repr(self):
        return f"{super().extra_repr()}, scheme={self.scheme}, axis={self.axis}, range={self.range}"


class PACT(Quantizer):
    """PACT (Choi et al. 2018): clip activations to a learned ``[0, alpha]``, then quantize uniformly.

    Forward: ``y = clamp(x, 0, alpha)`` on the grid ``alpha / (2^b - 1) * {0, ..., 2^b - 1}``.
    Backward (STE through the rounding): ``dy/dx = 1`` for ``0 <= x < alpha`` else 0, and
    ``dy/dalpha = 1`` for ``x >= alpha`` else 0. Add an L2 penalty on ``alpha`` through the
    optimizer's weight decay, as the paper does.

    ``alpha``: the initial clipping level (the paper trains from scratch with 10), or ``None`` to
    set it on the first batch to the least-squared-error clip (:func:`mse_clip_range`), which
    suits fine-tuning a trained network (from scratch, early activations say little about later ones).
    """

    def __init__(self, bits: int = 4, alpha: float | None = 10.0):
        super().__init__(bits, signed=False)
        start = 1.0 if alpha is None else check_float(alpha, "alpha", 0.0, low_open=True)
        self.alpha = nn.Parameter(torch.tensor(start))
        self.register_buffer("initialized", torch.tensor(alpha is not None))

    def quantize(self, x):
        if not bool(self.initialized):
            with torch.no_grad():
                self.alpha.fill_(mse_clip_range(x.clamp(min=0), self.bits)[1].clamp(min=1e-6))
                self.initialized.fill_(True)
        alpha = self.alpha.clamp(min=1e-6)
        clipped = torch.where(x < alpha, torch.relu(x), alpha)  # gradient to alpha exactly where x >= alpha
        step = alpha.detach() / (2**self.bits - 1)
        return clipped + (torch.round(clipped.detach() / step) * step - clipped).detach()

    def qparams(self) -> QuantParams:
        if not bool(self.initialized):
            raise ValueError("PACT has not been initialised: call it on a tensor first, or give alpha")
        return qparams_from_range(0.0, float(self.alpha.detach().clamp(min=1e-6)), self.bits, "asymmetric", False)


class LSQ(Quantizer):
    """LSQ (Esser et al. 2020): a learned step size ``s`` with a scaled gradient.

    ``y = round(clamp(x / s, Qn, Qp)) * s``, with the STE through ``round``. The gradient with
    respect to ``s`` is ``-x/s + round(x/s)`` inside the range and ``Qn`` or ``Qp`` outside, scaled
    by ``g = 1 / sqrt(N * Qp)`` (``N``: elements per step). ``s`` is initialised on the first
    batch to ``2 mean|x| / sqrt(Qp)``; the step used is ``|s|`` (see :meth:`positive_step`).
    ``axis`` gives one step per channel.
    """

    MIN_STEP = 1e-8

    def __init__(self, bits: int = 4, signed: bool = True, axis: int | None = None):
        super().__init__(bits, signed)
        self.axis = None if axis is None else check_int(axis, "axis", 0)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def positive_step(self) -> torch.Tensor:
        """``|s|`` floored at ``MIN_STEP``: an optimizer step that overshoots below zero flips the sign
        of the parameter but not of the step, and the gradient keeps flowing (a clamp would freeze it)."""
        return self.step.abs().clamp(min=self.MIN_STEP)

    def _qn_qp(self):
        return self.code_range

    def _shape(self, x):
        if self.axis is None:
            return ()
        shape = [1] * x.ndim
        shape[self.axis] = x.shape[self.axis]
        return shape

    def _elements_per_step(self, x) -> int:
        return x.numel() if self.axis is None else x.numel() // x.shape[self.axis]

    @torch.no_grad()
    def _initialize(self, x):
        _, qp = self._qn_qp()
        if self.axis is None:
            init = 2 * x.abs().mean() / math.sqrt(qp)
        else:
            init = 2 * x.abs().transpose(0, self.axis).reshape(x.shape[self.axis], -1).mean(1) / math.sqrt(qp)
        self.step = nn.Parameter(init.clamp(min=self.MIN_STEP).to(x.dtype))
        self.initialized.fill_(True)

    def quantize(self, x):
        if not bool(self.initialized):
            self._initialize(x)
        qn, qp = self._qn_qp()
        g = 1.0 / math.sqrt(self._elements_per_step(x) * qp)
        step = scale_gradient(self.positive_step(), g).reshape(self._shape(x))
        return self.discretize(torch.clamp(x / step, qn, qp)) * step

    def discretize(self, u: torch.Tensor) -> torch.Tensor:
        """Round ``u`` (in steps, already clamped) to the grid: the straight-through estimator here;
        the methods of chapter 7 (DSQ, DAQ, EWGS) override only this."""
        return round_ste(u)

    def qparams(self) -> QuantParams:
        if not bool(self.initialized):
            raise ValueError("LSQ has not been initialised: call it on a tensor first")
        step = self.positive_step().detach().double().numpy()
        return QuantParams(step, np.zeros(step.shape, dtype=np.int32), self.bits, self.signed, False, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "step" in state_dict:  # per-channel steps take their shape from the data
            self.step = nn.Parameter(torch.empty_like(state_dict[prefix + "step"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LSQPlus(LSQ):
    """LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset ``beta`` for asymmetric activations.

    ``y = (round(clamp(x / s + Z, Qn, Qp)) - Z) * s`` with the zero-point ``Z = round(-beta / s)``:
    the learned offset ``beta`` is used as a whole number of steps, so that 0 stays exact and the
    integer engine computes the same grid (the paper keeps ``beta`` real). With the STE through
    both roundings, ``dy/dbeta`` is 0 inside the range and 1 where clipped, ``dy/ds`` is LSQ's, and
    both gradients are scaled by ``g``.
    ``s`` and ``beta`` are initialised on the first batch. ``init="mse"`` (the paper's proposal)
    searches the clipping range ``a * [min, max]``, ``a`` in ``(0, 1]``, with the least mean squared
    quantization error; ``init="minmax"`` covers the whole batch range, ``s = (max - min) / (Qp - Qn)``
    and ``beta = min - Qn s``, which at 2 bits wastes most of the grid on rare large values.
    """

    INITS = ("mse", "minmax")

    def __init__(self, bits: int = 4, signed: bool = False, init: str = "mse"):
        super().__init__(bits, signed, axis=None)
        self.init = check_choice(init, "init", self.INITS)
        self.offset = nn.Parameter(torch.tensor(0.0))

    @torch.no_grad()
    def _initialize(self, x):
        qn, qp = self._qn_qp()
        lo, hi = mse_clip_range(x, self.bits, self.signed) if self.init == "mse" else (x.min(), x.max())
        step = ((hi - lo) / (qp - qn)).clamp(min=self.MIN_STEP)
        self.step = nn.Parameter(step.to(x.dtype))
        self.offset = nn.Parameter((lo - qn * step).to(x.dtype))
        self.initialized.fill_(True)

    def quantize(self, x):
        if not bool(self.initialized):
            self._initialize(x)
        qn, qp = self._qn_qp()
        g = 1.0 / math.sqrt(x.numel() * qp)
        step = scale_gradient(self.positive_step(), g)
        offset = scale_gradient(self.offset, g)
        # The offset is used as a whole number of steps (the zero-point), so that 0 stays exactly
        # representable and the integer engine computes the same grid; the STE passes the offset's
        # gradient through the rounding.
        zero_point = torch.clamp(round_ste(-offset / step), qn, qp)
        return (round_ste(torch.clamp(x / step + zero_point, qn, qp)) - zero_point) * step

    def _zero_point(self) -> int:
        qmin, qmax = self.code_range
        return int(min(max(round(-float(self.offset.detach()) / float(self.positive_step().detach())), qmin), qmax))

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """``s * (q - Z)`` for every code ``q``, with the zero-point ``Z = round(-beta / s)``."""
        if not bool(self.initialized):
            raise ValueError("LSQPlus has not been initialised: call it on a tensor first")
        qmin, qmax = self.code_range
        step = self.positive_step()
        return (torch.arange(qmin, qmax + 1, dtype=step.dtype) - self._zero_point()) * step

    def qparams(self) -> QuantParams:
        if not bool(self.initialized):
            raise ValueError("LSQPlus has not been initialised: call it on a tensor first")
        return QuantParams(float(self.positive_step().detach()), self._zero_point(), self.bits, self.signed, False,
                           None)
