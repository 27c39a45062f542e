"""Layer sensitivity and bit allocation under a budget (chapter 10).

Layers are not equally hurt by quantization. Three ways to say how much, per layer ``i``:

* **measured**: quantize only layer ``i``'s weights to ``b`` bits, keep the rest in float, and
  record how much the validation loss rises and the accuracy falls (:func:`measured_sensitivity`);
* **HAWQ-V2** (Dong et al. 2020): the average Hessian trace ``Tr(H_i) / n_i`` of the loss with
  respect to the layer's ``n_i`` weights, by Hutchinson's estimator (:func:`hessian_traces`);
* **HAWQ-V3** (Yao et al. 2021): the second-order estimate of the loss increase,
  ``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` (:func:`omega`), which also depends on ``b``.

With a cost per layer and bit width, :func:`allocate_bits` chooses ``b_i`` from a set of widths to
minimise ``sum_i cost_i(b_i)`` subject to a size budget ``sum_i n_i b_i <= budget`` (and,
optionally, a BitOps budget ``sum_i MACs_i b_i a_i``): an integer linear program, solved exactly
by SciPy's ``milp`` (HiGHS). :func:`brute_force_allocation` enumerates every allocation, the check
on small networks. :func:`frontier` traces the optimum over a range of budgets (the Pareto
frontier of predicted cost against size), :func:`random_allocation` draws the control: a random
allocation of about the same size.

Weights are quantized as post-training quantization does (chapter 9): batch norms folded, one
least-squared-error step per output channel, round to nearest (:func:`quantize_weight`).
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bits, check_int
from .affine import qrange
from .hessian import hutchinson_trace
from .quantizers import mse_step
from .train import accuracy, predict

__all__ = ["weight_layers", "layer_sizes", "layer_macs", "quantize_weight", "weight_perturbations",
           "measured_sensitivity", "hessian_traces", "omega", "model_size_bits", "bit_operations",
           "Allocation", "allocate_bits", "brute_force_allocation", "frontier", "random_allocation",
           "rank_agreement"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s convolutions and linear layers, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    if not names:
        raise ValueError("model has no Conv1d, Conv2d or Linear layer")
    return names


def _layers(model, names):
    names = weight_layers(model) if names is None else list(names)
    if not names:
        raise ValueError("names must hold at least one layer")
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), _WEIGHTED):
            raise ValueError(f"{name!r} is not a Conv1d, Conv2d or Linear layer of the model")
    return names, modules


def layer_sizes(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, int]:
    """``n_i``: the number of weights of each layer (biases stay in 32 bits and are not counted)."""
    names, modules = _layers(model, names)
    return {n: modules[n].weight.numel() for n in names}


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, int]:
    """Multiply-accumulates of each layer for one example: output elements times the inputs each one
    sums over (``in_channels / groups * kernel size`` for a convolution, ``in_features`` for a
    linear layer), read off one forward pass of ``example_input`` (a batch; the count is per example)."""
    names, modules = _layers(model, names)
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 2:
        raise TypeError("example_input must be a batched torch.Tensor")
    macs = {}

    def hook(name):
        def record(module, args, out):
            per_output = (module.in_features if isinstance(module, nn.Linear)
                          else module.in_channels // module.groups * math.prod(module.kernel_size))
            macs[name] = out[0].numel() * per_output
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in macs]
    if missing:
        raise ValueError(f"layers {missing} did not run on example_input")
    return {n: macs[n] for n in names}


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(W)``: ``weight`` rounded to nearest on a signed, symmetric grid with one
    least-squared-error step per output channel (axis 0), as chapter 9's round-to-nearest does."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim < 1:
        raise TypeError("weight must be a floating-point torch.Tensor with an output-channel axis")
    qmin, qmax = qrange(check_bits(bits), True)
    w = weight.detach()
    step = mse_step(w, bits, signed=True, axis=0).reshape([-1] + [1] * (w.ndim - 1))
    return torch.clamp(torch.round(w / step), qmin, qmax) * step


def weight_perturbations(model: nn.Module, bits: Sequence[int], names: Sequence[str] | None = None
                         ) -> dict[str, dict[int, float]]:
    """``||Q_b(W_i) - W_i||^2`` for every layer and bit width (in float64)."""
    names, modules = _layers(model, names)
    bits = _check_choices(bits)
    out = {}
    for n in names:
        w = modules[n].weight.detach()
        out[n] = {b: float(((quantize_weight(w, b) - w).double() ** 2).sum()) for b in bits}
    return out


def _check_choices(bits):
    if isinstance(bits, (int, np.integer)):
        bits = [bits]
    bits = [check_bits(int(b), "bits") for b in bits]
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"bits must be distinct bit widths, at least one, got {bits}")
    return bits


def _check_data(x, y):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y) or len(x) == 0:
        raise ValueError("x and y must be non-empty tensors of the same length")


def _loss_and_accuracy(model, x, y):
    logits = predict(model, x)
    return float(F.cross_entropy(logits, y)), accuracy(logits, y)


def measured_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: Sequence[int],
                         names: Sequence[str] | None = None) -> list[dict]:
    """Quantize one layer's weights at a time (:func:`quantize_weight`), the rest in float, and
    measure the cross-entropy and accuracy (%) on ``x, y``. ``model`` should have its batch
    norms folded (:func:`qlib.fold.fold_batchnorm`), as deployment quantizes the folded weights.

    One row per layer and bit width: ``layer``, ``bits``, ``loss``, ``accuracy`` and their change
    from the float model, ``loss_increase`` and ``accuracy_drop`` (both positive when it hurts).
    """
    names, _ = _layers(model, names)
    bits = _check_choices(bits)
    _check_data(x, y)
    probe = copy.deepcopy(model).eval()
    modules = dict(probe.named_modules())
    float_loss, float_acc = _loss_and_accuracy(probe, x, y)
    rows = []
    for n in names:
        layer = modules[n]
        original = layer.weight.detach().clone()
        for b in bits:
            with torch.no_grad():
                layer.weight.copy_(quantize_weight(original, b))
            loss, acc = _loss_and_accuracy(probe, x, y)
            rows.append({"layer": n, "bits": b, "loss": loss, "accuracy": acc,
                         "loss_increase": loss - float_loss, "accuracy_drop": float_acc - acc})
        with torch.no_grad():
            layer.weight.copy_(original)
    return rows


def hessian_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str] | None = None,
                   max_probes: int = 200, tol: float = 1e-3, batch_size: int = 500,
                   generator: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    """HAWQ-V2's sensitivity: the trace of the Hessian of the mean cross-entropy on ``x, y`` with
    respect to each layer's weights, from the same Hutchinson probes for every layer
    (:func:`qlib.hessian.hutchinson_trace` with its stopping rule on the total), in eval mode.

    Returns per layer ``trace``, its ``std_error`` over the probes, ``n`` (weights), ``mean_trace``
    (``trace / n``, HAWQ-V2's number) and ``probes``. With more than ``batch_size`` examples the
    loss is taken over the first ``batch_size`` (one graph holds every example it uses).
    """
    names, modules = _layers(model, names)
    _check_data(x, y)
    batch_size = check_int(batch_size, "batch_size", 1)
    was_training = model.training
    model.eval()
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        loss = F.cross_entropy(model(x[:batch_size]), y[:batch_size])
        estimate = hutchinson_trace(loss, weights, max_probes=max_probes, tol=tol, generator=generator)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
    out = {}
    for n, w, trace, error in zip(names, weights, estimate.block_traces, estimate.block_std_errors):
        out[n] = {"trace": trace, "std_error": error, "n": w.numel(), "mean_trace": trace / w.numel(),
                  "probes": estimate.probes}
    return out


def omega(traces: Mapping[str, Mapping[str, float]], perturbations: Mapping[str, Mapping[int, float]]
          ) -> dict[str, dict[int, float]]:
    """HAWQ-V3's ``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` from :func:`hessian_traces` and
    :func:`weight_perturbations` (the same layers)."""
    if set(traces) != set(perturbations):
        raise ValueError(f"traces and perturbations must cover the same layers, got {sorted(traces)} and "
                         f"{sorted(perturbations)}")
    return {n: {b: traces[n]["mean_trace"] * d for b, d in perturbations[n].items()} for n in perturbations}


def model_size_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> int:
    """``sum_i n_i b_i``: the packed size of the weights in bits."""
    _same_layers(sizes, bits, "bits")
    return int(sum(sizes[n] * bits[n] for n in sizes))


def bit_operations(macs: Mapping[str, int], weight_bits: Mapping[str, int], act_bits: Mapping[str, int]) -> int:
    """BitOps: ``sum_i MACs_i * b_i * a_i`` (weight and input bit widths of each layer)."""
    _same_layers(macs, weight_bits, "weight_bits")
    _same_layers(macs, act_bits, "act_bits")
    return int(sum(macs[n] * weight_bits[n] * act_bits[n] for n in macs))


def _same_layers(reference, other, name):
    if set(reference) != set(other):
        raise ValueError(f"{name} must give every layer {sorted(reference)}, got {sorted(other)}")


@dataclass(frozen=True)
class Allocation:
    """A bit width per layer, what it costs (the objective), its size in bits and its BitOps (or
    ``None`` without MACs)."""

    bits: dict
    cost: float
    size: int
    bitops: int | None = None


def _problem(costs, sizes, size_budget, macs, act_bits, bitops_budget):
    if not costs:
        raise ValueError("costs must hold at least one layer")
    _same_layers(costs, sizes, "sizes")
    layers = list(costs)
    choices = sorted(costs[layers[0]])
    for n in layers:
        if sorted(costs[n]) != choices:
            raise ValueError(f"every layer needs a cost for the same bit widths {choices}; {n!r} has "
                             f"{sorted(costs[n])}")
        if not all(math.isfinite(c) for c in costs[n].values()):
            raise ValueError(f"costs of {n!r} must be finite, got {costs[n]}")
    for name, budget in (("size_budget", size_budget), ("bitops_budget", bitops_budget)):
        if budget is not None and not (isinstance(budget, numbers.Real) and budget >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {budget!r}")
    if (bitops_budget is None) != (macs is None) or (macs is None) != (act_bits is None):
        raise ValueError("a BitOps budget needs macs, act_bits and bitops_budget together")
    if macs is not None:
        _same_layers(costs, macs, "macs")
        _same_layers(costs, act_bits, "act_bits")
    smallest = sum(sizes[n] * choices[0] for n in layers)
    if size_budget is not None and size_budget < smallest:
        raise ValueError(f"size_budget {size_budget} is below the smallest allocation ({smallest} bits: "
                         f"every layer at {choices[0]})")
    if bitops_budget is not None:
        least = sum(macs[n] * choices[0] * act_bits[n] for n in layers)
        if bitops_budget < least:
            raise ValueError(f"bitops_budget {bitops_budget} is below the smallest allocation's ({least})")
    return layers, choices


def _allocation(layers, chosen, costs, sizes, macs, act_bits):
    bits = dict(zip(layers, chosen))
    return Allocation(bits, float(sum(costs[n][bits[n]] for n in layers)), model_size_bits(sizes, bits),
                      None if macs is None else bit_operations(macs, bits, act_bits))


def allocate_bits(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                  size_budget: float | None = None, macs: Mapping[str, int] | None = None,
                  act_bits: Mapping[str, int] | None = None, bitops_budget: float | None = None) -> Allocation:
    """The bit width per layer that minimises ``sum_i costs[i][b_i]`` subject to ``sum_i n_i b_i <=
    size_budget`` and (with ``macs`` and ``act_bits``) ``sum_i MACs_i b_i a_i <= bitops_budget``.

    An integer linear program in one binary ``x_ib`` per layer and width (``sum_b x_ib = 1``),
    solved to optimality by SciPy's ``milp`` (HiGHS branch and bound). ``costs`` maps each layer to
    its cost at every candidate width (e.g. :func:`omega`, or a measured loss increase).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, choices = _problem(costs, sizes, size_budget, macs, act_bits, bitops_budget)
    # sizes and BitOps are integers: an integer bound is the same constraint, and it keeps the
    # solver's feasibility tolerance from admitting an allocation a fraction of a bit too large
    size_budget = None if size_budget is None else math.floor(size_budget)
    bitops_budget = None if bitops_budget is None else math.floor(bitops_budget)
    L, B = len(layers), len(choices)
    c = np.array([costs[n][b] for n in layers for b in choices], dtype=np.float64)
    one_each = np.kron(np.eye(L), np.ones(B))
    constraints = [LinearConstraint(one_each, 1, 1)]
    if size_budget is not None:
        constraints.append(LinearConstraint(np.array([[sizes[n] * b for n in layers for b in choices]],
                                                     dtype=np.float64), -np.inf, size_budget))
    if bitops_budget is not None:
        constraints.append(LinearConstraint(
            np.array([[macs[n] * b * act_bits[n] for n in layers for b in choices]], dtype=np.float64),
            -np.inf, bitops_budget))
    result = milp(c, constraints=constraints, integrality=np.ones(L * B), bounds=Bounds(0, 1))
    if not result.success:
        raise ValueError(f"the integer program found no allocation: {result.message}")
    x = np.round(result.x).reshape(L, B)
    chosen = [choices[int(np.argmax(row))] for row in x]
    allocation = _allocation(layers, chosen, costs, sizes, macs, act_bits)
    if (size_budget is not None and allocation.size > size_budget) or (
            bitops_budget is not None and allocation.bitops > bitops_budget):
        raise ValueError(f"the solver returned an allocation over the budget: {allocation}")
    return allocation


def brute_force_allocation(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                           size_budget: float | None = None, macs: Mapping[str, int] | None = None,
                           act_bits: Mapping[str, int] | None = None,
                           bitops_budget: float | None = None) -> Allocation:
    """What :func:`allocate_bits` solves, by trying every allocation (``len(widths) ** layers`` of
    them, as one table in NumPy: for checking the solver on small networks; refused above a
    million)."""
    layers, choices = _problem(costs, sizes, size_budget, macs, act_bits, bitops_budget)
    if len(choices) ** len(layers) > 10**6:
        raise ValueError(f"{len(choices)}^{len(layers)} allocations are too many to enumerate")
    # row k of `index` is allocation k: the position of each layer's width in `choices`
    index = np.array(list(itertools.product(range(len(choices)), repeat=len(layers))), dtype=np.int64)
    widths = np.asarray(choices, dtype=np.int64)[index]
    cost_table = np.array([[costs[n][b] for b in choices] for n in layers], dtype=np.float64)
    total = cost_table[np.arange(len(layers)), index].sum(axis=1)
    feasible = np.ones(len(index), dtype=bool)
    if size_budget is not None:
        feasible &= widths @ np.array([sizes[n] for n in layers], dtype=np.int64) <= size_budget
    if bitops_budget is not None:
        per_bit = np.array([macs[n] * act_bits[n] for n in layers], dtype=np.int64)
        feasible &= widths @ per_bit <= bitops_budget
    best = int(np.flatnonzero(feasible)[np.argmin(total[feasible])])
    return _allocation(layers, [int(b) for b in widths[best]], costs, sizes, macs, act_bits)


def frontier(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
             budgets: Sequence[float]) -> list[Allocation]:
    """The optimal allocation (:func:`allocate_bits`) at each size budget, in order of size, each
    allocation once: the Pareto frontier of predicted cost against size (no allocation on it can be
    made smaller without costing more)."""
    budgets = sorted(float(b) for b in budgets)
    if not budgets:
        raise ValueError("budgets must hold at least one size budget")
    found = {}
    for budget in budgets:
        allocation = allocate_bits(costs, sizes, budget)
        found.setdefault(tuple(sorted(allocation.bits.items())), allocation)
    return sorted(found.values(), key=lambda a: (a.size, a.cost))


def random_allocation(sizes: Mapping[str, int], choices: Sequence[int], size_budget: float,
                      generator: np.random.Generator) -> dict[str, int]:
    """A bit width per layer drawn uniformly from every allocation whose size is at most
    ``size_budget`` and within the smallest layer's size of it: the random control at (about) the
    budget's size. Enumerates the allocations (refused above a million)."""
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    choices = sorted(_check_choices(choices))
    costs = {n: {b: 0.0 for b in choices} for n in sizes}
    layers, choices = _problem(costs, sizes, size_budget, None, None, None)
    if len(choices) ** len(layers) > 10**6:
        raise ValueError(f"{len(choices)}^{len(layers)} allocations are too many to enumerate")
    slack = min(sizes.values())
    table = np.array(list(itertools.product(choices, repeat=len(layers))))
    total = table @ np.array([sizes[n] for n in layers])
    near = np.flatnonzero((total <= size_budget) & (total > size_budget - slack))
    if len(near) == 0:
        raise ValueError(f"no allocation has a size within {slack} bits below size_budget {size_budget}")
    return {n: int(b) for n, b in zip(layers, table[generator.choice(near)])}


def rank_agreement(measured: Sequence[float], proxy: Sequence[float]) -> dict[str, float]:
    """How well ``proxy`` ranks the layers as ``measured`` does: Spearman's rho and Kendall's tau."""
    from scipy.stats import kendalltau, spearmanr

    measured, proxy = np.asarray(measured, dtype=np.float64), np.asarray(proxy, dtype=np.float64)
    if measured.shape != proxy.shape or measured.ndim != 1 or len(measured) < 3:
        raise ValueError("measured and proxy must be 1-d and of the same length, at least 3")
    if not (np.isfinite(measured).all() and np.isfinite(proxy).all()):
        raise ValueError("measured and proxy must be finite")
    return {"spearman": float(spearmanr(measured, proxy).statistic),
            "kendall": float(kendalltau(measured, proxy).statistic)}
