"""Post-training quantization: AdaRound's formulas, reconstruction, the toolbox, and export to the engine."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib import engine, fold, models, ptq, qat
from qlib.quantizers import LSQ, mse_step
from test_engine import calibrated  # a random network with realistic batch-norm statistics


@pytest.fixture(scope="module")
def resnet():
    net = calibrated(models.Mnist1DResNet(width=8), (1, 40))
    x = torch.randn(256, 1, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the float network agrees with
    return net, x, y


# --- AdaRound's pieces, against their formulas ---------------------------------------------------

def test_rectified_sigmoid_and_its_inverse():
    v = torch.linspace(-12, 12, 101)
    h = ptq.rectified_sigmoid(v)
    assert torch.allclose(h, torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1))
    assert h.min() == 0 and h.max() == 1  # reaches both ends exactly, unlike a sigmoid
    inner = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(ptq.rectified_sigmoid(ptq.inverse_rectified_sigmoid(inner)), inner, atol=1e-6)


def test_rounding_regularizer_formula():
    h = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.9])
    for beta in (2.0, 7.5, 20.0):
        expected = sum(1 - abs(2 * float(v) - 1) ** beta for v in h)
        assert float(ptq.rounding_regularizer(h, beta)) == pytest.approx(expected)
    assert float(ptq.rounding_regularizer(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(ptq.rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0


def test_beta_schedule_warms_up_then_falls_linearly():
    s = ptq.BetaSchedule(100, warmup=0.2, start=20, end=2)
    assert not s.regularized(19) and s.regularized(20)
    assert s.beta(20) == 20 and s.beta(99) == pytest.approx(2)
    assert s.beta(20 + 79 // 2) == pytest.approx(20 - 18 * (79 // 2) / 79)
    with pytest.raises(ValueError, match="warmup"):
        ptq.BetaSchedule(10, warmup=1.0)


def _grid(weight, bits=3):
    q = LSQ(bits, signed=True, axis=0, init="mse")
    q(weight)
    return q


def test_adaround_starts_at_the_float_weights_and_hardens_to_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3)
    grid = _grid(w)
    q = ptq.AdaRoundWeights(grid, w)
    step = grid.positive_step().detach().reshape(-1, 1, 1)
    qmin, qmax = q.code_range
    inside = (w / step >= qmin) & (w / step <= qmax - 1)
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-3 * float(step.max()))  # h = fractional part
    q.harden()
    assert torch.equal(q(w), grid(w).detach())  # no learning: exactly round-to-nearest
    assert q.rounded_away(w) == 0.0
    exported = q.export(w)
    assert torch.equal(exported.codes, grid.export(w).codes)
    with pytest.raises(ValueError, match="channels"):
        ptq.AdaRoundWeights(grid, torch.randn(5, 4, 3))
    with pytest.raises(TypeError, match="grid"):
        ptq.AdaRoundWeights(nn.Identity(), w)


def test_mse_step_is_the_best_candidate_of_its_search():
    torch.manual_seed(0)
    w = torch.randn(3, 50) * torch.tensor([[0.1], [1.0], [5.0]])
    steps = mse_step(w, 3, axis=0, candidates=40)
    for channel, step in zip(w, steps):
        top = channel.abs().max()
        candidates = [f / 40 * top / 3 for f in range(1, 41)]
        errors = [float(((torch.clamp(torch.round(channel / s), -4, 3) * s - channel) ** 2).mean()) for s in candidates]
        best = candidates[min(range(40), key=errors.__getitem__)]
        assert float(step) == pytest.approx(float(best), rel=1e-5)
    with pytest.raises(ValueError, match="axis"):
        mse_step(w, 3, axis=2)


# --- Units, capture, Fisher weights --------------------------------------------------------------

def test_layer_and_block_units_of_the_residual_network(resnet):
    net, x, _ = resnet
    q = ptq.round_to_nearest(net, [x], 4)
    layers = [u.names for u in ptq.layer_units(q)]
    assert layers[0] == ("stem",) and layers[-1] == ("classifier",)
    assert ("blocks.0.conv1", "blocks.0.bn1", "blocks.0.relu1") in layers
    assert ("blocks.1.shortcut",) in layers and len(layers) == 1 + 2 + 3 + 3 + 1
    blocks = [u.names for u in ptq.block_units(q)]
    assert blocks == [("stem",), ("blocks.0",), ("blocks.1",), ("blocks.2",), ("classifier",)]
    cnn = ptq.round_to_nearest(calibrated(models.MnistCNN(), (1, 28, 28)), [torch.randn(32, 1, 28, 28)], 4)
    blocks = [u.names for u in ptq.block_units(cnn)]
    assert blocks[:3] == [("features.0",), ("features.1", "features.2"), ("features.3", "features.4")]


def test_capture_gives_a_units_input_and_output(resnet):
    net, x, _ = resnet
    folded = fold.fold_batchnorm(net)
    unit = ptq.Unit(("blocks.1",))
    inp, out = ptq.capture(folded, unit, x, batch_size=100)
    with torch.no_grad():
        expected_in = folded.blocks[0](folded.stem(x))
        assert torch.allclose(inp, expected_in) and torch.allclose(out, folded.blocks[1](expected_in))
        assert torch.allclose(unit(folded, inp), out)


def test_fisher_weights_are_squared_gradients_of_each_examples_loss(resnet):
    net, x, y = resnet
    folded = fold.fold_batchnorm(net)
    units = [ptq.Unit(("stem",)), ptq.Unit(("blocks.2",))]
    weights = ptq.fisher_weights(folded, units, x[:20], y[:20], batch_size=7, normalize=False)
    for n in (0, 13):
        z = folded.blocks(folded.stem(x[n:n + 1])).detach().requires_grad_(True)  # blocks.2's output
        loss = F.cross_entropy(folded.classifier(folded.flatten(z)), y[n:n + 1])
        (grad,) = torch.autograd.grad(loss, z)
        z_stem = folded.stem(x[n:n + 1]).detach().requires_grad_(True)
        loss = F.cross_entropy(folded.classifier(folded.flatten(folded.blocks(z_stem))), y[n:n + 1])
        (grad_stem,) = torch.autograd.grad(loss, z_stem)
        assert torch.allclose(weights[1][n], grad[0] ** 2, rtol=1e-4, atol=1e-12)
        assert torch.allclose(weights[0][n], grad_stem[0] ** 2, rtol=1e-4, atol=1e-12)
    normalized = ptq.fisher_weights(folded, units, x[:20], y[:20])
    assert all(float(w.mean()) == pytest.approx(1.0) for w in normalized)
    damped = ptq.fisher_weights(folded, units, x[:20], y[:20], damping=3.0)
    for w, d in zip(normalized, damped):
        assert torch.allclose(d, (w + 3.0) / 4.0) and d.min() >= 0.75 - 1e-6
    with pytest.raises(ValueError, match="same length"):
        ptq.fisher_weights(folded, units, x[:20], y[:19])


def test_reconstruction_error_sums_channels_and_averages_the_rest():
    pred, target = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    weight = torch.rand(4, 3, 5)
    assert torch.allclose(ptq.reconstruction_error(pred, target), ((pred - target) ** 2).sum() / 20)
    assert torch.allclose(ptq.reconstruction_error(pred, target, weight), (weight * (pred - target) ** 2).sum() / 20)
    with pytest.raises(ValueError, match="shape"):
        ptq.reconstruction_error(pred, target[:, :2])


def test_drop_quantization_keeps_the_quantized_value_with_its_probability():
    quantizer = LSQ(2, signed=True)
    x = torch.randn(20000)
    quantizer(x)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ptq.DropQuantization(quantizer, 1.0, g)(x), quantizer(x))
    assert torch.equal(ptq.DropQuantization(quantizer, 0.0, g)(x), x)
    mixed = ptq.DropQuantization(quantizer, 0.3, g)(x)
    kept = (mixed == quantizer(x)) & (mixed != x)
    assert 0.27 < float(kept.double().mean()) < 0.33


# --- Reconstruction ----------------------------------------------------------------------------

def test_no_iterations_and_no_regulariser_is_round_to_nearest(resnet):
    net, x, y = resnet
    rtn = ptq.round_to_nearest(net, [x], 3, 4)
    learned = ptq.round_to_nearest(net, [x], 3, 4)
    log = ptq.reconstruct(learned, fold.fold_batchnorm(net), x, ptq.Reconstruction(iterations=0, lam=0.0))
    assert len(log["units"]) == len(ptq.layer_units(rtn))
    with torch.no_grad():
        assert torch.equal(learned(x), rtn(x))
    assert all(a == 0.0 for u in log["units"] for a in u["rounded_away"])


@pytest.mark.parametrize("config", [
    ptq.Reconstruction("layer", "mse", iterations=20, batch_size=64, lr=3e-2),
    ptq.Reconstruction("block", "fisher", iterations=20, batch_size=64, lr=3e-2, act_lr=1e-3, drop=0.5),
], ids=["adaround", "qdrop"])
def test_reconstruction_ends_with_integer_codes_the_engine_runs_unchanged(resnet, config):
    net, x, y = resnet
    folded = fold.fold_batchnorm(net)
    q = ptq.round_to_nearest(net, [x], 3, 4)
    rtn = ptq.round_to_nearest(net, [x], 3, 4)
    log = ptq.reconstruct(q, folded, x, config, labels=y, seed=0, snapshots=3)
    quantizers = ptq.adaround_quantizers(q)
    assert len(quantizers) == len(qat.quantized_layers(q)) and all(a.hard for a in quantizers.values())
    assert all(len(u["loss"]) == 20 and len(u["h"]) == 3 for u in log["units"])
    converted = engine.convert(q, [x[:64]])
    layers = {op.name: op for op in converted.ops if isinstance(op, engine.IntLayer)}
    for name, a in quantizers.items():
        layer = q.get_submodule(name)
        codes = a.codes(layer.weight)
        nearest = dict(qat.quantized_layers(rtn))[name].weight_quantizer.export(layer.weight).codes
        assert (codes - nearest).abs().max() <= 1  # one level up or down, never further
        assert torch.equal(layers[name.replace(".", "_")].weight.to(torch.int64), codes.to(torch.int64))
    learned = any(not torch.equal(a.input_quantizer.step, b.input_quantizer.step)
                  for (_, a), (_, b) in zip(qat.quantized_layers(q), qat.quantized_layers(rtn)))
    assert learned == (config.act_lr is not None)  # activation grids change only when they learn


def test_learned_rounding_lowers_a_layers_output_error():
    """The premise: rounding each weight to nearest is not what minimises the layer's output error."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(512, 16) @ torch.randn(16, 16)  # correlated inputs: errors can cancel across weights
    q = ptq.round_to_nearest(layer, [x], bits=2, act_bits=8, first_last_bits=None)
    with torch.no_grad():
        target = layer(x)
        before = float(ptq.reconstruction_error(q(x), target))
    ptq.reconstruct(q, layer, x, ptq.Reconstruction(iterations=400, batch_size=128, lr=5e-2, lam=0.01))
    with torch.no_grad():
        after = float(ptq.reconstruction_error(q(x), target))
    assert after < 0.8 * before


