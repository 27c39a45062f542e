"""Post-training quantization (chapter 9): how far a trained network gets without retraining.

* :func:`round_to_nearest` - the starting point: batch norms folded, per-channel weights on the
  least-squared-error grid (:func:`qlib.quantizers.mse_step`), activations on LSQ+'s grid started
  at their least-squared-error range (chapter 2's best calibration), nothing trained;
* :mod:`qlib.ptq.toolbox` - cross-layer equalization, bias correction, batch-norm re-estimation;
* :mod:`qlib.ptq.adaround` - learned rounding (AdaRound): the rectified sigmoid, its regulariser
  and ``beta`` schedule, and the weight quantizer that ends as integer codes;
* :mod:`qlib.ptq.reconstruction` - reconstruction unit by unit: layer-wise (AdaRound), block-wise
  with Fisher weights (BRECQ), activation steps learned jointly, and QDrop's dropped quantization.

The result of every step is a model as :func:`qlib.qat.prepare` makes it, so
:func:`qlib.engine.convert` runs it in integers unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import qat
from .._checks import check_bool
from ..fold import fold_batchnorm
from ..quantizers import LSQ, LSQPlus
from .adaround import (AdaRoundWeights, BetaSchedule, inverse_rectified_sigmoid, rectified_sigmoid,
                       rounding_regularizer)
from .reconstruction import (DropQuantization, Reconstruction, Unit, adaround_quantizers, block_units, capture,
                          fisher_weights, layer_units, reconstruct, reconstruction_error, soft_rounding)
from .toolbox import correct_bias, equalization_pairs, equalize, reestimate_batchnorm

__all__ = ["round_to_nearest", "calibration_inputs", "AdaRoundWeights", "BetaSchedule", "rectified_sigmoid",
           "inverse_rectified_sigmoid", "rounding_regularizer", "Reconstruction", "reconstruct", "Unit",
           "layer_units", "block_units", "capture", "fisher_weights", "reconstruction_error", "soft_rounding",
           "adaround_quantizers", "DropQuantization", "equalize", "equalization_pairs", "correct_bias",
           "reestimate_batchnorm"]


def calibration_inputs(batches) -> torch.Tensor:
    """One tensor of the inputs of ``batches`` (tensors or ``(x, y)`` pairs)."""
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not xs:
        raise ValueError("calibration must hold at least one batch")
    return torch.cat(xs)


def round_to_nearest(model: nn.Module, calibration, bits: int = 4, act_bits: int | None = None,
                     first_last_bits: int | None = 8, per_channel: bool = True, fold: bool = True) -> nn.Module:
    """A quantized copy of the float ``model``, calibrated on ``calibration`` (batches of inputs) and
    otherwise untrained: batch norms folded (``fold=False`` keeps them, for
    :func:`qlib.ptq.reestimate_batchnorm`), weights rounded to nearest on a
    least-squared-error grid per output channel (``per_channel=False``: one per tensor),
    activations on an LSQ+ grid at their least-squared-error range over the whole calibration
    set. ``first_last_bits`` as in :func:`qlib.qat.prepare`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_bool(per_channel, "per_channel")
    x = calibration_inputs(calibration)
    base = fold_batchnorm(model) if check_bool(fold, "fold") else model
    axis = 0 if per_channel else None
    quantized = qat.prepare(base, weight=lambda b, m: LSQ(b, signed=True, axis=axis, init="mse"),
                            act=lambda b, signed: LSQPlus(b, signed=signed, init="mse"), bits=bits,
                            act_bits=act_bits, first_last_bits=first_last_bits, example_input=x[:256])
    qat.calibrate_quantizers(quantized, [x])
    for p in quantized.parameters():
        p.requires_grad_(False)
    return quantized.eval()
