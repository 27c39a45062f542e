"""AdaRound (Nagel et al. 2020): learn, for every weight, whether to round down or up.

Round-to-nearest minimises each weight's own error ``|w - w_hat|``, which is not what the network
needs: the loss changes by about ``1/2 dW^T H dW`` (``H``: the Hessian of the loss in the
weights), so errors that cancel in a layer's *output* matter, not their sizes one by one. AdaRound
keeps every weight on one of its two neighbouring levels and learns which, per layer, by
minimising the layer's output error. The choice is relaxed to a continuous ``h(V) in [0, 1]``::

    W_soft = s * (clamp(floor(W / s) + h(V) + Z, qmin, qmax) - Z)
    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

(the *rectified sigmoid*: it reaches 0 and 1 exactly, with a nonzero gradient just inside), and a
regulariser ``lambda * sum(1 - |2 h(V) - 1|^beta)`` pulls every ``h`` to 0 or 1 while ``beta``
falls from 20 to 2 (:class:`qlib.ptq.BetaSchedule`). At the end ``h`` is made hard (``V >= 0`` rounds
up), so the result is integer codes on the original grid, which the engine runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_float, check_int
from ..affine import QuantParams
from ..quantizers import Quantizer

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "inverse_rectified_sigmoid", "rounding_regularizer",
           "BetaSchedule", "AdaRoundWeights"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``: the soft rounding decision."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """The ``V`` with ``h(V) = h`` for ``0 < h < 1`` (AdaRound's start: ``h`` = the fractional part)."""
    p = (h - gamma) / (zeta - gamma)
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: 0 where every ``h`` is 0 or 1, largest at ``h = 1/2``.

    A large ``beta`` makes it nearly constant except close to 0 and 1, so it barely moves ``h`` (the
    reconstruction decides); ``beta = 2`` pushes everything towards 0 or 1.
    """
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """AdaRound's annealing: no regulariser for the first ``warmup`` fraction of the iterations, then
    ``beta`` falls linearly from ``start`` to ``end`` (20 to 2 in the paper and its code)."""

    iterations: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __post_init__(self):
        check_int(self.iterations, "iterations", 1)
        check_float(self.warmup, "warmup", 0.0, 1.0, high_open=True)
        check_float(self.start, "start", 0.0, low_open=True)
        check_float(self.end, "end", 0.0, low_open=True)

    def regularized(self, iteration: int) -> bool:
        """Whether the regulariser applies at ``iteration`` (0-based)."""
        return iteration >= int(self.warmup * self.iterations)

    def beta(self, iteration: int) -> float:
        """``beta`` at ``iteration``: ``start`` at the end of the warm-up, ``end`` at the last iteration."""
        first = int(self.warmup * self.iterations)
        span = max(1, self.iterations - 1 - first)
        progress = min(max((iteration - first) / span, 0.0), 1.0)
        return self.start + (self.end - self.start) * progress


class AdaRoundWeights(Quantizer):
    """A layer's weight quantizer with learned rounding on the grid of a calibrated uniform quantizer.

    ``grid`` is the layer's calibrated weight quantizer (any uniform grid: its :meth:`qparams`
    give the step ``s``, zero-point ``Z`` and code range, per channel or per tensor); ``weight`` is
    the layer's weight, which stays fixed while ``V`` (the parameter ``alpha``, one per weight)
    learns. ``V`` starts where ``h(V)`` is the fractional part of ``W / s``, so the soft weights
    start equal to the float weights (inside the clipping range). ``hard=True`` (see
    :meth:`harden`) rounds up exactly where ``V >= 0`` (``h >= 1/2``).
    """

    def __init__(self, grid: Quantizer, weight: torch.Tensor):
        if not isinstance(grid, Quantizer):
            raise TypeError(f"grid must be a qlib.quantizers.Quantizer, got {type(grid).__name__}")
        qp = grid.qparams()
        super().__init__(qp.bits, qp.signed)
        self._qparams = qp
        shape = [1] * weight.ndim
        if qp.axis is not None:
            if qp.axis >= weight.ndim or weight.shape[qp.axis] != qp.scale.size:
                raise ValueError(f"grid has {qp.scale.size} channels on axis {qp.axis}; weight has shape "
                                 f"{tuple(weight.shape)}")
            shape[qp.axis] = -1
        step = torch.as_tensor(qp.scale, dtype=weight.dtype, device=weight.device).reshape(shape)
        zero_point = torch.as_tensor(qp.zero_point, dtype=weight.dtype, device=weight.device).reshape(shape)
        self.register_buffer("step", step)
        self.register_buffer("zero_point", zero_point)
        scaled = weight.detach() / step
        fraction = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)  # off the clamp's flat ends
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(fraction))
        self.register_buffer("hardened", torch.tensor(False))  # in the state dict: a saved result stays hard
        self.initialized.fill_(True)

    @property
    def hard(self) -> bool:
        """Whether the decisions are final (0/1) rather than the soft ``h(V)``."""
        return bool(self.hardened)

    @hard.setter
    def hard(self, value: bool):
        self.hardened.fill_(bool(value))

    @property
    def code_range(self) -> tuple[int, int]:
        return self._qparams.qmin, self._qparams.qmax

    def h(self) -> torch.Tensor:
        """The rounding decision of every weight: soft ``h(V)``, or 0/1 once hardened."""
        return (self.alpha >= 0).to(self.alpha.dtype) if self.hard else rectified_sigmoid(self.alpha)

    def fake_quantize(self, w):
        qmin, qmax = self.code_range
        codes = torch.clamp(torch.floor(w.detach() / self.step) + self.h() + self.zero_point, qmin, qmax)
        return (codes - self.zero_point) * self.step

    def harden(self) -> AdaRoundWeights:
        """Make every rounding decision final (``V >= 0`` rounds up); returns ``self``."""
        self.hard = True
        self.alpha.requires_grad_(False)
        return self

    @torch.no_grad()
    def undecided(self, tolerance: float = 0.01) -> float:
        """The fraction of soft decisions farther than ``tolerance`` from 0 and from 1."""
        h = rectified_sigmoid(self.alpha)
        return float(((h > tolerance) & (h < 1 - tolerance)).double().mean())

    @torch.no_grad()
    def codes(self, weight: torch.Tensor, hard: bool = True) -> torch.Tensor:
        """The integer codes of ``weight``: with the decisions made hard (``V >= 0``), or, with
        ``hard=False``, round-to-nearest on the same grid (what AdaRound starts from)."""
        qmin, qmax = self.code_range
        scaled = weight.detach() / self.step
        chosen = torch.floor(scaled) + (self.alpha >= 0).to(scaled.dtype) if hard else torch.round(scaled)
        return torch.clamp(chosen + self.zero_point, qmin, qmax)

    @torch.no_grad()
    def rounded_away(self, weight: torch.Tensor) -> float:
        """The fraction of weights whose hard decision is not the nearest level."""
        return float((self.codes(weight) != self.codes(weight, hard=False)).double().mean())

    def qparams(self) -> QuantParams:
        return self._qparams

    def extra_repr(self):
        return f"{super().extra_repr()}, hard={self.hard}"