def test_reconstruction_refuses_what_it_cannot_do(resnet):
    net, x, y = resnet
    with pytest.raises(ValueError, match="granularity"):
        ptq.Reconstruction(granularity="network")
    with pytest.raises(ValueError, match="loss"):
        ptq.Reconstruction(loss="kl")
    with pytest.raises(ValueError, match="drop"):
        ptq.Reconstruction(drop=1.5)
    q = ptq.round_to_nearest(net, [x], 4)
    with pytest.raises(ValueError, match="labels"):
        ptq.reconstruct(q, fold.fold_batchnorm(net), x, ptq.Reconstruction(loss="fisher"))
    with pytest.raises(ValueError, match="quantized layers"):
        ptq.reconstruct(fold.fold_batchnorm(net), net, x, ptq.Reconstruction())
    with pytest.raises(TypeError, match="config"):
        ptq.reconstruct(q, net, x, {"iterations": 10})
    with pytest.raises(TypeError, match="model"):
        ptq.round_to_nearest("resnet", [x])
    with pytest.raises(ValueError, match="calibration"):
        ptq.round_to_nearest(net, [])


# --- The toolbox ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, pairs", [
    ("mnist1d_cnn", (1, 40), [("features.0.0", "features.1.0"), ("features.1.0", "features.2.0"),
                              ("features.2.0", "features.3.0")]),
    ("mnist_cnn", (1, 28, 28), None),
    ("mnist1d_resnet", (1, 40), [(f"blocks.{i}.conv1", f"blocks.{i}.conv2") for i in range(3)]),
])
def test_equalization_keeps_the_function_and_equalizes_ranges(name, shape, pairs):
    net = calibrated(models.build_model(name), shape)
    folded = fold.fold_batchnorm(net)
    found = ptq.equalization_pairs(folded)
    if pairs is not None:
        assert found == pairs
    else:  # MobileNet-style: every layer feeds the next through a ReLU, depthwise ones included
        assert len(found) == 6 and ("features.1.0", "features.2.0") in found
    equalized = ptq.equalize(net, sweeps=20)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        assert torch.allclose(equalized(x), folded(x), rtol=1e-4, atol=1e-4)
    first, second = (equalized.get_submodule(n) for n in found[-1])
    r1 = first.weight.reshape(first.weight.shape[0], -1).abs().amax(dim=1)
    view = second.weight.reshape(second.weight.shape[0], -1) if second.groups > 1 else \
        second.weight.transpose(0, 1).reshape(second.weight.shape[1], -1)
    r2 = view.abs().amax(dim=1)
    assert torch.allclose(r1, r2, rtol=1e-3)  # the last pair of a chain is exactly balanced
    with pytest.raises(ValueError, match="float models"):
        ptq.equalize(ptq.round_to_nearest(net, [x], 8))


