"""The quantizer interface shared by every method."""

from __future__ import annotations

import abc

import torch
from torch import nn

from .._checks import check_bits, check_bool
from ..affine import QuantParams, qrange


class Quantizer(nn.Module, abc.ABC):
    """Base class: fake quantization in ``forward``, and the parameters the engine needs.

    ``enabled=False`` makes the quantizer the identity (used to delay activation quantization
    until the network has settled, as Jacob et al. do).
    """

    def __init__(self, bits: int, signed: bool):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = check_bool(signed, "signed")
        self.enabled = True

    @property
    def code_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the integer codes."""
        return qrange(self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating torch tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        return self.quantize(x) if self.enabled else x

    @abc.abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (differentiably, with the method's gradient)."""

    @abc.abstractmethod
    def qparams(self) -> QuantParams:
        """Scale and zero-point of the current grid (uniform quantizers)."""

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """The real values the quantizer can output (per-tensor grids), ascending."""
        qp = self.qparams()
        return torch.from_numpy(qp.levels())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"
