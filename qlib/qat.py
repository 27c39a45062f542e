"""Quantization-aware training: quantized layers, ``prepare`` and calibration.

:func:`prepare` swaps every ``Conv1d``, ``Conv2d`` and ``Linear`` of a float model for a quantized
twin (:class:`QuantConv1d`, :class:`QuantConv2d`, :class:`QuantLinear`) that holds two quantizers
from :mod:`qlib.quantizers`: one for its weights and one for its input activations. The forward
pass then computes with fake-quantized weights and inputs, and the backward pass uses each
quantizer's own gradient, so that ordinary training adapts the network to its grid.

Weight and activation methods are named, a grid optionally ``+`` a rounding gradient (``"minmax"``,
``"jacob"``, ``"lsq"``, ``"pact"``, ``"lsq+"``, ``"lsq+dsq"``, ``"apot+ewgs"``, ...; see
:mod:`qlib.quantizers.registry`), or given as factories; the first and the last layer keep 8 bits
by default, as the papers do. :func:`calibrate_quantizers` sets the quantizers' ranges from data
(post-training quantization, or the start of QAT).
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bits, check_bool
from .quantizers import Quantizer, make_quantizer, method_names

__all__ = ["QuantLayer", "QuantConv1d", "QuantConv2d", "QuantLinear", "QuantConvBn", "prepare",
           "calibrate_quantizers", "set_quantization", "freeze_batchnorm_statistics", "quantized_layers",
           "WEIGHT_METHODS", "ACT_METHODS"]

#: Weight quantization methods known by name to :func:`prepare` (see :mod:`qlib.quantizers.registry`).
WEIGHT_METHODS = tuple(method_names("weight"))
#: Activation quantization methods known by name to :func:`prepare`.
ACT_METHODS = tuple(method_names("act"))


class QuantLayer:
    """A quantized layer: ``weight_quantizer`` (required) and ``input_quantizer`` (may be None).

    What :mod:`qlib.engine` reads from a prepared model: every ``QuantLayer`` and
    :class:`QuantConvBn` exports its weights with ``weight_quantizer.export(weight)`` and its input
    grid with ``input_quantizer.qparams()``.
    """

    def _attach(self, weight_q: Quantizer, input_q: Quantizer | None):
        for name, q in (("weight_quantizer", weight_q), ("input_quantizer", input_q)):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"{name} must be a qlib.quantizers.Quantizer, got {type(q).__name__}")
        self.weight_quantizer = weight_q
        self.input_quantizer = input_q

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x):
        return self.input_quantizer(x) if self.input_quantizer is not None else x


class QuantConv1d(QuantLayer, nn.Conv1d):
    """``Conv1d`` computing with fake-quantized weights and inputs."""

    def forward(self, x):
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``Conv2d`` computing with fake-quantized weights and inputs."""

    def forward(self, x):
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """``Linear`` computing with fake-quantized weights and inputs."""

    def forward(self, x):
        return F.linear(self._quantize_input(x), self.quantized_weight(), self.bias)


_TWINS = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


