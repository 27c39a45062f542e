"""The post-training toolbox before reconstruction (Nagel et al. 2019; 2021, sec. 3).

* :func:`qlib.ptq.equalize` - cross-layer equalization: for a layer followed by a ReLU and another layer,
  scale output channel ``i`` of the first by ``1 / s_i`` and input channel ``i`` of the second by
  ``s_i``. ``ReLU(x / s) = ReLU(x) / s`` for ``s > 0``, so the network computes exactly the same
  function; with ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: the largest ``|w|`` of output channel ``i``
  of the first layer, ``r2_i``: of input channel ``i`` of the second) both channels end with the
  range ``sqrt(r1_i r2_i)``, which is what a per-tensor weight grid needs.
* :func:`qlib.ptq.correct_bias` - bias correction: quantized weights shift each output channel's mean by
  ``E[(W_hat - W) x]``; measured on calibration data and subtracted from the bias.
* :func:`qlib.ptq.reestimate_batchnorm` - batch-norm re-estimation: the running statistics measured again
  with the quantized weights and activations, for networks that keep their batch norms until
  conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._checks import check_int
from ..fold import fold_batchnorm
from ..qat import QuantLayer, quantized_layers

__all__ = ["equalization_pairs", "equalize", "correct_bias", "reestimate_batchnorm"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PASS = (nn.Identity, nn.Dropout)


def _single_user(node, modules):
    """The one node that uses ``node``'s output (looking through identities), or None."""
    users = list(node.users)
    while len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _PASS):
        users = list(users[0].users)
    return users[0] if len(users) == 1 else None


def equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(first, second)`` layer names where ``first``'s output reaches only a ReLU whose output reaches
    only ``second`` (batch norms must be folded first). Depthwise layers count: their channel ``i``
    is both an input and an output channel."""
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS):
            continue
        relu = _single_user(node, modules)
        if relu is None or relu.op != "call_module" or type(modules[relu.target]) is not nn.ReLU:
            continue
        second = _single_user(relu, modules)
        if second is not None and second.op == "call_module" and isinstance(modules[second.target], _LAYERS):
            if _in_channel_view(modules[second.target]) is not None and _groups_ok(modules[node.target]):
                pairs.append((node.target, second.target))
    return pairs


def _groups_ok(layer):
    return isinstance(layer, nn.Linear) or layer.groups in (1, layer.in_channels)


def _in_channel_view(layer):
    """A function giving the weights of ``layer`` grouped by input channel (``(C_in, -1)``), or None."""
    if isinstance(layer, nn.Linear) or layer.groups == 1:
        return lambda w: w.transpose(0, 1).reshape(w.shape[1], -1)
    if layer.groups == layer.in_channels == layer.out_channels:  # depthwise: channel i sees input i only
        return lambda w: w.reshape(w.shape[0], -1)
    return None


def _scale_input_channels(layer, s):
    shape = [1] * layer.weight.ndim
    if isinstance(layer, nn.Linear) or layer.groups == 1:
        shape[1] = -1
    else:
        shape[0] = -1
    layer.weight.mul_(s.reshape(shape))


@torch.no_grad()
def equalize(model: nn.Module, sweeps: int = 4) -> nn.Module:
    """A batch-norm-folded copy of ``model`` with cross-layer equalization applied ``sweeps`` times over
    every pair of :func:`equalization_pairs` (a chain of layers converges over a few sweeps).

    The copy computes the same function (up to float rounding); only the weight ranges change.
    """
    sweeps = check_int(sweeps, "sweeps", 1)
    folded = fold_batchnorm(model)
    if any(isinstance(m, QuantLayer) for m in folded.modules()):
        raise ValueError("equalize works on float models: equalize first, then prepare or quantize")
    pairs = equalization_pairs(folded)
    for _ in range(sweeps):
        for first_name, second_name in pairs:
            first, second = folded.get_submodule(first_name), folded.get_submodule(second_name)
            r1 = first.weight.reshape(first.weight.shape[0], -1).abs().amax(dim=1)
            r2 = _in_channel_view(second)(second.weight).abs().amax(dim=1)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-12)), torch.ones_like(r1))
            first.weight.div_(s.reshape(-1, *[1] * (first.weight.ndim - 1)))
            if first.bias is not None:
                first.bias.div_(s)
            _scale_input_channels(second, s)
    return folded


def _batches(batches):
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


def _layer_inputs(model, name, batches):
    """The (quantized) inputs the layer ``name`` computes with, over ``batches``."""
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m._quantize_input(args[0]).detach()))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def _linear_part(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


@torch.no_grad()
def correct_bias(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Empirical bias correction of a quantized model (made by :func:`qlib.qat.prepare` and calibrated, batch
    norms folded), in place: layer by layer in order, the mean shift its quantized weights cause,
    ``mean((W_hat - W) x_hat)`` per output channel over ``batches`` (``x_hat``: the layer's own
    quantized input in the model corrected so far), is subtracted from its bias.

    Returns ``{layer name: the shift removed}``. The first and last layers are corrected too.
    """
    batches = _batches(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: prepare() it first")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms or not all(isinstance(layer, QuantLayer) for _, layer in layers):
        found = norms[0] if norms else "QuantConvBn"
        raise ValueError(f"fold the batch norms before quantizing to correct biases (found {found!r})")
    model.eval()
    shifts = {}
    for name, layer in layers:
        x = _layer_inputs(model, name, batches)
        error = layer.quantized_weight() - layer.weight
        out = _linear_part(layer, x, error)
        shift = out.mean(dim=[d for d in range(out.ndim) if d != 1])
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias.sub_(shift)
        shifts[name] = shift
    return shifts


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Measure every batch norm's running mean and variance again on ``batches``, with the network's
    quantizers as they are (frozen, in eval mode): the statistics the quantized network actually
    produces. In place; returns ``model`` in eval mode."""
    batches = _batches(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("model has no batch norm to re-estimate (are they folded?)")
    model.eval()
    saved = [(m.momentum,) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
        m.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, (momentum,) in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return model
