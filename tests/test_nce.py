"""Neural channel expansion: CWI and the costs by hand, the sampler, the expansion rule, the derived network."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qlib import engine, models, nce, qat, sensitivity
from qlib.data import Dataset


def test_channel_interpolation_averages_the_channel_ranges_it_covers():
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    for channels in (1, 3, 4, 7, 10, 16):
        out = nce.channel_interpolate(x, channels)
        assert out.shape == (2, channels, 5)
        for a in range(channels):  # adaptive average pooling, written out
            lo, hi = math.floor(a * 7 / channels), math.ceil((a + 1) * 7 / channels)
            assert torch.allclose(out[:, a], x[:, lo:hi].mean(dim=1))
    assert nce.channel_interpolate(x, 7) is x
    with pytest.raises(TypeError, match=r"\(N, C, L\)"):
        nce.channel_interpolate(torch.randn(2, 3), 4)


def test_gumbel_pair_draws_two_distinct_options_weighted_by_their_perturbed_softmax():
    alpha = torch.tensor([0.3, -1.0, 2.0, 0.1], requires_grad=True)
    seen = set()
    for seed in range(200):
        indices, weights = nce.gumbel_pair(alpha, 1.5, torch.Generator().manual_seed(seed))
        assert len(set(indices.tolist())) == 2 and torch.isclose(weights.sum(), torch.tensor(1.0))
        # the same draw by hand: z = (log_softmax(alpha) + Gumbel noise) / tau
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(4, generator=g).clamp(1e-10, 1 - 1e-10)
        z = (F.log_softmax(alpha, 0) - torch.log(-torch.log(u))) / 1.5
        assert torch.allclose(weights, F.softmax(z[indices], 0))
        seen.add(tuple(sorted(indices.tolist())))
    assert len(seen) == 6  # every pair of four options turns up
    (weights[0] * 3.0).backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0  # the weights carry alpha's gradient
    dominant = torch.tensor([0.0, 0.0, 30.0, 0.0])
    picks = [nce.gumbel_pair(dominant, 1.0, torch.Generator().manual_seed(s))[0].tolist() for s in range(50)]
    assert all(2 in p for p in picks)
    with pytest.raises(ValueError, match="tau"):
        nce.gumbel_pair(alpha, 0.0)


def test_temperature_anneals_on_a_cosine_from_tau_max():
    assert nce.temperature(0, 10) == pytest.approx(5.0)
    assert nce.temperature(5, 10) == pytest.approx(2.55)
    assert nce.temperature(10, 10) == pytest.approx(0.1)


def test_costs_by_hand_and_as_the_network_counts_them():
    widths = (8, 16, 24, 40)
    costs = nce.network_costs(widths)
    # conv: k C_in C_out L_out MACs; 40 -> 40 -> 20 -> 10 -> 5 positions; classifier 40 * 5 -> 10
    macs = 5 * 1 * 8 * 40 + 3 * 8 * 16 * 20 + 3 * 16 * 24 * 10 + 3 * 24 * 40 * 5 + 40 * 5 * 10
    params = (5 * 8 + 16) + (3 * 8 * 16 + 32) + (3 * 16 * 24 + 48) + (3 * 24 * 40 + 80) + 40 * 5 * 10 + 10
    assert costs == {"macs": macs, "params": params}
    net = models.Mnist1DCNN(widths=widths)
    assert models.count_parameters(net) == params
    assert sum(sensitivity.layer_macs(net, torch.randn(2, 1, 40)).values()) == macs


def test_expected_costs_equal_the_derived_networks_at_one_hot_alpha():
    model = nce.SearchNetwork(nce.SearchConfig())
    chosen = []
    with torch.no_grad():
        for layer, pick in zip(model.layers, (0, 3, 1, 2)):
            layer.alpha.zero_()
            layer.alpha[pick] = 1e4  # softmax is exactly one-hot in float32
            chosen.append(layer.options[pick])
    assert model.architecture() == tuple(chosen)
    expected = {k: v.detach() for k, v in model.expected_costs().items()}
    exact = nce.network_costs(chosen)
    assert float(expected["macs"]) == exact["macs"] and float(expected["params"]) == exact["params"]
    # and in between, the expectation is differentiable in alpha
    for layer in model.layers:
        layer.alpha.data.normal_()
    model.expected_costs()["macs"].backward()
    assert all(layer.alpha.grad is not None for layer in model.layers)


def test_cost_loss_switches_sign_at_the_band():
    e = torch.tensor(100.0, requires_grad=True)

    def loss(current):
        return float(nce.cost_loss(e, current, 100, 10).detach())

    assert loss(120) == pytest.approx(math.log(100))  # above the target: push the cost down
    assert loss(80) == pytest.approx(-math.log(100))  # below the band: push it up
    assert loss(95) == loss(100) == loss(90) == 0.0  # inside [target - tolerance, target]
    nce.cost_loss(e, 120, 100, 10).backward()
    assert float(e.grad) == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="positive scalar"):
        nce.cost_loss(torch.tensor(-1.0), 1, 1, 0)
    with pytest.raises(ValueError, match="tolerance"):
        nce.cost_loss(e, 1, 1, -1)


def _set_widest_probability(layer, p):
    k = len(layer.options)
    with torch.no_grad():
        layer.alpha.zero_()
        layer.alpha[k - 1] = math.log(p * (k - 1) / (1 - p))


def test_expansion_fires_exactly_past_the_threshold_and_stops_at_the_cap():
    config = nce.SearchConfig(threshold=0.4, step=0.25, cap=1.5)
    model = nce.SearchNetwork(config)
    assert [layer.options for layer in model.layers] == [[8, 16, 24, 32]] * 4
    _set_widest_probability(model.layers[0], 0.41)
    _set_widest_probability(model.layers[1], 0.39)
    assert model.expand(0.4) == [0]
    assert model.layers[0].options == [8, 16, 24, 32, 40] and model.layers[1].options == [8, 16, 24, 32]
    assert float(model.layers[0].alpha[4].detach()) == float(model.layers[0].alpha[3].detach())  # the new one starts at the widest's
    for _ in range(5):
        _set_widest_probability(model.layers[0], 0.9)
        model.expand(0.4)
    assert model.layers[0].options[-1] == 48  # 1.5 x 32: the cap
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)  # the wider option runs
    no_growth = nce.SearchNetwork(config.__class__(expand=False))
    _set_widest_probability(no_growth.layers[0], 0.9)
    assert no_growth.expand(0.4) == []
    with pytest.raises(ValueError, match="threshold"):
        model.expand(1.0)


def test_the_derived_network_computes_the_argmax_path_and_runs_in_the_integer_engine():
    torch.manual_seed(0)
    model = nce.SearchNetwork(nce.SearchConfig(cap=1.5))
    model.train()
    x = torch.randn(64, 1, 40)
    for _ in range(3):  # batch-norm statistics for every option
        model(x)
    with torch.no_grad():
        for layer, pick in zip(model.layers, (1, 3, 0, 2)):
            layer.alpha.zero_()
            layer.alpha[pick] = 5.0
    model.eval()
    net = nce.derive(model)
    assert net.widths == model.architecture() == (16, 32, 8, 24)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x, "argmax"), atol=1e-5)
    prepared = qat.prepare(net, "lsq", "lsq+", bits=2, example_input=x)
    qat.calibrate_quantizers(prepared, [x])
    network = engine.convert(prepared.eval(), [x])
    assert [op.weight.shape[0] for op in network.layers()][:4] == [16, 32, 8, 24]
    agree = (network(x).argmax(1) == network.simulate(x).argmax(1)).double().mean()
    assert agree > 0.9


def test_search_config_refuses_what_it_cannot_search():
    with pytest.raises(ValueError, match="warmup"):
        nce.SearchConfig(epochs=3, warmup=3)
    with pytest.raises(ValueError, match="budget"):
        nce.SearchConfig(budget="latency")
    with pytest.raises(ValueError, match="cap"):
        nce.SearchConfig(ratios=(0.5, 2.5), cap=2.0)
    with pytest.raises(TypeError, match="SearchConfig"):
        nce.SearchNetwork({"epochs": 3})


@pytest.mark.slow  # a short search
def test_a_short_search_is_reproducible_and_logs_what_it_did():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 40, generator=g)
    y = (x[:, 0, :20].sum(1) > x[:, 0, 20:].sum(1)).long() + 2 * (x[:, 0, ::2].sum(1) > 0).long()
    data = Dataset("toy", x, y, x[:64], y[:64], classes=tuple("abcd"))
    config = nce.SearchConfig(epochs=4, warmup=1, batch_size=32, threshold=0.26, arch_lr=0.2, target=1.5)
    first, again = nce.search(data, config, seed=1), nce.search(data, config, seed=1)
    assert first["widths"] == again["widths"] and first["history"] == again["history"]
    assert len(first["history"]) == 4 and not first["history"][0]["searching"]
    assert first["costs"] == nce.network_costs(first["widths"], num_classes=4)
    assert first["expansions"], "the toy search should expand at this threshold"
    for epoch, layer, width in first["expansions"]:  # the rule fired on what the log shows
        seen = first["history"][epoch]
        assert width not in seen["options"][layer] and seen["probabilities"][layer][-1] > 0.26
        if epoch + 1 < len(first["history"]):
            assert first["history"][epoch + 1]["options"][layer][-1] == width
    for h in first["history"]:
        assert all(math.isclose(sum(p), 1.0, rel_tol=1e-5) for p in h["probabilities"])


@pytest.mark.slow  # two short searches on MNIST-1D
def test_searches_are_cached_by_configuration_and_seed(monkeypatch, tmp_path):
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path))
    config = nce.SearchConfig(epochs=2, warmup=1, batch_size=256)
    first = nce.search_all([(config, 0)], workers=1)[0]
    monkeypatch.setattr(nce, "search", lambda *a, **k: pytest.fail("searched again instead of the cache"))
    assert nce.cached_search(config, 0) == first
    with pytest.raises(pytest.fail.Exception):  # another seed is another search
        nce.cached_search(config, 1)
    assert first["config"]["epochs"] == 2 and len(first["history"]) == 2
    assert first["history"][1]["arch_acc"] is not None and first["history"][0]["arch_acc"] is None
    with pytest.raises(TypeError, match="pairs"):
        nce.search_all([({"epochs": 2}, 0)])


def test_zero_padding_keeps_each_channel_the_output_of_its_own_filter():
    torch.manual_seed(0)
    model = nce.SearchNetwork(nce.SearchConfig(expand=False, align="pad"))
    layer = model.layers[1]
    x = torch.randn(4, 32, 40)
    narrow, wide = layer.conv.weight, layer.conv.weight
    conv8 = F.conv1d(x, narrow[:8], None, layer.conv.stride, layer.conv.padding)
    conv32 = F.conv1d(x, wide[:32], None, layer.conv.stride, layer.conv.padding)
    assert torch.allclose(conv8, conv32[:, :8])  # shared filters: the narrow option is the wide one's start
    padded = nce._zero_pad(conv8, 32)
    assert padded.shape == conv32.shape and torch.equal(padded[:, 8:], torch.zeros_like(padded[:, 8:]))
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)
    with pytest.raises(ValueError, match="align"):
        nce.SearchConfig(align="nearest")


def test_random_widths_stay_within_the_budget_and_cover_the_accepted_set():
    rng = np.random.default_rng(0)
    budget = nce.network_costs((32, 32, 32, 32))["macs"]
    choices = range(8, 65, 8)
    drawn = {nce.random_widths(choices, budget, 0.05, rng) for _ in range(300)}
    accepted = [w for w in itertools.product(choices, repeat=4)
                if abs(nce.network_costs(w)["macs"] - budget) <= 0.05 * budget]
    assert drawn <= set(accepted)
    assert len(drawn) > 0.6 * len(accepted)  # uniform rejection sampling reaches most of them
    params = nce.network_costs((32, 32, 32, 32))["params"]
    w = nce.random_widths(choices, params, 0.05, rng, budget_kind="params")
    assert abs(nce.network_costs(w)["params"] - params) <= 0.05 * params
    with pytest.raises(ValueError, match="no architecture"):
        nce.random_widths([8], budget, 0.01, rng, tries=50)
    with pytest.raises(TypeError, match="generator"):
        nce.random_widths(choices, budget, 0.05, 0)
    with pytest.raises(ValueError, match="budget_kind"):
        nce.random_widths(choices, budget, 0.05, rng, budget_kind="flops")


def test_the_uniform_width_nearest_a_cost_is_the_closest_of_all_widths():
    for width in (8, 31, 32, 33, 50):
        for kind in ("macs", "params"):
            cost = nce.network_costs((width,) * 4)[kind]
            assert nce.uniform_width_near(cost, kind) == width
            target = cost * 1.03
            gaps = {w: abs(nce.network_costs((w,) * 4)[kind] - target) for w in range(1, 80)}
            assert nce.uniform_width_near(target, kind) == min(gaps, key=gaps.get)
    with pytest.raises(ValueError, match="cost"):
        nce.uniform_width_near(-1.0)


def test_architecture_kwargs_leave_the_default_network_unnamed():
    assert nce.architecture_kwargs((32, 32, 32, 32)) == ()
    assert nce.architecture_kwargs([24, 40, 32, 32]) == (("widths", (24, 40, 32, 32)),)
    with pytest.raises(ValueError, match="widths"):
        nce.architecture_kwargs((32, 32))
