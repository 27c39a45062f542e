"""Neural channel expansion (chapter 11): searching a network's layer widths for uniform low precision.

Park et al.'s NCE (arXiv 2212.10878) keeps one bit width everywhere, as dense hardware wants
(chapter 10), and changes the architecture instead: a differentiable search gives the layers that
quantization hurts more channels and takes them from the others, under a FLOPs or parameter
budget. It builds on TAS (Dong and Yang 2019, "Network Pruning via Transformable Architecture
Search"), whose official code fixes the details below; NCE adds one rule, **expansion**: when a
layer's preference for its widest option passes a threshold ``T``, the layer gets a wider option.

The search here is over :class:`qlib.models.Mnist1DCNN`'s four convolutions (:class:`SearchNetwork`):

* each convolution has width options (channel counts) and one architecture vector ``alpha``;
  its weight is allocated at the widest width expansion may reach, and an option of ``C``
  channels uses the first ``C`` filters and the first input channels the previous layer
  delivered (TAS's weight sharing); each option has its own batch norm;
* per step two options are drawn from the Gumbel-perturbed softmax of ``alpha`` without
  replacement and mixed with the softmax of their two perturbed logits (:func:`gumbel_pair`,
  TAS's ``select2withP``); their outputs are aligned to the wider one by channel-wise
  interpolation (:func:`channel_interpolate`) and summed, then ReLU;
* weights and inputs are fake-quantized inside the search at the target bits (LSQ weights per
  channel, LSQ+ inputs; the first and last layer at 8 bits), so the widths are chosen for the
  quantized network;
* the expected MACs and parameters are differentiable in ``alpha`` (:meth:`SearchNetwork.expected_costs`:
  each layer's expected input and output widths under the plain softmax), and the cost loss
  switches sign by where the argmax architecture's cost lies against the target
  (:func:`cost_loss`, TAS's one-sided tolerance band);
* weights train on one half of the training split and ``alpha`` on the other, alternating every
  step (:func:`search`); the temperature anneals from 5 to 0.1 on a cosine.

``align="pad"`` replaces CWI by zero-padding the narrower output (its channels stay the outputs of
the same shared filters, where CWI's resampling moves them), the alternative the chapter measures.

Choices the papers leave open, made here (and named in :class:`SearchConfig`): the width options
(quarters of the original width), the expansion step and cap, the threshold, a float warm-up of
the shared weights before quantizers and ``alpha`` start, Adam for the weights (the book's
optimizer) and a larger architecture learning rate than TAS's (its search runs 600 epochs, ours a
few dozen), and a new option's ``alpha`` set to the widest option's value when it is added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bits, check_bool, check_float, check_int
from .data import Dataset
from .models import Mnist1DCNN, count_parameters
from .quantizers import make_quantizer
from .train import seed_everything, single_threaded

__all__ = ["channel_interpolate", "gumbel_pair", "width_options", "network_costs", "cost_loss", "SearchConfig",
           "SearchConv", "SearchNetwork", "derive", "search", "temperature", "cached_search", "search_all",
           "random_widths", "uniform_width_near", "architecture_kwargs"]

KERNELS = (5, 3, 3, 3)
STRIDES = (1, 2, 2, 2)


def channel_interpolate(x: torch.Tensor, channels: int) -> torch.Tensor:
    """CWI: ``x`` of shape ``(N, C, L)`` resampled along the channel axis to ``channels`` by adaptive
    average pooling (output channel ``a`` averages input channels ``floor(a C / c)`` to
    ``ceil((a + 1) C / c) - 1``), TAS's alignment of outputs of different widths."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise TypeError("x must be a torch.Tensor of shape (N, C, L)")
    channels = check_int(channels, "channels", 1)
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool2d(x.unsqueeze(1), (channels, x.shape[2])).squeeze(1)


