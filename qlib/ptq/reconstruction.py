"""Reconstruction: learn the rounding (and the activation steps) unit by unit, from calibration data.

A *unit* is a piece of the network run as one: a layer (AdaRound, Nagel et al. 2020) or a block
(BRECQ, Li et al. 2021). Units are reconstructed in order. For each, the float network gives the
target (the unit's float output on float input, ``y``) and the quantized network, with every
earlier unit already reconstructed, gives the input (``x_hat``); the unit's weights switch to
:class:`qlib.ptq.AdaRoundWeights` and their rounding decisions ``V`` minimise::

    || f_q(x_hat) - y ||^2  (weighted by the Fisher diagonal for BRECQ)  +  lambda sum(1 - |2h(V) - 1|^beta)

with the squared error summed over channels and averaged over examples and positions (as the
official code does), ``beta`` annealed by :class:`qlib.ptq.BetaSchedule`. Then every
decision is made hard, and the next unit starts. Options: the activation quantizers' steps of the
unit's layers learn jointly (``act_lr``), and QDrop (Wei et al. 2022): during reconstruction each
activation element is quantized only with probability ``drop`` and left in float otherwise.

Where this differs from the official code (BRECQ's and QDrop's repositories), by choice:

* activations are quantized at each layer's input (as everywhere in qlib), not at block outputs;
  QDrop's drop therefore applies at the unit's layer inputs, and a dropped element keeps the
  value the quantized network computed for it (earlier units' errors included);
* the Fisher weights follow the paper: squared gradients of the float network's cross-entropy
  with the true labels at the unit's output, one per example and element, scaled to mean 1 per
  unit so that ``lambda`` means the same as with the plain squared error (the code instead uses
  the gradient of a KL divergence to the float output in the partly quantized network, plus 1).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float, check_int
from ..models import BasicBlock
from ..qat import QuantLayer, quantized_layers
from .adaround import AdaRoundWeights, BetaSchedule, rounding_regularizer

__all__ = ["Unit", "layer_units", "block_units", "capture", "fisher_weights", "reconstruction_error",
           "Reconstruction", "reconstruct", "soft_rounding", "adaround_quantizers", "DropQuantization"]

_TRAILING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class Unit:
    """Consecutive sibling modules run as one piece: ``names`` in execution order."""

    names: tuple[str, ...]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = model.get_submodule(name)(x)
        return x

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The quantized layers inside the unit, in order."""
        found = []
        for name in self.names:
            module = model.get_submodule(name)
            if isinstance(module, QuantLayer):
                found.append((name, module))
            found += [(f"{name}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, QuantLayer)]
        return found

    def __str__(self):
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]}..{self.names[-1].rsplit('.', 1)[-1]}"


def _parent_and_child(model, name):
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def layer_units(model: nn.Module) -> list[Unit]:
    """One unit per quantized layer (AdaRound's granularity): the layer with the batch norm and
    activation right after it, or the ``Sequential`` that holds only that layer and those."""
    units = []
    for name, layer in quantized_layers(model):
        parent, child = _parent_and_child(model, name)
        siblings = list(parent.named_children())
        if isinstance(parent, nn.Sequential) and parent is not model and all(
                m is layer or isinstance(m, _TRAILING) for _, m in siblings):
            units.append(Unit((name.rpartition(".")[0],)))
            continue
        prefix = name.rpartition(".")[0]
        index = [n for n, _ in siblings].index(child)
        names = [name]
        for n, m in siblings[index + 1:]:
            if not isinstance(m, _TRAILING):
                break
            names.append(f"{prefix}.{n}" if prefix else n)
        units.append(Unit(tuple(names)))
    return units


def block_units(model: nn.Module) -> list[Unit]:
    """BRECQ's granularity: every residual block (:class:`qlib.models.BasicBlock`) is one unit; in a
    plain chain a depthwise layer and the pointwise layer after it (a MobileNet block) are one;
    every other layer is a unit of its own (:func:`layer_units`)."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, BasicBlock)]
    units = []
    for unit in layer_units(model):
        block = next((b for b in blocks if unit.names[0].startswith(b + ".")), None)
        if block is not None:
            if not units or units[-1].names != (block,):
                units.append(Unit((block,)))
            continue
        if units and _is_depthwise_unit(model, units[-1]) and _siblings(units[-1].names[-1], unit.names[0]):
            units[-1] = Unit(units[-1].names + unit.names)
            continue
        units.append(unit)
    return units


def _is_depthwise_unit(model, unit):
    layers = unit.layers(model)
    if len(layers) != 1 or len(unit.names) != 1:
        return False
    layer = layers[0][1]
    return isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == layer.in_channels > 1


def _siblings(a, b):
    return a.rpartition(".")[0] == b.rpartition(".")[0]


@torch.no_grad()
def capture(model: nn.Module, unit: Unit, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, output)`` of ``unit`` when ``model`` runs on ``x`` (in eval mode, in batches)."""
    first, last = model.get_submodule(unit.names[0]), model.get_submodule(unit.names[-1])
    inputs, outputs = [], []
    handles = [first.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())),
               last.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(inputs), torch.cat(outputs)