class QuantConvBn(nn.Module):
    """A convolution with its batch norm folded in *during* training (Jacob et al. 2018, sec. 3.2).

    At inference the batch norm is folded into the weights, so training should quantize the folded
    weights ``W gamma / sigma``, not ``W``. With the correction of Krishnamoorthi (2018, sec. 3.2.1):

    * the weights are folded with the *running* ``sigma`` and quantized: ``Wq = Q(W gamma / sigma)``;
    * in training, before the statistics are frozen, the batch statistics ``mu_B, sigma_B`` of
      ``conv(x, W)`` (an extra float convolution) normalise the output, and the factor
      ``sigma / sigma_B`` corrects the weights to what batch normalisation would have used:
      ``y = conv(x, Wq) sigma / sigma_B + beta - gamma mu_B / sigma_B`` (``mu_B`` of ``conv(x, W)``:
      batch normalisation cancels the convolution's own bias);
    * after :meth:`freeze_statistics` (late in training) the running statistics are used, exactly
      the folded network that inference runs: ``y = conv(x, Wq) + beta - gamma (mu - b) / sigma``.

    The running statistics are updated from the batch statistics like ``nn.BatchNorm`` does.
    """

    folds_batchnorm_in_training = True  # qlib.fold.fold_batchnorm leaves the pair inside alone

    def __init__(self, conv: nn.Module, bn: nn.Module, weight_q: Quantizer, input_q: Quantizer | None):
        super().__init__()
        if type(conv) not in (nn.Conv1d, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise TypeError("QuantConvBn needs a Conv1d/Conv2d and the BatchNorm1d/BatchNorm2d after it")
        self.conv, self.bn = copy.deepcopy(conv), copy.deepcopy(bn)
        for name, q in (("weight_quantizer", weight_q), ("input_quantizer", input_q)):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"{name} must be a qlib.quantizers.Quantizer, got {type(q).__name__}")
        self.weight_quantizer, self.input_quantizer = weight_q, input_q
        self.register_buffer("frozen", torch.tensor(False))

    def freeze_statistics(self, frozen: bool = True) -> QuantConvBn:
        """Stop updating (and start using) the running statistics."""
        self.frozen.fill_(check_bool(frozen, "frozen"))
        return self

    def _shape(self):
        return (1, -1) + (1,) * (self.conv.weight.ndim - 2)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded float weights and bias with the running statistics (what inference uses)."""
        bn, conv = self.bn, self.conv
        sigma = torch.sqrt(bn.running_var + bn.eps)
        factor = bn.weight / sigma
        weight = conv.weight * factor.reshape((-1,) + (1,) * (conv.weight.ndim - 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        return weight, bn.bias + (conv_bias - bn.running_mean) * factor

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.folded()[0])

    @torch.no_grad()
    def to_quantized_conv(self) -> nn.Module:
        """The inference form: a quantized convolution holding the folded weights and bias."""
        weight, bias = self.folded()
        conv = copy.deepcopy(self.conv)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias.detach().clone())
        return _quantized_twin(conv, copy.deepcopy(self.weight_quantizer), copy.deepcopy(self.input_quantizer))

    def forward(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bn, conv = self.bn, self.conv
        weight_q = self.quantized_weight()
        if not self.training or bool(self.frozen):
            return conv._conv_forward(x, weight_q, self.folded()[1])
        sigma_running = torch.sqrt(bn.running_var + bn.eps)  # the sigma the weights were folded with
        raw = conv._conv_forward(x, conv.weight, None)  # batch statistics of the float convolution
        dims = [0] + list(range(2, raw.ndim))
        mean, var = raw.mean(dims), raw.var(dims, unbiased=False)
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        with torch.no_grad():  # as nn.BatchNorm: the statistics of conv(x, W) + b, unbiased variance
            n = raw.numel() // raw.shape[1]
            bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * (mean + conv_bias).detach())
            bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * var.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked += 1
        sigma_batch = torch.sqrt(var + bn.eps)
        # batch normalisation subtracts the batch mean of conv(x, W) + b, so the conv bias cancels
        y = conv._conv_forward(x, weight_q, None) * (sigma_running.detach() / sigma_batch).reshape(self._shape())
        return y + (bn.bias - bn.weight * mean / sigma_batch).reshape(self._shape())


def _quantized_twin(module: nn.Module, weight_q: Quantizer, input_q: Quantizer | None) -> nn.Module:
    twin = _TWINS[type(module)].__new__(_TWINS[type(module)])
    twin.__dict__.update(copy.deepcopy(module).__dict__)  # same parameters, hyper-parameters and hooks
    twin._attach(weight_q, input_q)
    return twin


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized conv/linear layers (and conv + batch norm pairs) of a prepared model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLayer, QuantConvBn))]


def freeze_batchnorm_statistics(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Freeze (or unfreeze) the statistics of every :class:`QuantConvBn`, as Jacob et al. do late in training."""
    for m in model.modules():
        if isinstance(m, QuantConvBn):
            m.freeze_statistics(frozen)
    return model


