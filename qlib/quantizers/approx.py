"""Smooth stand-ins for the gradient of rounding: DSQ and DAQ (chapter 7).

Both keep hard rounding in the forward pass (so the network computes exactly what the integer
engine will) and replace the straight-through estimator's constant gradient 1 by the slope of a
smooth function that hugs the staircase. Both work inside one interval between two neighbouring
levels ``l < h``, with ``d = (u - l) / (h - l)`` in ``[0, 1]`` (on a uniform grid in steps,
``l = floor(u)`` and ``d`` is the fractional part), so they apply to any grid:

* :func:`qlib.quantizers.dsq_round` (Gong et al. 2019): ``phi(d) = s tanh(k (d - 1/2))`` with ``s = 1 / (1 - alpha)``
  and ``k = log(2 / alpha - 1)``, so that ``phi = +-1`` at the interval's ends; the soft staircase
  is ``l + (h - l) (1 + phi) / 2``, steepest mid-interval. ``alpha`` in ``(0, 1)`` is learned:
  small ``alpha``, sharp steps.
* :func:`qlib.quantizers.daq_soft_round` (Kim, Lee and Ham 2021): a soft-argmax over the two neighbouring levels
  with a temperature controller ``T_eff = T / |s_0 - s_1|`` (detached) and levels shifted by
  ``1 / (e^T - 1)``, which make the soft output *equal* to hard rounding while its gradient is a
  bump that peaks at the rounding boundary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_float
from .base import Rounding, enclosing_levels

__all__ = ["DSQ", "DAQ", "dsq_round", "daq_soft_round", "daq_unit"]


def _soft_in_interval(u, u_q, levels, unit):
    """``u_q`` in value; the gradient of ``l + (h - l) unit((u - l) / (h - l))`` with respect to ``u``."""
    lower, upper = enclosing_levels(u, levels)
    width = upper - lower
    soft = lower + width * unit((u - lower) / width)
    return soft + (u_q - soft).detach()


def _dsq_unit(alpha):
    s = 1 / (1 - alpha)
    k = torch.log(2 / alpha - 1)
    return lambda d: 0.5 + 0.5 * s * torch.tanh(k * (d - 0.5))


def dsq_round(u: torch.Tensor, alpha) -> torch.Tensor:
    """``round(u)`` forward; the DSQ soft staircase's slope with respect to ``u`` and ``alpha`` backward.

    ``u`` is in grid steps (interval ``i`` is ``[i, i + 1]``); ``alpha`` must lie in ``(0, 1)``.
    """
    alpha = torch.as_tensor(alpha, dtype=u.dtype, device=u.device)
    if not bool(((alpha > 0) & (alpha < 1)).all()):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha.detach().tolist()}")
    return _soft_in_interval(u, torch.round(u.detach()), None, _dsq_unit(alpha))


class DSQ(Rounding):
    """DSQ's rounding gradient: the slope of a tanh staircase, whose sharpness ``alpha`` is learned.

    ``alpha`` (initially 0.2, as in the paper) is learned through a sigmoid, so it always stays in
    ``(ALPHA_MIN, ALPHA_MAX)`` inside ``(0, 1)``. (The paper also learns a clipping interval; in
    this book the grid is a separate choice, see :mod:`qlib.quantizers.base`.)
    """

    ALPHA_MIN, ALPHA_MAX = 1e-3, 1 - 1e-3

    def __init__(self, alpha: float = 0.2):
        super().__init__()
        alpha = check_float(alpha, "alpha", self.ALPHA_MIN, self.ALPHA_MAX, low_open=True, high_open=True)
        fraction = (alpha - self.ALPHA_MIN) / (self.ALPHA_MAX - self.ALPHA_MIN)
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))

    @property
    def alpha(self) -> torch.Tensor:
        """The characteristic variable, ``ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) sigmoid(alpha_logit)``."""
        return self.ALPHA_MIN + (self.ALPHA_MAX - self.ALPHA_MIN) * torch.sigmoid(self.alpha_logit)

    def round(self, u, u_q, levels):
        return _soft_in_interval(u, u_q, levels, _dsq_unit(self.alpha.to(u.dtype)))

    def extra_repr(self):
        return f"alpha={float(self.alpha):.3g}"


def daq_unit(d: torch.Tensor, temperature: float = 2.0, sigma: float = 1.0) -> torch.Tensor:
    """DAQ's soft rounding of ``d`` in ``[0, 1]`` between the levels 0 and 1.

    Distance scores ``m_j = exp(-|d - j|)``, a Gaussian kernel around the nearest level ``j*``,
    ``k_j = exp(-(j - j*)^2 / sigma^2)``, scores ``s_j = m_j k_j``, and a softmax
    ``p = softmax(T_eff s)`` with the detached temperature ``T_eff = T / |s_0 - s_1|``. Then
    ``T_eff (s_j* - s_other) = T`` always, so the weight of the far level is ``1 / (1 + e^T)``
    everywhere, and with the levels shifted to ``-c`` and ``1 + c``, ``c = 1 / (e^T - 1)``, the
    output ``-c p_0 + (1 + c) p_1`` equals the nearest level (up to floating point; a tie
    ``d = 1/2`` goes down). The gradient is ``T e^T / (e^{2T} - 1) (s_0 + s_1) / |s_0 - s_1|``,
    positive, and largest at the boundary ``d = 1/2``.
    """
    nearest = (d.detach() > 0.5).to(d.dtype)
    s0 = torch.exp(-d.abs()) * torch.exp(-(nearest ** 2) / sigma**2)
    s1 = torch.exp(-(d - 1).abs()) * torch.exp(-((1 - nearest) ** 2) / sigma**2)
    t_eff = (temperature / (s0 - s1).abs().clamp(min=1e-12)).detach()
    top = torch.maximum(s0, s1).detach()   # softmax, shifted for stability
    e0, e1 = torch.exp(t_eff * (s0 - top)), torch.exp(t_eff * (s1 - top))
    p0, p1 = e0 / (e0 + e1), e1 / (e0 + e1)
    c = 1 / math.expm1(temperature)
    return -c * p0 + (1 + c) * p1


def daq_soft_round(u: torch.Tensor, temperature: float = 2.0, sigma: float = 1.0) -> torch.Tensor:
    """DAQ's distance-aware soft rounding of ``u`` (in grid steps): ``floor(u) + daq_unit(u - floor(u))``,
    differentiable with respect to ``u`` (see :func:`daq_unit`)."""
    temperature = check_float(temperature, "temperature", 0.0, low_open=True)
    sigma = check_float(sigma, "sigma", 0.0, low_open=True)
    lower = torch.floor(u.detach())
    return lower + daq_unit(u - lower, temperature, sigma)


class DAQ(Rounding):
    """DAQ's rounding gradient: the backward pass of :func:`daq_unit` inside each interval.

    The soft rounding already equals hard rounding up to floating-point error; the forward pass
    returns the exact nearest level with the soft rounding's gradient. The paper's code uses
    ``T = 2`` with ``sigma = 1`` for weights and ``sigma = 2`` for activations.
    """

    def __init__(self, temperature: float = 2.0, sigma: float = 1.0):
        super().__init__()
        self.temperature = check_float(temperature, "temperature", 0.0, low_open=True)
        self.sigma = check_float(sigma, "sigma", 0.0, low_open=True)

    def round(self, u, u_q, levels):
        return _soft_in_interval(u, u_q, levels, lambda d: daq_unit(d, self.temperature, self.sigma))

    def extra_repr(self):
        return f"T={self.temperature}, sigma={self.sigma}"