def gumbel_pair(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two options drawn without replacement and their mixing weights (TAS's ``select2withP``).

    ``z = (log_softmax(alpha) + g) / tau`` with Gumbel noise ``g``; the two indices are drawn from
    ``softmax(z)`` without replacement (no gradient), and their weights are the softmax of their two
    ``z`` values, through which the gradient reaches ``alpha``. Returns ``(indices, weights)``.
    """
    if not isinstance(alpha, torch.Tensor) or alpha.ndim != 1 or len(alpha) < 2:
        raise ValueError("alpha must be a 1-d tensor with at least two options")
    tau = check_float(tau, "tau", 0.0, low_open=True)
    uniform = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype).clamp_(1e-10, 1 - 1e-10)
    z = (F.log_softmax(alpha, dim=0) - torch.log(-torch.log(uniform))) / tau
    with torch.no_grad():
        probs = F.softmax(z, dim=0)
        indices = torch.multinomial(probs + 1e-12, 2, replacement=False, generator=generator)
    return indices, F.softmax(z[indices], dim=0)


def _zero_pad(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The narrower output in the first channels, zeros above (the alternative to CWI)."""
    return F.pad(x, (0, 0, 0, channels - x.shape[1]))


def temperature(epoch: int, epochs: int, tau_max: float = 5.0, tau_min: float = 0.1) -> float:
    """TAS's cosine annealing of the Gumbel temperature, once per epoch."""
    return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def width_options(base: int, ratios) -> list[int]:
    """Channel counts ``floor(base * r)`` for the ratios, sorted, without duplicates, at least 1."""
    base = check_int(base, "base", 1)
    widths = sorted({max(1, int(base * check_float(r, "ratio", 0.0, low_open=True))) for r in ratios})
    if not widths:
        raise ValueError("ratios must hold at least one ratio")
    return widths


def _lengths(length: int) -> list[int]:
    """Output positions of each convolution ('same' padding: ceil(length / stride))."""
    out, lengths = length, []
    for stride in STRIDES:
        out = -(-out // stride)
        lengths.append(out)
    return lengths


def network_costs(widths, length: int = 40, num_classes: int = 10) -> dict[str, int]:
    """MACs per example and parameters of ``Mnist1DCNN(widths=widths)``, counted from its shapes:
    a convolution ``k * C_in * C_out * L_out`` MACs and ``k * C_in * C_out + 2 C_out`` parameters
    (weights, batch-norm scale and shift), the classifier ``C_4 * L_4 * classes`` and a bias."""
    widths = [check_int(w, "widths[i]", 1) for w in widths]
    if len(widths) != len(KERNELS):
        raise ValueError(f"widths must be {len(KERNELS)} channel counts, got {widths}")
    lengths = _lengths(length)
    inputs = [1] + widths[:-1]
    macs = sum(k * i * o * L for k, i, o, L in zip(KERNELS, inputs, widths, lengths))
    params = sum(k * i * o + 2 * o for k, i, o in zip(KERNELS, inputs, widths))
    features = widths[-1] * lengths[-1]
    return {"macs": macs + features * num_classes, "params": params + features * num_classes + num_classes}


def random_widths(choices, budget: float, tolerance: float, generator, budget_kind: str = "macs",
                  length: int = 40, num_classes: int = 10, tries: int = 100_000) -> tuple[int, ...]:
    """Four widths drawn from ``choices``, uniformly among the architectures whose cost
    (:func:`network_costs`, ``budget_kind`` ``"macs"`` or ``"params"``) lies within
    ``tolerance`` (a fraction) of ``budget``: the random control of a width search at its budget
    (rejection sampling, which is uniform over the accepted set)."""
    import numpy as np

    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    choices = sorted({check_int(c, "choices[i]", 1) for c in choices})
    if not choices:
        raise ValueError("choices must hold at least one width")
    if budget_kind not in ("macs", "params"):
        raise ValueError(f"budget_kind must be 'macs' or 'params', got {budget_kind!r}")
    budget = check_float(budget, "budget", 0.0, low_open=True)
    tolerance = check_float(tolerance, "tolerance", 0.0)
    for _ in range(check_int(tries, "tries", 1)):
        widths = tuple(int(w) for w in generator.choice(choices, size=len(KERNELS)))
        cost = network_costs(widths, length, num_classes)[budget_kind]
        if abs(cost - budget) <= tolerance * budget:
            return widths
    raise ValueError(f"no architecture from choices {choices} found within {tolerance:.1%} of "
                     f"budget {budget:g} in {tries} draws")


def uniform_width_near(cost: float, budget_kind: str = "macs", length: int = 40,
                       num_classes: int = 10) -> int:
    """The one width for all four convolutions whose cost is closest to ``cost``: the uniformly
    scaled network at a searched architecture's budget (the smaller width on a tie)."""
    if budget_kind not in ("macs", "params"):
        raise ValueError(f"budget_kind must be 'macs' or 'params', got {budget_kind!r}")
    cost = check_float(cost, "cost", 0.0, low_open=True)
    width, best = 1, math.inf
    while True:
        gap = abs(network_costs((width,) * len(KERNELS), length, num_classes)[budget_kind] - cost)
        if gap >= best:  # the cost grows with the width: past the closest, gaps only grow
            return width - 1
        width, best = width + 1, gap


def architecture_kwargs(widths, base_width: int = 32) -> tuple:
    """``Run.model_kwargs`` for ``Mnist1DCNN(widths=widths)``: empty for the default network (every
    width ``base_width``), so its runs and float networks are the ones other chapters cached."""
    widths = tuple(check_int(w, "widths[i]", 1) for w in widths)
    if len(widths) != len(KERNELS):
        raise ValueError(f"widths must be {len(KERNELS)} channel counts, got {widths}")
    return () if widths == (base_width,) * len(KERNELS) else (("widths", widths),)


def cost_loss(expected: torch.Tensor, current: float, target: float, tolerance: float) -> torch.Tensor:
    """TAS's cost loss: ``+log(expected)`` when the argmax architecture's cost ``current`` is above
    ``target`` (push the cost down), ``-log(expected)`` when it is below ``target - tolerance``
    (push it up), zero inside the band ``[target - tolerance, target]``."""
    if not isinstance(expected, torch.Tensor) or expected.ndim != 0 or not bool(expected > 0):
        raise ValueError("expected must be a positive scalar tensor")
    for name, value in (("current", current), ("target", target), ("tolerance", tolerance)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if current > target:
        return torch.log(expected)
    if current < target - tolerance:
        return -torch.log(expected)
    return expected * 0.0


@dataclass(frozen=True)
class SearchConfig:
    """The search's hyper-parameters (TAS's where it has them; the rest ours, see the module).

    ``ratios``: the first width options as fractions of the original width; with ``expand``, a
    layer whose widest option's probability passes ``threshold`` at the end of an epoch gets an
    option ``step`` (a fraction of the original width) wider, up to ``cap``. ``target`` is the
    budget as a fraction of the original network's cost in ``budget`` (``"macs"`` or
    ``"params"``), with TAS's ``tolerance`` band below it and the cost loss weighted by
    ``cost_weight``. ``warmup`` epochs train the shared weights in float first (no quantizers,
    ``alpha`` fixed); the remaining epochs alternate weight and architecture steps.
    """

    epochs: int = 20
    warmup: int = 5
    batch_size: int = 64
    lr: float = 5e-3
    arch_lr: float = 2e-2
    arch_weight_decay: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.1
    ratios: tuple = (0.25, 0.5, 0.75, 1.0)
    expand: bool = True
    threshold: float = 0.4
    step: float = 0.25
    cap: float = 2.0
    budget: str = "macs"
    target: float = 1.0
    tolerance: float = 0.05
    cost_weight: float = 2.0
    bits: int = 2
    act_bits: int | None = None
    weight: str = "lsq"
    act: str = "lsq+"
    base_width: int = 32
    align: str = "cwi"

    def __post_init__(self):
        if self.align not in ("cwi", "pad"):
            raise ValueError(f"align must be 'cwi' (TAS) or 'pad', got {self.align!r}")
        check_int(self.epochs, "epochs", 1)
        check_int(self.warmup, "warmup", 0)
        if self.warmup >= self.epochs:
            raise ValueError(f"warmup ({self.warmup}) must leave search epochs (epochs={self.epochs})")
        check_int(self.batch_size, "batch_size", 1)
        for name in ("lr", "arch_lr", "tau_max", "tau_min", "step", "cap", "target"):
            check_float(getattr(self, name), name, 0.0, low_open=True)
        for name in ("arch_weight_decay", "tolerance", "cost_weight"):
            check_float(getattr(self, name), name, 0.0)
        check_float(self.threshold, "threshold", 0.0, 1.0, low_open=True, high_open=True)
        check_bool(self.expand, "expand")
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if self.budget not in ("macs", "params"):
            raise ValueError(f"budget must be 'macs' or 'params', got {self.budget!r}")
        if not self.ratios or max(self.ratios) > self.cap:
            raise ValueError(f"ratios must be non-empty and within cap ({self.cap}), got {self.ratios}")
        check_int(self.base_width, "base_width", 1)


class SearchConv(nn.Module):
    """One searchable convolution: width options sharing one weight (the first ``C`` filters), a
    batch norm per possible width, and the layer's architecture vector ``alpha``."""

    def __init__(self, cin_max: int, options: list[int], cap_width: int, step_width: int, kernel: int,
                 stride: int):
        super().__init__()
        self.options = list(options)
        self.cap_width, self.step_width = cap_width, step_width
        self.possible = sorted(set(self.options) | set(range(self.options[-1], cap_width + 1, step_width)))
        self.conv = nn.Conv1d(cin_max, cap_width, kernel, stride, kernel // 2, bias=False)
        self.norms = nn.ModuleDict({str(c): nn.BatchNorm1d(c) for c in self.possible})
        self.alpha = nn.Parameter(torch.zeros(len(self.possible)))
        nn.init.normal_(self.alpha, 0.0, 0.01)

    @property
    def active_alpha(self) -> torch.Tensor:
        return self.alpha[: len(self.options)]

    def probabilities(self) -> torch.Tensor:
        return F.softmax(self.active_alpha, dim=0)

    def expected_width(self) -> torch.Tensor:
        return (self.probabilities() * torch.tensor(self.options, dtype=self.alpha.dtype)).sum()

    def argmax_width(self) -> int:
        return self.options[int(torch.argmax(self.active_alpha))]

    def branch(self, x: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
        out = F.conv1d(x, weight[:width, : x.shape[1]], None, self.conv.stride, self.conv.padding)
        return self.norms[str(width)](out)

    def can_expand(self) -> bool:
        return self.options[-1] + self.step_width <= self.cap_width

    def expand(self) -> int:
        """Add an option one step wider than the widest; its ``alpha`` starts at the widest's."""
        if not self.can_expand():
            raise ValueError("the layer is at its cap")
        with torch.no_grad():
            self.alpha[len(self.options)] = self.alpha[len(self.options) - 1]
        self.options.append(self.options[-1] + self.step_width)
        return self.options[-1]


class SearchNetwork(nn.Module):
    """The search space over :class:`qlib.models.Mnist1DCNN`'s four convolution widths (see the module).

    ``forward(x)`` samples two options per layer (``mode="sample"``, at temperature ``tau``) or
    runs each layer's argmax option (``mode="argmax"``).
    """

    def __init__(self, config: SearchConfig = SearchConfig(), length: int = 40, num_classes: int = 10):
        super().__init__()
        if not isinstance(config, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
        self.config = config
        base = config.base_width
        options = width_options(base, config.ratios)
        cap_width = max(options[-1], int(base * config.cap))
        step_width = max(1, int(base * config.step))
        if not config.expand:
            cap_width = options[-1]
        self.layers = nn.ModuleList()
        cin = 1
        for kernel, stride in zip(KERNELS, STRIDES):
            self.layers.append(SearchConv(cin, options, cap_width, step_width, kernel, stride))
            cin = cap_width
        self.length, self.num_classes = length, num_classes
        self.final_length = _lengths(length)[-1]
        self.classifier = nn.Linear(cap_width * self.final_length, num_classes)
        bits, act_bits = config.bits, config.act_bits or config.bits
        edge = 8
        self.weight_quantizers = nn.ModuleList(
            [make_quantizer(config.weight, edge if i == 0 else bits, "weight") for i in range(len(KERNELS))]
            + [make_quantizer(config.weight, edge, "weight")])
        self.input_quantizers = nn.ModuleList(
            [make_quantizer(config.act, edge, "act", signed=True)]
            + [make_quantizer(config.act, act_bits, "act") for _ in range(len(KERNELS) - 1)]
            + [make_quantizer(config.act, edge, "act")])
        self.set_quantization(False)
        self.tau = config.tau_max
        self.generator: torch.Generator | None = None

    def set_quantization(self, enabled: bool) -> None:
        for q in list(self.weight_quantizers) + list(self.input_quantizers):
            q.enabled = enabled

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [layer.alpha for layer in self.layers]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.architecture_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: torch.Tensor, mode: str = "sample") -> torch.Tensor:
        if mode not in ("sample", "argmax"):
            raise ValueError(f"mode must be 'sample' or 'argmax', got {mode!r}")
        for layer, wq, iq in zip(self.layers, self.weight_quantizers, self.input_quantizers):
            x, weight = iq(x), wq(layer.conv.weight)
            if mode == "argmax":
                x = F.relu(layer.branch(x, weight, layer.argmax_width()))
                continue
            indices, weights = gumbel_pair(layer.active_alpha, self.tau, self.generator)
            widths = [layer.options[int(i)] for i in indices]
            wide = max(widths)
            align = channel_interpolate if self.config.align == "cwi" else _zero_pad
            x = F.relu(sum(w * align(layer.branch(x, weight, c), wide) for w, c in zip(weights, widths)))
        x = self.input_quantizers[-1](x.flatten(1))
        weight = self.weight_quantizers[-1](self.classifier.weight)
        return F.linear(x, weight[:, : x.shape[1]], self.classifier.bias)

    def architecture(self) -> tuple[int, ...]:
        """The derived widths: each layer's most probable option."""
        return tuple(layer.argmax_width() for layer in self.layers)

    def expected_costs(self) -> dict[str, torch.Tensor]:
        """Expected MACs per example and parameters under each layer's softmax, differentiable in
        ``alpha``: :func:`network_costs` with every width replaced by its expectation."""
        lengths = _lengths(self.length)
        cin = torch.tensor(1.0)
        macs, params = torch.tensor(0.0), torch.tensor(0.0)
        for layer, k, L in zip(self.layers, KERNELS, lengths):
            cout = layer.expected_width()
            macs = macs + k * cin * cout * L
            params = params + k * cin * cout + 2 * cout
            cin = cout
        features = cin * self.final_length
        return {"macs": macs + features * self.num_classes,
                "params": params + features * self.num_classes + self.num_classes}

    def expand(self, threshold: float) -> list[int]:
        """NCE's rule: every layer whose widest option's probability exceeds ``threshold`` (and is
        below its cap) gets an option one step wider. Returns the indices of the layers expanded."""
        threshold = check_float(threshold, "threshold", 0.0, 1.0, low_open=True, high_open=True)
        grown = []
        for i, layer in enumerate(self.layers):
            if float(layer.probabilities()[-1].detach()) > threshold and layer.can_expand():
                layer.expand()
                grown.append(i)
        return grown


@torch.no_grad()
def derive(model: SearchNetwork) -> Mnist1DCNN:
    """The argmax architecture as a plain :class:`qlib.models.Mnist1DCNN`, with the shared weights'
    slices and each chosen option's batch norm: in eval mode with the quantizers off it computes
    what ``model(x, mode="argmax")`` does. (The chapter retrains derived architectures from scratch,
    as TAS does; this is the check that the search space is the network it claims to be.)"""
    if not isinstance(model, SearchNetwork):
        raise TypeError(f"model must be a SearchNetwork, got {type(model).__name__}")
    widths = model.architecture()
    net = Mnist1DCNN(num_classes=model.num_classes, length=model.length, widths=widths)
    cin = 1
    for layer, block, width in zip(model.layers, net.features, widths):
        conv, norm = block[0], block[1]
        conv.weight.copy_(layer.conv.weight[:width, :cin])
        norm.load_state_dict(layer.norms[str(width)].state_dict())
        cin = width
    net.classifier.weight.copy_(model.classifier.weight[:, : cin * model.final_length])
    net.classifier.bias.copy_(model.classifier.bias)
    return net.eval()


def search(dataset: Dataset, config: SearchConfig = SearchConfig(), seed: int = 0) -> dict:
    """Run the width search on ``dataset`` (MNIST-1D); one CPU thread, reproducible per seed.

    The training split is halved by a seeded permutation: weights train on one half, ``alpha`` on
    the other (TAS), so the validation split stays free for choosing recipes. Returns ``widths``
    (the derived architecture), its ``costs`` (:func:`network_costs`) and the original's, the
    per-epoch ``history`` (temperature; each layer's options and their probabilities at the end of
    the epoch, before that epoch's expansions; the expected cost after them and the argmax cost;
    the accuracy and loss of the sampled networks on the architecture half), the ``expansions``
    as ``(epoch, layer, new width)`` and the wall time in ``seconds``.
    """
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    with single_threaded():
        return _search(dataset, config, check_int(seed, "seed", 0))


def _search(dataset, config, seed):
    start = time.perf_counter()
    generator = seed_everything(seed)
    model = SearchNetwork(config, length=dataset.x_train.shape[-1], num_classes=int(dataset.y_train.max()) + 1)
    model.generator = generator
    order = torch.randperm(len(dataset.x_train), generator=generator)
    half = len(order) // 2
    weights_split, arch_split = order[:half], order[half:]
    x, y = dataset.x_train, dataset.y_train
    base_costs = network_costs((config.base_width,) * len(KERNELS), model.length, model.num_classes)
    target = config.target * base_costs[config.budget]
    tolerance = config.tolerance * base_costs[config.budget]
    optimizer = torch.optim.AdamW(model.weight_parameters(), lr=config.lr, weight_decay=0.0)
    arch_optimizer = torch.optim.Adam(model.architecture_parameters(), lr=config.arch_lr, betas=(0.5, 0.999),
                                      weight_decay=config.arch_weight_decay)
    steps_per_epoch = math.ceil(half / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    history, expansions = [], []
    for epoch in range(config.epochs):
        arch_correct, arch_seen, arch_loss = 0, 0, 0.0
        searching = epoch >= config.warmup
        model.set_quantization(searching)
        model.tau = temperature(epoch, config.epochs, config.tau_max, config.tau_min)
        w_order = weights_split[torch.randperm(half, generator=generator)]
        a_order = arch_split[torch.randperm(len(arch_split), generator=generator)]
        for step in range(steps_per_epoch):
            model.train()
            batch = w_order[step * config.batch_size:(step + 1) * config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
            if not searching:
                continue
            arch_batch = a_order[(step * config.batch_size) % len(a_order):][: config.batch_size]
            arch_optimizer.zero_grad(set_to_none=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x[arch_batch])
            loss = F.cross_entropy(logits, y[arch_batch])
            arch_correct += int((logits.argmax(1) == y[arch_batch]).sum())
            arch_seen += len(arch_batch)
            arch_loss += float(loss.detach()) * len(arch_batch)
            current = network_costs(model.architecture(), model.length, model.num_classes)[config.budget]
            expected = model.expected_costs()[config.budget]
            loss = loss + config.cost_weight * cost_loss(expected, current, target, tolerance)
            loss.backward()
            arch_optimizer.step()
        # the epoch's end state, as the expansion rule sees it (options it adds appear next epoch)
        options = [list(layer.options) for layer in model.layers]
        probabilities = [layer.probabilities().detach().tolist() for layer in model.layers]
        grown = model.expand(config.threshold) if searching and config.expand else []
        expansions += [(epoch, i, model.layers[i].options[-1]) for i in grown]
        costs = model.expected_costs()
        history.append({
            "epoch": epoch, "tau": model.tau, "searching": searching,
            "options": options, "probabilities": probabilities,
            "expected_macs": float(costs["macs"].detach()), "expected_params": float(costs["params"].detach()),
            "argmax": model.architecture(),
            "argmax_macs": network_costs(model.architecture(), model.length, model.num_classes)["macs"],
            # the sampled networks the architecture steps saw (running, over the epoch's batches)
            "arch_acc": 100.0 * arch_correct / arch_seen if arch_seen else None,
            "arch_loss": arch_loss / arch_seen if arch_seen else None,
        })
    widths = model.architecture()
    return {"widths": widths, "costs": network_costs(widths, model.length, model.num_classes),
            "original_costs": base_costs, "target": target, "history": history, "expansions": expansions,
            "seconds": time.perf_counter() - start, "config": dataclasses.asdict(config)}


def _search_path(config: SearchConfig, seed: int, data_name: str):
    from ._cache import cache_dir, code_fingerprint

    spec = {"search": dataclasses.asdict(config), "seed": seed, "data": data_name, "code": code_fingerprint(),
            "torch": torch.__version__.split("+")[0]}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "searches" / f"{key}.pt"


def cached_search(config: SearchConfig = SearchConfig(), seed: int = 0, dataset: Dataset | None = None) -> dict:
    """:func:`search` on MNIST-1D (or ``dataset``), from the cache (``<cache>/searches``, keyed by the
    configuration, the seed, the data and qlib's code) or run and cached now."""
    from .experiments import running_data

    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    dataset = running_data("mnist1d_cnn") if dataset is None else dataset
    path = _search_path(config, check_int(seed, "seed", 0), dataset.name)
    if path.exists():
        return torch.load(path, weights_only=True)
    result = search(dataset, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(result, tmp)
    os.replace(tmp.name, path)
    return torch.load(path, weights_only=True)


def _search_in_worker(config, seed):
    cached_search(config, seed)


def search_all(jobs, workers: int | None = None) -> list[dict]:
    """:func:`cached_search` for every ``(config, seed)`` in ``jobs`` on MNIST-1D, the missing ones in
    ``workers`` processes side by side (default :func:`qlib.experiments.default_workers`), each on one
    thread (so where a search ran does not change it)."""
    from .experiments import _pool, default_workers, running_data

    jobs = [(c, check_int(s, "seed", 0)) for c, s in jobs]
    if not jobs or not all(isinstance(c, SearchConfig) for c, _ in jobs):
        raise TypeError("jobs must be a non-empty sequence of (SearchConfig, seed) pairs")
    workers = default_workers() if workers is None else check_int(workers, "workers", 1)
    name = running_data("mnist1d_cnn").name
    missing = list(dict.fromkeys(j for j in jobs if not _search_path(j[0], j[1], name).exists()))
    if missing and workers > 1:
        pool = _pool(workers)
        for future in [pool.submit(_search_in_worker, c, s) for c, s in missing]:
            future.result()
    return [cached_search(c, s) for c, s in jobs]
