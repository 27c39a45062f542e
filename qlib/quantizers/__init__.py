"""Quantizers: one module interface for every quantization method in the book.

A quantizer is a ``torch.nn.Module`` whose ``forward(x)`` returns the fake-quantized float
tensor with the method's own gradient, and which reports what the integer engine needs:

* ``bits`` and ``signed``;
* :meth:`Quantizer.levels`: the real values it can output (for plots and tests);
* :meth:`Quantizer.qparams`: scale and zero-point as :class:`qlib.affine.QuantParams`, for
  uniform quantizers (export to :mod:`qlib.engine`).

Methods: :class:`RangeFakeQuantizer` (Jacob et al.'s min/max or moving-average ranges with the
straight-through estimator), :class:`PACT` (learned activation clipping), :class:`LSQ` (learned
step size) and :class:`LSQPlus` (learned step and offset); :func:`mse_clip_range` initialises
the learned ranges.
"""

from .base import Quantizer
from .uniform import LSQ, PACT, LSQPlus, RangeFakeQuantizer, mse_clip_range, round_ste, scale_gradient

__all__ = ["Quantizer", "RangeFakeQuantizer", "PACT", "LSQ", "LSQPlus", "mse_clip_range", "round_ste",
           "scale_gradient"]
