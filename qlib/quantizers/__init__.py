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
the learned ranges (chapters 5 and 6). :class:`DSQ`, :class:`DAQ` and :class:`EWGS` keep LSQ's
grid and replace the straight-through gradient of its rounding (chapter 7); :class:`APoT`
quantizes onto power-of-two and additive power-of-two levels (chapter 8).
"""

from .apot import APoT, apot_levels, grid_codes, local_gap, nearest_level, pot_levels, uniform_levels
from .approx import DAQ, DSQ, daq_soft_round, dsq_round
from .base import Quantizer
from .ewgs import EWGS, EWGSMixin, EWGSSchedule, estimate_ewgs_deltas, ewgs_discretize, ewgs_quantizers
from .uniform import LSQ, PACT, LSQPlus, RangeFakeQuantizer, mse_clip_range, round_ste, scale_gradient

__all__ = ["Quantizer", "RangeFakeQuantizer", "PACT", "LSQ", "LSQPlus", "mse_clip_range", "round_ste",
           "scale_gradient", "DSQ", "DAQ", "dsq_round", "daq_soft_round", "EWGS", "EWGSMixin", "EWGSSchedule",
           "estimate_ewgs_deltas", "ewgs_discretize", "ewgs_quantizers", "APoT", "apot_levels", "pot_levels",
           "uniform_levels", "grid_codes", "nearest_level", "local_gap"]