def prepare(model: nn.Module, weight: str | Callable = "lsq", act: str | Callable = "lsq", bits: int = 4,
            act_bits: int | None = None, first_last_bits: int | None = 8, per_channel: bool = True,
            example_input: torch.Tensor | None = None, fold_bn: bool = False) -> nn.Module:
    """A copy of ``model`` whose conv and linear layers quantize their weights and inputs.

    Parameters
    ----------
    weight, act : str
        Method names, a grid optionally ``+`` a rounding gradient (``"lsq"``, ``"minmax"``,
        ``"apot+ewgs"``, ...; see :data:`WEIGHT_METHODS`, :data:`ACT_METHODS` and
        :mod:`qlib.quantizers.registry`), or instead factories ``weight(bits, module) -> Quantizer``
        and ``act(bits, signed) -> Quantizer``.
    bits, act_bits : int or Mapping
        Weight and activation bit widths (``act_bits`` defaults to ``bits``); for mixed precision
        a mapping from each layer's name to its width, which must name every conv and linear
        layer that ``first_last_bits`` does not set, and no other.
    first_last_bits : int or None
        Bit width of the first and last layer (weights and inputs); ``None`` treats them like
        the others.
    per_channel : bool
        One weight scale per output channel, for the grids that offer both.
    example_input : torch.Tensor, optional
        A batch used to find which layers see negative inputs (those get signed activation
        codes). Without it, only the first layer's input is taken as signed.
    fold_bn : bool
        Replace each convolution followed by a batch norm with a :class:`QuantConvBn` that
        trains with the folded, quantized weights (Jacob et al., sec. 3.2).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    act_bits = bits if act_bits is None else act_bits
    edge_bits = None if first_last_bits is None else check_bits(first_last_bits, "first_last_bits")
    check_bool(per_channel, "per_channel")
    for role, method in (("weight", weight), ("act", act)):
        if not callable(method):
            try:
                make_quantizer(method, 8, role)  # a bad name fails here, before any copying
            except (TypeError, ValueError) as error:
                raise type(error)(f"{role}: {error}") from None
    make_weight = weight if callable(weight) else (
        lambda b, m: make_quantizer(weight, b, "weight", per_channel=per_channel))
    make_act = act if callable(act) else (lambda b, signed: make_quantizer(act, b, "act", signed=signed))

    targets = [n for n, m in model.named_modules() if type(m) in _TWINS]
    if not targets:
        raise ValueError("model has no Conv1d, Conv2d or Linear layer to quantize")
    edges = {targets[0], targets[-1]} if edge_bits is not None else set()
    weight_bits = _layer_bits(bits, "bits", [n for n in targets if n not in edges])
    input_bits = _layer_bits(act_bits, "act_bits", [n for n in targets if n not in edges])
    prepared = copy.deepcopy(model)
    targets = [(n, prepared.get_submodule(n)) for n in targets]
    signed_inputs = _signed_inputs(prepared, targets, example_input)
    for name, module in targets:
        w_bits, a_bits = (edge_bits, edge_bits) if name in edges else (weight_bits[name], input_bits[name])
        weight_q, input_q = make_weight(w_bits, module), make_act(a_bits, signed_inputs[name])
        bn_name = _following_batchnorm(prepared, name) if check_bool(fold_bn, "fold_bn") else None
        if bn_name is not None:
            _set_submodule(prepared, name, QuantConvBn(module, prepared.get_submodule(bn_name), weight_q, input_q))
            _set_submodule(prepared, bn_name, nn.Identity())
        else:
            _set_submodule(prepared, name, _quantized_twin(module, weight_q, input_q))
    return prepared


def _layer_bits(bits, name: str, layers: list[str]) -> dict[str, int]:
    """One bit width per layer from an int (all alike) or a mapping that names exactly ``layers``."""
    if not isinstance(bits, Mapping):
        width = check_bits(bits, name)
        return {layer: width for layer in layers}
    missing, unknown = [n for n in layers if n not in bits], [n for n in bits if n not in layers]
    if missing or unknown:
        raise ValueError(f"{name} must give a width to exactly the layers {layers} (the first and last are "
                         f"first_last_bits' unless it is None); missing {missing}, not expected {unknown}")
    return {layer: check_bits(bits[layer], f"{name}[{layer!r}]") for layer in layers}


def _following_batchnorm(model: nn.Module, name: str) -> str | None:
    """The name of the batch norm that is the next sibling of the convolution ``name``, if any."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    children = list(parent.named_children())
    names = [n for n, _ in children]
    i = names.index(child)
    if isinstance(children[i][1], (nn.Conv1d, nn.Conv2d)) and i + 1 < len(children) and isinstance(
            children[i + 1][1], (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{parent_name}.{names[i + 1]}" if parent_name else names[i + 1]
    return None


def _signed_inputs(model, targets, example_input) -> dict[str, bool]:
    if example_input is None:
        return {name: i == 0 for i, (name, _) in enumerate(targets)}
    minima = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: minima.__setitem__(name, args[0].min().item()))
             for name, m in targets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input.to(_device(model)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {name: minima.get(name, 0.0) < 0 for name, _ in targets}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def calibrate_quantizers(model: nn.Module, batches) -> nn.Module:
    """Set the quantizers' ranges from data without training (post-training quantization).

    The network stays in eval mode (batch norms use their running statistics) while the
    quantizers observe ``batches`` as in training; LSQ/LSQ+ initialise their steps on the first
    batch. Returns ``model``.
    """
    model.eval()
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    if not quantizers:
        raise ValueError("model has no quantizers: prepare() it first")
    for q in quantizers:
        q.train()
    seen = False
    device = _device(model)
    for batch in batches:
        model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
        seen = True
    model.eval()
    if not seen:
        raise ValueError("batches was empty")
    return model


def set_quantization(model: nn.Module, weights: bool | None = None, activations: bool | None = None) -> nn.Module:
    """Switch weight and/or activation quantizers on or off (e.g. to delay activation quantization)."""
    for _, layer in quantized_layers(model):
        if weights is not None:
            layer.weight_quantizer.enabled = check_bool(weights, "weights")
        if activations is not None and layer.input_quantizer is not None:
            layer.input_quantizer.enabled = check_bool(activations, "activations")
    return model
