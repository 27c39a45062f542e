"""Quantizers: a grid and a rounding gradient, chosen independently (chapters 5 to 8).

A quantizer is a ``torch.nn.Module`` whose ``forward(x)`` returns the fake-quantized float tensor
with the method's own gradient, and which exports what the integer engine needs
(:meth:`Quantizer.export`: integer codes with their scale and zero-point; :meth:`Quantizer.qparams`
for uniform grids). See :mod:`qlib.quantizers.base` for the two halves.

Grids: :class:`RangeFakeQuantizer` (Jacob et al.'s observed min/max or moving-average ranges),
:class:`PACT` (learned activation clip), :class:`LSQ` (learned step), :class:`LSQPlus` (learned
step and offset), :class:`APoT` (power-of-two and additive power-of-two levels, chapter 8).
Roundings: :class:`STE`, :class:`DSQ`, :class:`DAQ`, :class:`EWGS` (chapter 7). Any grid takes any
rounding: ``APoT(2, rounding=EWGS())``. :func:`make_quantizer` builds them by name
(``"apot+ewgs"``); :func:`mse_clip_range` and :func:`least_squares_fraction` are the one
least-squared-error clip search.
"""

from .apot import (APOT_BITS, APoT, apot_levels, grid_codes, local_gap, pot_levels, uniform_levels,
                   zero_free_levels)
from .approx import DAQ, DSQ, daq_soft_round, daq_unit, dsq_round
from .base import STE, Exported, Quantizer, Rounding, enclosing_levels, nearest_level, round_ste, scale_gradient
from .clip import clip_errors, least_squares_fraction, mse_clip_range, mse_step
from .ewgs import EWGS, EWGSSchedule, estimate_ewgs_deltas, ewgs_discretize, ewgs_quantizers
from .registry import GRIDS, ROUNDINGS, make_quantizer, method_names, parse_method
from .uniform import LSQ, PACT, LSQPlus, RangeFakeQuantizer

__all__ = ["Quantizer", "Rounding", "Exported", "STE", "DSQ", "DAQ", "EWGS", "RangeFakeQuantizer", "PACT", "LSQ",
           "LSQPlus", "APoT", "make_quantizer", "parse_method", "method_names", "GRIDS", "ROUNDINGS",
           "mse_clip_range", "mse_step", "least_squares_fraction", "clip_errors", "round_ste", "scale_gradient", "dsq_round",
           "daq_soft_round", "daq_unit", "ewgs_discretize", "ewgs_quantizers", "estimate_ewgs_deltas",
           "EWGSSchedule", "apot_levels", "pot_levels", "uniform_levels", "zero_free_levels", "grid_codes", "nearest_level",
           "enclosing_levels", "local_gap", "APOT_BITS"]