def test_bias_correction_removes_each_layers_mean_shift(resnet):
    net, x, _ = resnet
    q = ptq.round_to_nearest(net, [x], 2, 8)
    shifts = ptq.correct_bias(q, [x[:128], x[128:]])
    assert set(shifts) == {n for n, _ in qat.quantized_layers(q)}
    with torch.no_grad():
        for name, layer in qat.quantized_layers(q):
            inputs = ptq.toolbox._layer_inputs(q, name, [x])  # later corrections do not change them
            error = layer.quantized_weight() - layer.weight
            out = F.linear(inputs, error) if isinstance(layer, nn.Linear) else F.conv1d(
                inputs, error, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            shift = out.mean(dim=[d for d in range(out.ndim) if d != 1])
            assert torch.allclose(shift, shifts[name], rtol=1e-4, atol=1e-9) and shift.abs().max() > 1e-7
    with pytest.raises(ValueError, match="fold"):
        ptq.correct_bias(ptq.round_to_nearest(net, [x], 4, fold=False), [x])


def test_batchnorm_reestimation_measures_the_quantized_networks_statistics(resnet):
    net, x, _ = resnet
    q = ptq.round_to_nearest(net, [x], 3, 8, fold=False)
    batches = [x[:128], x[128:]]
    ptq.reestimate_batchnorm(q, batches)
    inputs = []
    handle = q.stem[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            q(b)
    handle.remove()
    # a cumulative average (momentum None) of the per-batch statistics of the quantized network
    mean = torch.stack([z.mean(dim=(0, 2)) for z in inputs]).mean(0)
    var = torch.stack([z.var(dim=(0, 2), unbiased=True) for z in inputs]).mean(0)
    assert torch.allclose(q.stem[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(q.stem[1].running_var, var, rtol=1e-4, atol=1e-6)
    assert not q.training and q.stem[1].momentum == 0.1
    with pytest.raises(ValueError, match="batch norm"):
        ptq.reestimate_batchnorm(ptq.round_to_nearest(net, [x], 4), [x])