def fisher_weights(model: nn.Module, units: list[Unit], x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   normalize: bool = True, damping: float = 0.0) -> list[torch.Tensor]:
    """The diagonal Fisher weights of every unit's output: ``(d loss_n / d z)^2`` for each example ``n``
    and element of the unit's output ``z``, where ``loss_n`` is the float ``model``'s cross-entropy on
    example ``n`` with its label (eval mode, so examples do not interact). ``normalize`` scales
    each unit's weights to mean 1; ``damping`` then mixes in the plain squared error,
    ``(F + damping) / (1 + damping)`` (mean still 1): a trained network is confident on most
    examples, so the undamped weights rest on the few it is unsure of."""
    damping = check_float(damping, "damping", 0.0)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    was_training = model.training
    model.eval()
    grads = [[] for _ in units]
    for start in range(0, len(x), batch_size):
        outputs = []

        def keep(m, args, out):
            out.retain_grad()
            outputs.append(out)

        handles = [model.get_submodule(u.names[-1]).register_forward_hook(keep) for u in units]
        try:
            logits = model(x[start:start + batch_size])
        finally:
            for h in handles:
                h.remove()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y[start:start + batch_size], reduction="sum").backward()
        for i, out in enumerate(outputs):
            grads[i].append(out.grad.detach() ** 2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    weights = [torch.cat(g) for g in grads]
    if not normalize:
        return weights
    return [(w / w.mean().clamp(min=1e-30) + damping) / (1 + damping) for w in weights]


def reconstruction_error(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum over channels of weight * (pred - target)^2``, averaged over examples and positions."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    squared = (pred - target) ** 2
    if weight is not None:
        squared = squared * weight
    return squared.sum(dim=1).mean()


class DropQuantization(nn.Module):
    """QDrop's randomly dropped quantization: each element of ``quantizer(x)`` is kept with probability
    ``keep`` and replaced by ``x`` itself (float) otherwise; a fresh draw on every call."""

    def __init__(self, quantizer: nn.Module, keep: float, generator: torch.Generator):
        super().__init__()
        self.quantizer, self.keep, self.generator = quantizer, check_float(keep, "keep", 0.0, 1.0), generator

    def forward(self, x):
        mask = torch.rand(x.shape, generator=self.generator, device=x.device) < self.keep
        return torch.where(mask, self.quantizer(x), x)


@dataclass(frozen=True)
class Reconstruction:
    """How :func:`reconstruct` learns: ``granularity`` ``"layer"`` (AdaRound) or ``"block"`` (BRECQ),
    ``loss`` ``"mse"`` or ``"fisher"``, ``iterations`` per unit of Adam at ``lr`` on ``V`` with
    random batches of ``batch_size`` calibration examples, the regulariser weight ``lam`` and
    ``beta`` schedule (``warmup``, ``beta_start`` to ``beta_end``), activation steps learned jointly
    at ``act_lr`` with a cosine decay (``None``: left as calibrated), and QDrop's ``drop`` (the
    probability that an activation element is quantized during reconstruction; ``None``: always);
    ``fisher_damping`` as in :func:`fisher_weights`."""

    granularity: str = "layer"
    loss: str = "mse"
    iterations: int = 2000
    batch_size: int = 32
    lam: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    lr: float = 1e-3
    act_lr: float | None = None
    drop: float | None = None
    fisher_damping: float = 0.0

    GRANULARITIES = ("layer", "block")
    LOSSES = ("mse", "fisher")

    def __post_init__(self):
        check_choice(self.granularity, "granularity", self.GRANULARITIES)
        check_choice(self.loss, "loss", self.LOSSES)
        check_int(self.iterations, "iterations", 0)
        check_int(self.batch_size, "batch_size", 1)
        check_float(self.lam, "lam", 0.0)
        check_float(self.lr, "lr", 0.0, low_open=True)
        if self.act_lr is not None:
            check_float(self.act_lr, "act_lr", 0.0, low_open=True)
        if self.drop is not None:
            check_float(self.drop, "drop", 0.0, 1.0)
        check_float(self.fisher_damping, "fisher_damping", 0.0)
        if self.iterations:
            BetaSchedule(self.iterations, self.warmup, self.beta_start, self.beta_end)

    def units(self, model: nn.Module) -> list[Unit]:
        return layer_units(model) if self.granularity == "layer" else block_units(model)


def adaround_quantizers(model: nn.Module) -> dict[str, AdaRoundWeights]:
    """The learned-rounding weight quantizers of ``model`` by layer name."""
    return {n: m.weight_quantizer for n, m in quantized_layers(model)
            if isinstance(getattr(m, "weight_quantizer", None), AdaRoundWeights)}


@contextmanager
def soft_rounding(model: nn.Module):
    """Inside the block, every :class:`AdaRoundWeights` of ``model`` uses its soft ``h(V)`` again
    (to measure what making the decisions hard cost)."""
    quantizers = list(adaround_quantizers(model).values())
    states = [q.hard for q in quantizers]
    for q in quantizers:
        q.hard = False
    try:
        yield model
    finally:
        for q, state in zip(quantizers, states):
            q.hard = state


def reconstruct(model: nn.Module, float_model: nn.Module, x: torch.Tensor, config: Reconstruction,
                labels: torch.Tensor | None = None, seed: int = 0, snapshots: int = 0) -> dict:
    """Reconstruct a calibrated quantized ``model`` (:func:`qlib.ptq.round_to_nearest`) unit by unit, in
    place, so that it matches ``float_model`` (the float network it was quantized from, batch norms
    folded the same way) on the calibration inputs ``x`` (``labels`` needed for the Fisher loss).

    Returns a log: per unit its name, the loss per iteration (reconstruction and regulariser), the
    seconds it took, and per layer the fraction of decisions still undecided before they were made
    hard (``h`` farther than 0.01 from 0 and 1), the fraction rounded away from nearest and, with
    ``snapshots > 0``, that many histograms' worth of ``h`` samples of the unit's first layer.
    """
    if not isinstance(config, Reconstruction):
        raise TypeError(f"config must be a qlib.ptq.Reconstruction, got {type(config).__name__}")
    if config.loss == "fisher" and labels is None:
        raise ValueError("the Fisher loss needs the calibration labels")
    if not quantized_layers(model):
        raise ValueError("model has no quantized layers: quantize it first (qlib.ptq.round_to_nearest)")
    x = x.detach()
    units = config.units(model)
    generator = torch.Generator().manual_seed(seed)
    float_model = float_model.eval()
    model.eval()
    fisher = (fisher_weights(float_model, units, x, labels, damping=config.fisher_damping)
              if config.loss == "fisher" else [None] * len(units))
    log = {"units": []}
    for unit, weight in zip(units, fisher):
        start = time.perf_counter()
        _, target = capture(float_model, unit, x)
        x_hat, _ = capture(model, unit, x)
        layers = unit.layers(model)
        for _, layer in layers:
            if not isinstance(layer.weight_quantizer, AdaRoundWeights):
                layer.weight_quantizer = AdaRoundWeights(layer.weight_quantizer, layer.weight)
        entry = _reconstruct_unit(model, unit, layers, x_hat, target, weight, config, generator, snapshots)
        entry["seconds"] = time.perf_counter() - start
        log["units"].append(entry)
    return log


def _reconstruct_unit(model, unit, layers, x_hat, target, weight, config, generator, snapshots):
    quantizers = [layer.weight_quantizer for _, layer in layers]
    for _, layer in layers:
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
    act_params = []
    if config.act_lr is not None:
        act_params = [p for _, layer in layers if layer.input_quantizer is not None
                      for p in layer.input_quantizer.parameters()]
        for p in act_params:
            p.requires_grad_(True)
    dropped = []
    if config.drop is not None:
        for _, layer in layers:
            if layer.input_quantizer is not None:
                dropped.append((layer, layer.input_quantizer))
                layer.input_quantizer = DropQuantization(layer.input_quantizer, config.drop, generator)
    entry = {"unit": str(unit), "layers": [n for n, _ in layers], "loss": [], "regularizer": [], "h": []}
    try:
        if config.iterations:
            # fused: one kernel per step instead of a dozen small ones (the loop is overhead-bound)
            optimizer = torch.optim.Adam([q.alpha for q in quantizers], lr=config.lr, fused=True)
            act_optimizer = torch.optim.Adam(act_params, lr=config.act_lr, fused=True) if act_params else None
            act_schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, config.iterations)
                            if act_optimizer else None)
            schedule = BetaSchedule(config.iterations, config.warmup, config.beta_start, config.beta_end)
            last = config.iterations - 1
            marks = {round(i * last / max(1, snapshots - 1)) for i in range(snapshots)}  # first to last
            for it in range(config.iterations):
                index = torch.randint(len(x_hat), (config.batch_size,), generator=generator)
                out = unit(model, x_hat[index])
                loss = reconstruction_error(out, target[index], None if weight is None else weight[index])
                reg = torch.zeros(())
                if schedule.regularized(it) and config.lam > 0:
                    beta = schedule.beta(it)
                    reg = config.lam * sum(rounding_regularizer(q.h(), beta) for q in quantizers)
                optimizer.zero_grad(set_to_none=True)
                if act_optimizer:
                    act_optimizer.zero_grad(set_to_none=True)
                (loss + reg).backward()
                optimizer.step()
                if act_optimizer:
                    act_optimizer.step()
                    act_schedule.step()
                entry["loss"].append(float(loss.detach()))
                entry["regularizer"].append(float(reg.detach()))
                if it in marks:
                    entry["h"].append((it, quantizers[0].h().detach().flatten().clone()))
    finally:
        for layer, quantizer in dropped:
            layer.input_quantizer = quantizer
        for p in act_params:
            p.grad = None
            p.requires_grad_(False)
    entry["undecided"] = [q.undecided() for q in quantizers]
    for q in quantizers:
        q.harden()
    entry["rounded_away"] = [q.rounded_away(layer.weight) for q, (_, layer) in zip(quantizers, layers)]
    return entry
