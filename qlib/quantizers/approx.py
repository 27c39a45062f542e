"""Smooth stand-ins for the gradient of rounding: DSQ and DAQ (chapter 7).

Both keep hard rounding in the forward pass (so the network computes exactly what the integer
engine will) and replace the straight-through estimator's constant gradient 1 by the slope of a
smooth function that hugs the staircase. Both work in units of grid steps: ``u`` is ``x / s``
after clamping, so interval ``i`` is ``[i, i + 1]``.

* :func:`dsq_round` (Gong et al. 2019): in each interval, ``phi(u) = s tanh(k (u - m_i))`` with
  ``m_i`` the interval's middle, ``s = 1 / (1 - alpha)`` and ``k = log(2 / alpha - 1)`` (step 1),
  so that ``phi = +-1`` at the interval's ends. The forward pass takes ``sign(phi)`` (rounding); the
  backward pass the slope of ``i + (1 + phi) / 2``, steepest mid-interval. ``alpha`` in ``(0, 1)``
  is learned: small ``alpha``, sharp steps.
* :func:`daq_soft_round` (Kim, Lee and Ham 2021): a soft-argmax over the two neighbouring levels
  with a temperature controller ``T_eff = T / |s_0 - s_1|`` (detached) and levels shifted by
  ``1 / (e^T - 1)``, which make the soft output *equal* to hard rounding while its gradient is a
  bump that peaks at the rounding boundary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_float
from .uniform import LSQ


def dsq_round(u: torch.Tensor, alpha: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """``round(u)`` forward; the DSQ soft staircase's slope with respect to ``u`` and ``alpha`` backward.

    ``u`` is in grid steps (interval ``i`` is ``[i, i + 1]``); ``top``, the largest code, puts
    ``u = top`` into the last interval. ``alpha`` must lie in ``(0, 1)``.
    """
    alpha = torch.as_tensor(alpha, dtype=u.dtype)
    if not bool(((alpha > 0) & (alpha < 1)).all()):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha.detach().tolist()}")
    lower = torch.floor(u.detach())
    if top is not None:
        lower = lower.clamp(max=top - 1)
    s = 1 / (1 - alpha)
    k = torch.log(2 / alpha - 1)
    soft = lower + 0.5 + 0.5 * s * torch.tanh(k * (u - lower - 0.5))
    return soft + (torch.round(u.detach()) - soft).detach()


class DSQ(LSQ):
    """DSQ's gradient on LSQ's learned grid: the rounding's backward pass is the tanh staircase's slope.

    ``alpha`` (initially 0.2, as in the paper) is learned through a sigmoid, so it always stays in
    ``(ALPHA_MIN, ALPHA_MAX)`` inside ``(0, 1)``. The paper learns a clipping interval ``[l, u]``;
    here the grid is LSQ's, so that only the rounding's gradient differs from LSQ.
    """

    ALPHA_MIN, ALPHA_MAX = 1e-3, 1 - 1e-3

    def __init__(self, bits: int = 4, signed: bool = True, axis: int | None = None, alpha: float = 0.2):
        super().__init__(bits, signed, axis)
        alpha = check_float(alpha, "alpha", self.ALPHA_MIN, self.ALPHA_MAX, low_open=True, high_open=True)
        fraction = (alpha - self.ALPHA_MIN) / (self.ALPHA_MAX - self.ALPHA_MIN)
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))

    @property
    def alpha(self) -> torch.Tensor:
        """The characteristic variable, ``ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) sigmoid(alpha_logit)``."""
        return self.ALPHA_MIN + (self.ALPHA_MAX - self.ALPHA_MIN) * torch.sigmoid(self.alpha_logit)

    def discretize(self, u):
        return dsq_round(u, self.alpha, top=self.code_range[1])

    def extra_repr(self):
        return f"{super().extra_repr()}, alpha={float(self.alpha):.3g}"


def daq_soft_round(u: torch.Tensor, temperature: float = 2.0, sigma: float = 1.0) -> torch.Tensor:
    """DAQ's distance-aware soft rounding of ``u`` (in grid steps), differentiable with respect to ``u``.

    With ``d = u - floor(u)`` and the two neighbouring levels 0 and 1: distance scores
    ``m_j = exp(-|d - j|)``, a Gaussian kernel around the nearest level ``j*``,
    ``k_j = exp(-(j - j*)^2 / sigma^2)``, scores ``s_j = m_j k_j``, and a softmax
    ``p = softmax(T_eff s)`` with the detached temperature ``T_eff = T / |s_0 - s_1|``. Then
    ``T_eff (s_j* - s_other) = T`` always, so the weight of the far level is ``1 / (1 + e^T)``
    everywhere, and with the levels shifted to ``-c`` and ``1 + c``, ``c = 1 / (e^T - 1)``,
    the output ``floor(u) - c p_0 + (1 + c) p_1`` equals the nearest level (up to floating point;
    a tie ``d = 1/2`` goes down). The gradient is ``T e^T / (e^{2T} - 1) (s_0 + s_1) / |s_0 - s_1|``,
    positive, and largest at the boundary ``d = 1/2``.
    """
    temperature = check_float(temperature, "temperature", 0.0, low_open=True)
    sigma = check_float(sigma, "sigma", 0.0, low_open=True)
    lower = torch.floor(u.detach())
    d = u - lower
    nearest = (d.detach() > 0.5).to(u.dtype)
    s0 = torch.exp(-d.abs()) * torch.exp(-(nearest ** 2) / sigma**2)
    s1 = torch.exp(-(d - 1).abs()) * torch.exp(-((1 - nearest) ** 2) / sigma**2)
    t_eff = (temperature / (s0 - s1).abs().clamp(min=1e-12)).detach()
    top = torch.maximum(s0, s1).detach()   # softmax, shifted for stability
    e0, e1 = torch.exp(t_eff * (s0 - top)), torch.exp(t_eff * (s1 - top))
    p0, p1 = e0 / (e0 + e1), e1 / (e0 + e1)
    c = 1 / math.expm1(temperature)
    return lower - c * p0 + (1 + c) * p1


class DAQ(LSQ):
    """DAQ's gradient on LSQ's learned grid: the backward pass of :func:`daq_soft_round`.

    The soft rounding already equals hard rounding up to floating-point error; the forward pass
    returns the exact ``round(u)`` (so the integer engine computes the same values) with the soft
    rounding's gradient. The paper's code uses ``T = 2`` with ``sigma = 1`` for weights and
    ``sigma = 2`` for activations; ``sigma=None`` picks that by ``signed``.
    """

    def __init__(self, bits: int = 4, signed: bool = True, axis: int | None = None, temperature: float = 2.0,
                 sigma: float | None = None):
        super().__init__(bits, signed, axis)
        self.temperature = check_float(temperature, "temperature", 0.0, low_open=True)
        self.sigma = (1.0 if signed else 2.0) if sigma is None else check_float(sigma, "sigma", 0.0, low_open=True)

    def discretize(self, u):
        soft = daq_soft_round(u, self.temperature, self.sigma)
        return soft + (torch.round(u.detach()) - soft).detach()

    def extra_repr(self):
        return f"{super().extra_repr()}, T={self.temperature}, sigma={self.sigma}"
