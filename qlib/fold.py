"""Batch-norm folding for inference.

In eval mode a batch norm after a convolution is an affine map per output channel,
``y = gamma (x - mu) / sqrt(var + eps) + beta``, so it can be merged into the convolution
(Jacob et al. 2018, sec. 3.2)::

    W_fold = W * gamma / sqrt(var + eps)            (per output channel)
    b_fold = beta + (b - mu) * gamma / sqrt(var + eps)

The folded weights are what an integer engine actually quantizes, and folding is what makes
channel ranges so uneven: a channel whose batch norm has a large ``gamma / sigma`` gets
large weights. The arithmetic is PyTorch's own ``fuse_conv_bn_eval``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_batchnorm(model: nn.Module, return_factors: bool = False):
    """A copy of ``model`` (in eval mode) with every batch norm folded into the convolution before it.

    A batch norm counts as "after" a convolution when it is the next child of the same
    parent module (``Sequential(conv, bn, relu)``, or ``conv1`` then ``bn1`` in a block);
    it is replaced by ``nn.Identity``. A batch norm that follows no convolution raises
    ``ValueError``, since leaving it in float would break an integer-only network.

    With ``return_factors=True`` also returns ``{conv name: gamma / sqrt(var + eps)}``, the
    per-channel factor each folded convolution's weights were multiplied by.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    factors = {}
    for parent_name, parent in folded.named_modules():
        if getattr(parent, "folds_batchnorm_in_training", False):
            continue  # qlib.qat.QuantConvBn folds its own batch norm
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, _NORMS):
                continue
            previous = children[i - 1][1] if i > 0 else None
            if not isinstance(previous, _CONVS):
                where = f"{parent_name}.{name}" if parent_name else name
                raise ValueError(f"batch norm {where!r} does not follow a convolution; cannot fold it")
            setattr(parent, children[i - 1][0], fuse_conv_bn_eval(previous, child))
            setattr(parent, name, nn.Identity())
            conv_name = f"{parent_name}.{children[i - 1][0]}" if parent_name else children[i - 1][0]
            factors[conv_name] = (child.weight / torch.sqrt(child.running_var + child.eps)).detach()
    return (folded, factors) if return_factors else folded
