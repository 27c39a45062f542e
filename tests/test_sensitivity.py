"""Layer sensitivity and bit allocation: counts by hand, Omega by hand, the solver against brute force."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlib import fold, hessian, models, sensitivity
from qlib.quantizers import mse_step


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=4, padding=1),
                         nn.ReLU(), nn.Conv1d(4, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10, 3))


def test_sizes_and_macs_by_hand():
    net = tiny_net()
    assert sensitivity.weight_layers(net) == ["0", "2", "4", "7"]
    assert sensitivity.layer_sizes(net) == {"0": 4 * 1 * 3, "2": 4 * 1 * 3, "4": 6 * 4, "7": 3 * 60}
    macs = sensitivity.layer_macs(net, torch.randn(5, 1, 10))
    # outputs x inputs per output: 4*10 outputs of 1*3 taps; depthwise: 4*10 of 3; 6*10 of 4; 3 of 60
    assert macs == {"0": 40 * 3, "2": 40 * 3, "4": 60 * 4, "7": 3 * 60}
    bits = {"0": 8, "2": 4, "4": 2, "7": 8}
    assert sensitivity.model_size_bits(sensitivity.layer_sizes(net), bits) == 12 * 8 + 12 * 4 + 24 * 2 + 180 * 8
    acts = {"0": 8, "2": 4, "4": 4, "7": 4}
    assert sensitivity.bit_operations(macs, bits, acts) == 120 * 64 + 120 * 16 + 240 * 8 + 180 * 32
    with pytest.raises(ValueError, match="every layer"):
        sensitivity.model_size_bits(sensitivity.layer_sizes(net), {"0": 8})
    with pytest.raises(ValueError, match="not a Conv1d"):
        sensitivity.layer_sizes(net, ["1"])
    with pytest.raises(ValueError, match="no Conv1d"):
        sensitivity.weight_layers(nn.Sequential(nn.ReLU()))


def test_macs_of_a_two_dimensional_network():
    net = models.MnistCNN()
    macs = sensitivity.layer_macs(net, torch.randn(2, 1, 28, 28))
    first = dict(net.named_modules())[sensitivity.weight_layers(net)[0]]
    out = first(torch.randn(1, 1, 28, 28))
    assert macs[sensitivity.weight_layers(net)[0]] == out.numel() * math.prod(first.kernel_size) * first.in_channels


def test_quantize_weight_is_round_to_nearest_on_the_per_channel_least_error_grid():
    torch.manual_seed(1)
    w = torch.randn(5, 3, 3)
    for bits in (2, 4, 8):
        q = sensitivity.quantize_weight(w, bits)
        step = mse_step(w, bits, signed=True, axis=0).reshape(-1, 1, 1)
        codes = q / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        inside = (w / step).abs() <= 2 ** (bits - 1) - 1
        assert ((q - w).abs()[inside] <= step.expand_as(w)[inside] / 2 + 1e-6).all()
    errors = [((sensitivity.quantize_weight(w, b) - w) ** 2).sum() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))  # more bits, less error
    with pytest.raises(TypeError, match="weight"):
        sensitivity.quantize_weight(torch.arange(4), 4)


def test_omega_against_a_hand_computation():
    # a quadratic loss 1/2 sum_j d_j w_j^2 through a linear layer: H is diag(d), Tr(H) = sum d
    net = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.9, -0.35, 0.2, 0.61]]))
    w = net[0].weight
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss = 0.5 * (d * w.reshape(-1) ** 2).sum()
    estimate = hessian.hutchinson_trace(loss, [w], max_probes=3, tol=0.0)
    assert estimate.trace == pytest.approx(10.0)  # diagonal: every probe is exact
    traces = {"0": {"mean_trace": estimate.trace / 4}}
    perturbation = sensitivity.weight_perturbations(net, [2, 4])
    w = w.detach()
    by_hand = {b: float(((sensitivity.quantize_weight(w, b) - w) ** 2).sum()) for b in (2, 4)}
    assert perturbation == {"0": pytest.approx(by_hand)}
    omega = sensitivity.omega(traces, perturbation)
    assert omega["0"][2] == pytest.approx(10.0 / 4 * by_hand[2])
    assert omega["0"][4] == pytest.approx(10.0 / 4 * by_hand[4]) and omega["0"][4] < omega["0"][2]
    with pytest.raises(ValueError, match="same layers"):
        sensitivity.omega({"1": {"mean_trace": 1.0}}, perturbation)


def test_hessian_traces_match_an_exact_hessian_per_layer():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    traces = sensitivity.hessian_traces(net, x, y, max_probes=3000, tol=0.0,
                                        generator=torch.Generator().manual_seed(0))
    for name, layer in (("0", net[0]), ("2", net[2])):
        w0 = layer.weight.detach().clone()

        def loss_of(flat, layer=layer, w0=w0):
            original = layer.weight
            del layer.weight
            layer.weight = flat.reshape(w0.shape)
            try:
                return F.cross_entropy(net(x), y)
            finally:
                layer.weight = original

        exact = torch.autograd.functional.hessian(loss_of, w0.reshape(-1)).trace().item()
        t = traces[name]
        assert t["n"] == w0.numel() and t["mean_trace"] == pytest.approx(t["trace"] / t["n"])
        assert abs(t["trace"] - exact) < 4 * t["std_error"] + 1e-6
        assert t["std_error"] > 0 and t["probes"] == 3000
    assert all(p.grad is None for p in net.parameters())  # leaves the model as it was


def test_measured_sensitivity_quantizes_one_layer_at_a_time():
    net = fold.fold_batchnorm(tiny_net())
    x, y = torch.randn(64, 1, 10), torch.randint(0, 3, (64,))
    rows = sensitivity.measured_sensitivity(net, x, y, bits=[2, 8])
    assert [(r["layer"], r["bits"]) for r in rows] == [(n, b) for n in ("0", "2", "4", "7") for b in (2, 8)]
    float_loss = F.cross_entropy(net(x), y).item()
    # by hand for one cell: layer "4" at 2 bits
    manual = fold.fold_batchnorm(tiny_net())
    with torch.no_grad():
        manual[4].weight.copy_(sensitivity.quantize_weight(manual[4].weight, 2))
    row = next(r for r in rows if r["layer"] == "4" and r["bits"] == 2)
    assert row["loss"] == pytest.approx(F.cross_entropy(manual(x), y).item(), rel=1e-5)
    assert row["loss_increase"] == pytest.approx(row["loss"] - float_loss, rel=1e-4, abs=1e-7)
    eight = [abs(r["loss_increase"]) for r in rows if r["bits"] == 8]
    two = [abs(r["loss_increase"]) for r in rows if r["bits"] == 2]
    assert max(eight) < max(two)
    assert torch.equal(net[4].weight, fold.fold_batchnorm(tiny_net())[4].weight)  # the model is untouched
    with pytest.raises(ValueError, match="distinct"):
        sensitivity.measured_sensitivity(net, x, y, bits=[4, 4])
    with pytest.raises(ValueError, match="same length"):
        sensitivity.measured_sensitivity(net, x, y[:3], bits=[4])


def _instance(seed, layers):
    rng = np.random.default_rng(seed)
    choices = (2, 3, 4, 8)
    sizes = {f"l{i}": int(rng.integers(10, 500)) for i in range(layers)}
    costs = {}
    for n in sizes:
        base = rng.uniform(0.01, 10)
        costs[n] = {b: float(base * 4.0 ** -b * rng.uniform(0.5, 2)) for b in choices}  # falls with b
    macs = {n: int(rng.integers(100, 5000)) for n in sizes}
    acts = {n: int(rng.choice([4, 8])) for n in sizes}
    return costs, sizes, macs, acts


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 6), tightness=st.floats(0.0, 1.0))
def test_the_integer_program_finds_the_brute_force_optimum(seed, layers, tightness):
    costs, sizes, macs, acts = _instance(seed, layers)
    smallest, largest = sum(sizes.values()) * 2, sum(sizes.values()) * 8
    budget = smallest + tightness * (largest - smallest)
    solved = sensitivity.allocate_bits(costs, sizes, budget)
    exact = sensitivity.brute_force_allocation(costs, sizes, budget)
    assert solved.size <= budget and solved.cost == pytest.approx(exact.cost, rel=1e-9, abs=1e-12)
    # and with a BitOps budget as well
    least = sum(macs[n] * 2 * acts[n] for n in sizes)
    bitops_budget = least + tightness * (sum(macs[n] * 8 * acts[n] for n in sizes) - least) / 2
    solved = sensitivity.allocate_bits(costs, sizes, budget, macs, acts, bitops_budget)
    exact = sensitivity.brute_force_allocation(costs, sizes, budget, macs, acts, bitops_budget)
    assert solved.bitops <= bitops_budget and solved.size <= budget
    assert solved.cost == pytest.approx(exact.cost, rel=1e-9, abs=1e-12)


def test_allocation_by_hand_and_its_edges():
    costs = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 0.3, 4: 0.2, 8: 0.0}}
    sizes = {"a": 10, "b": 100}
    # 280 bits: "a" at 8 (80) leaves 200 for "b": 2 bits; "a" at 4 and "b" at 2 costs more
    allocation = sensitivity.allocate_bits(costs, sizes, 280)
    assert allocation.bits == {"a": 8, "b": 2} and allocation.size == 280 and allocation.cost == pytest.approx(0.3)
    assert sensitivity.allocate_bits(costs, sizes).bits == {"a": 8, "b": 8}  # no budget: the most bits
    assert sensitivity.allocate_bits(costs, sizes, 220).bits == {"a": 2, "b": 2}  # the only fit
    assert sensitivity.allocate_bits(costs, sizes, np.int64(280)).bits == {"a": 8, "b": 2}  # NumPy numbers too
    with pytest.raises(ValueError, match="size_budget must be a non-negative number"):
        sensitivity.allocate_bits(costs, sizes, "280")
    with pytest.raises(ValueError, match="below the smallest"):
        sensitivity.allocate_bits(costs, sizes, 219)
    with pytest.raises(ValueError, match="same bit widths"):
        sensitivity.allocate_bits({"a": {2: 1.0}, "b": {4: 1.0}}, sizes, 1000)
    with pytest.raises(ValueError, match="together"):
        sensitivity.allocate_bits(costs, sizes, 1000, macs={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="finite"):
        sensitivity.allocate_bits({"a": {2: math.nan, 4: 1.0, 8: 0.0}, "b": costs["b"]}, sizes, 1000)
    with pytest.raises(ValueError, match="too many"):
        layers = {f"l{i}": {2: 1.0, 3: 0.5, 4: 0.2, 8: 0.0} for i in range(11)}
        sensitivity.brute_force_allocation(layers, {n: 1 for n in layers}, 100)


def test_rank_agreement():
    assert sensitivity.rank_agreement([1, 2, 3, 4], [10, 20, 30, 40]) == {"spearman": 1.0, "kendall": 1.0}
    assert sensitivity.rank_agreement([1, 2, 3, 4], [4, 3, 2, 1])["spearman"] == pytest.approx(-1.0)
    together = sensitivity.rank_agreement([1, 2, 3, 4, 5], [1, 3, 2, 4, 5])
    assert together["spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24)) and together["kendall"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least 3"):
        sensitivity.rank_agreement([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        sensitivity.rank_agreement([1, 2, math.inf], [1, 2, 3])


def test_brute_force_enumerates_every_allocation():
    costs, sizes, _, _ = _instance(7, 3)
    budget = sum(sizes.values()) * 4
    feasible = [(c, sum(sizes[n] * b for n, b in zip(sizes, c)))
                for c in itertools.product((2, 3, 4, 8), repeat=3)]
    best = min((sum(costs[n][b] for n, b in zip(sizes, c)) for c, size in feasible if size <= budget))
    assert sensitivity.brute_force_allocation(costs, sizes, budget).cost == pytest.approx(best)


def test_the_frontier_is_the_optimum_at_each_budget_and_never_worse_when_larger():
    costs, sizes, _, _ = _instance(3, 4)
    smallest, largest = sum(sizes.values()) * 2, sum(sizes.values()) * 8
    budgets = np.linspace(smallest, largest, 25)
    points = sensitivity.frontier(costs, sizes, budgets)
    for budget in budgets:  # every budget's optimum is on it
        exact = sensitivity.brute_force_allocation(costs, sizes, budget)
        assert any(p.cost == pytest.approx(exact.cost) and p.size <= budget for p in points)
    assert [p.size for p in points] == sorted(p.size for p in points)
    assert all(a.cost > b.cost for a, b in zip(points, points[1:]))  # larger and cheaper: Pareto
    assert len({tuple(sorted(p.bits.items())) for p in points}) == len(points)
    with pytest.raises(ValueError, match="budgets"):
        sensitivity.frontier(costs, sizes, [])


def test_random_allocations_are_uniform_over_those_near_the_budget():
    sizes = {"a": 10, "b": 20, "c": 30}
    budget = 3 * 60  # three bits per weight on average
    near = [c for c in itertools.product((2, 3, 4, 8), repeat=3)
            if budget - 10 < sum(s * b for s, b in zip(sizes.values(), c)) <= budget]
    rng = np.random.default_rng(0)
    draws = [tuple(sensitivity.random_allocation(sizes, (2, 3, 4, 8), budget, rng).values())
             for _ in range(3000)]
    assert set(draws) == set(near)
    counts = np.array([draws.count(c) for c in near])
    expected = len(draws) / len(near)
    assert ((counts - expected) ** 2 / expected).sum() < 3 * len(near)  # chi-square, far from its tail
    again = sensitivity.random_allocation(sizes, (2, 3, 4, 8), budget, np.random.default_rng(0))
    assert tuple(again.values()) == draws[0]  # seeded
    with pytest.raises(TypeError, match="generator"):
        sensitivity.random_allocation(sizes, (2, 4), budget, 0)
    with pytest.raises(ValueError, match="below the smallest"):
        sensitivity.random_allocation(sizes, (2, 4), 100, rng)


def test_a_budget_a_hair_below_an_allocation_excludes_it():
    # found by hypothesis: HiGHS's feasibility tolerance admitted 3408 bits under a 3407.9999999999995 budget
    costs = {"a": {2: 1.0, 8: 0.0}}
    assert sensitivity.allocate_bits(costs, {"a": 426}, 3408 - 5e-13).bits == {"a": 2}
    assert sensitivity.allocate_bits(costs, {"a": 426}, 3408).bits == {"a": 8}
    macs, acts = {"a": 10}, {"a": 4}
    assert sensitivity.allocate_bits(costs, {"a": 426}, None, macs, acts, 320 - 1e-12).bits == {"a": 2}
