"""The integer engine against a fake-quantized float model that shares nothing with the engine's export.

``IntegerNetwork.simulate`` and ``layer_errors`` reuse the engine's own codes, clamps and biases, so a
wrong export is invisible to them. Here the reference is built from the float model alone: batch
norms folded by :func:`qlib.fold.fold_batchnorm`, weights fake-quantized by
:func:`qlib.observers.fake_quantize_weights` (8-bit, per channel or per tensor, symmetric, narrow
range), activations fake-quantized at the points the engine codes them, with ranges observed by
:class:`qlib.observers.MinMaxObserver` on the same calibration batches. One small network per engine
feature; a trained quantization-aware network is its own reference (its forward pass is the fake
quantization its quantizers learned).
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from qlib import engine, fold, observers, qat
from qlib.affine import quantize
from qlib.quantizers import APoT, LSQ, RangeFakeQuantizer


def realistic(model, shape, seed=0, negative_gamma=False):
    """Random weights with batch-norm statistics from data (optionally some negative gammas)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 2.0)
                if negative_gamma:
                    m.weight[::3] *= -1
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def reference_codes(model, points, calibration, x, signed=False, per_channel=True, same_grid=None):
    """Output codes of the fake-quantized float model, and the output grid.

    ``points``: the modules whose outputs the engine codes (in order; the last is the output);
    ``same_grid``: ``{point: earlier point}`` for outputs that keep their input's grid (pooling).
    """
    wrapped = nn.Sequential(OrderedDict(input=nn.Identity(), net=fold.fold_batchnorm(model)))
    names = ["input"] + [f"net.{p}" for p in points]
    observed = observers.calibrate_observers(wrapped, names, calibration, observers.MinMaxObserver)
    grids = {n: observed[n].qparams(8, "asymmetric", signed) for n in names}
    for point, source in (same_grid or {}).items():
        grids[f"net.{point}"] = grids["input" if source == "input" else f"net.{source}"]
    quantized = observers.fake_quantize_weights(wrapped, 8, "per-channel" if per_channel else "per-tensor",
                                                "symmetric", True, narrow_range=True)
    with observers.fake_quantize_outputs(quantized, grids), torch.no_grad():
        y = quantized(x)
    out = grids[names[-1]]
    return torch.as_tensor(quantize(y, out)).to(torch.int32), out


def engine_codes(model, calibration, x, **kwargs):
    network = engine.convert(model, calibration, **kwargs)
    q = network.quantize_input(x)
    codes = network.run(q)
    assert torch.equal(network.run(q, "fast"), codes)    # the fused loops change nothing
    return codes.to(torch.int32), network


class ConvBnRelu(nn.Module):
    def __init__(self, dims=2, groups=1, activation=nn.ReLU):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv(4, 4 if groups > 1 else 6, 3, padding=1, groups=groups, bias=False)
        self.bn = bn(self.conv.out_channels)
        self.act = activation()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Pooled(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = pool

    def forward(self, x):
        return self.pool(self.act(self.conv(x)))


class Residual(nn.Module):
    """conv-bn-relu, then a block whose branches (3x3 conv-bn and a 1x1 conv-bn shortcut) add, ReLU,
    global average pooling and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(12, 5)

    def forward(self, x):
        h = self.stem(x)
        return self.classifier(self.flatten(self.pool(self.relu(self.bn(self.conv(h)) + self.shortcut(h)))))


# (model, input shape, coded points, grids kept from an earlier point, engine options, largest LSB difference;
# at least 90 % of the codes identical, 75 % after average pooling's ties and 50 % through the residual block)
FEATURES = {
    "conv2d+bn+relu": (lambda: ConvBnRelu(), (4, 8, 8), ["act"], {}, {}, 1),
    "depthwise+relu6": (lambda: ConvBnRelu(groups=4, activation=nn.ReLU6), (4, 8, 8), ["act"], {}, {}, 1),
    "conv1d, negative gamma": (lambda: ConvBnRelu(dims=1), (4, 16), ["act"], {}, {}, 1),
    "per-tensor weights": (lambda: ConvBnRelu(), (4, 8, 8), ["act"], {}, {"per_channel": False}, 1),
    "int8 activations": (lambda: ConvBnRelu(), (4, 8, 8), ["act"], {}, {"activation_dtype": "int8"}, 1),
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(24, 7)), (4, 6), ["1"], {}, {}, 1),
    "max pooling": (lambda: Pooled(nn.MaxPool2d(2)), (4, 8, 8), ["act", "pool"], {"pool": "act"}, {}, 1),
    "average pooling": (lambda: Pooled(nn.AvgPool2d(2)), (4, 8, 8), ["act", "pool"], {"pool": "act"}, {}, 1),
    "global average pooling": (lambda: Pooled(nn.AdaptiveAvgPool2d(1)), (4, 8, 8), ["act", "pool"],
                               {"pool": "act"}, {}, 1),
    # a residual network compounds one-unit differences through 4 layers and an add
    "residual add": (Residual, (3, 8, 8), ["stem.2", "bn", "shortcut", "relu", "pool", "classifier"],
                     {"pool": "relu"}, {}, 3),
}


@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
def test_engine_matches_fake_quantization_built_from_the_float_model(feature):
    make, shape, points, same_grid, options, max_lsb = FEATURES[feature]
    model = realistic(make(), shape, negative_gamma="negative" in feature)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(64, *shape, generator=g) for _ in range(2)]
    x = torch.randn(128, *shape, generator=g)
    ours, network = engine_codes(model, calibration, x, **options)
    signed = options.get("activation_dtype") == "int8"
    theirs, grid = reference_codes(model, points, calibration, x, signed, options.get("per_channel", True), same_grid)
    assert network.output_spec.scale == pytest.approx(float(grid.scale), rel=1e-6)  # the same observed grid
    assert network.output_spec.zero_point == int(grid.zero_point)
    diff = (ours - theirs).abs()
    assert int(diff.max()) <= max_lsb, f"{feature}: codes differ by up to {int(diff.max())} LSB"
    identical = 0.5 if "residual" in feature else 0.75 if "average" in feature else 0.9
    assert float((diff == 0).float().mean()) > identical


def test_pooling_alone_is_exact():
    """With nothing but pooling there is no fixed-point rounding: the codes are the reference's, except
    at exact ties of an average, which the engine rounds away from zero (TensorFlow Lite's rule) and
    ``torch.round`` to even."""
    for pool in (nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.MaxPool2d(2), nn.AvgPool1d(3)):
        shape = (3, 6) if isinstance(pool, nn.AvgPool1d) else (3, 6, 6)
        model = nn.Sequential(OrderedDict(pool=pool))
        calibration = [torch.rand(16, *shape)]
        x = torch.rand(64, *shape)
        ours, network = engine_codes(model, calibration, x)
        theirs, _ = reference_codes(model, ["pool"], calibration, x, same_grid={"pool": "input"})
        if isinstance(pool, nn.MaxPool2d):
            assert torch.equal(ours, theirs)
            continue
        centred = network.quantize_input(x).to(torch.float64) - network.input_spec.zero_point
        mean = pool(centred)                                  # exact in float64 for these small sums
        tie = (mean - torch.floor(mean)) == 0.5
        assert torch.equal(ours[~tie], theirs[~tie]), type(pool).__name__
        assert torch.equal(ours[tie] - network.input_spec.zero_point,
                           torch.where(mean[tie] > 0, torch.ceil(mean[tie]), torch.floor(mean[tie])).to(torch.int32))


# -- quantization-aware-trained networks: the QAT model is its own reference ----------------------------

def qat_network(weight, act, bits, negative_gamma=False, fold_bn=False, seed=0, weight_offset=0.0,
                unsigned_input=False):
    """conv-bn-relu (4 -> 6 channels), flatten, linear; prepared, calibrated, with test inputs."""
    torch.manual_seed(seed)
    model = realistic(nn.Sequential(ConvBnRelu(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)), (4, 8, 8), seed,
                      negative_gamma)
    with torch.no_grad():
        model[0].conv.weight += weight_offset * model[0].conv.weight.abs().max()  # lopsided: zero-points != 0
    g = torch.Generator().manual_seed(1)
    draw = (lambda n: torch.rand(n, 4, 8, 8, generator=g)) if unsigned_input else (
        lambda n: torch.randn(n, 4, 8, 8, generator=g))
    calibration = [draw(64) for _ in range(2)]
    prepared = qat.prepare(model, weight, act, bits=bits, first_last_bits=None, fold_bn=fold_bn,
                           example_input=calibration[0])
    qat.calibrate_quantizers(prepared, calibration)
    return prepared, calibration, draw(256)


CASES = {
    "lsq per-channel weights": ("lsq", "lsq", 4, {}),
    "negative gamma": ("lsq", "lsq", 4, {"negative_gamma": True}),
    "asymmetric per-tensor weights (zero-points)": (
        lambda b, m: RangeFakeQuantizer(b, signed=True, scheme="asymmetric", range="current"), "lsq", 4,
        {"weight_offset": 0.4}),
    "jacob grid, negative gamma": ("jacob", "minmax", 4, {"negative_gamma": True, "weight_offset": 0.4}),
    "batch norm folded in training": ("lsq", "lsq", 4, {"fold_bn": True}),
    "apot weights (shift-add), negative gamma": (lambda b, m: APoT(b, signed=True), lambda b, s: LSQ(b, signed=s), 4,
                                                 {"negative_gamma": True}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_engine_matches_the_quantization_aware_model(case):
    """The hidden layer's codes are the QAT model's quantized activations (up to one code at rounding
    ties); the logits then agree on the class."""
    weight, act, bits, options = CASES[case]
    prepared, calibration, x = qat_network(weight, act, bits, **options)
    network = engine.convert(prepared, calibration)
    classifier = prepared[2]
    seen = {}
    hook = classifier.input_quantizer.register_forward_hook(lambda _m, _i, out: seen.setdefault("a", out))
    with torch.no_grad():
        fake = prepared.eval()(x)
    hook.remove()
    step = float(classifier.input_quantizer.qparams().scale)
    fake_codes = torch.round(seen["a"] / step).to(torch.int32)
    hidden = network.layers()[0]
    assert hidden.out.scale == pytest.approx(step)                      # the QAT model's grid, rounded once
    codes = network.intermediate_codes(network.quantize_input(x))[hidden.name].flatten(1).to(torch.int32)
    diff = (codes - fake_codes).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.99, (int(diff.max()), diff.float().mean())
    assert float((network(x).argmax(1) == fake.argmax(1)).float().mean()) >= 0.95
    q = network.quantize_input(x)
    assert torch.equal(network.run(q, "fast"), network.run(q))
    if "apot" in case:
        assert isinstance(hidden, engine.IntShiftAdd)
    if "asymmetric" in case or "jacob" in case:
        assert not hidden.symmetric


def test_states_the_engine_cannot_run_are_refused_by_name():
    prepared, calibration, _ = qat_network("lsq", lambda b, s: LSQ(b, signed=s, axis=1), 4)
    with pytest.raises(ValueError, match="layer '0.conv'.*per-channel input grid"):
        engine.convert(prepared, calibration)
    prepared, calibration, _ = qat_network("lsq", "apot", 4)
    with pytest.raises(ValueError, match="layer '2'.*uniform activation grids only"):
        engine.convert(prepared, calibration)
    prepared, calibration, _ = qat_network("lsq", "lsq", 12)
    with pytest.raises(ValueError, match="do not fit int8"):
        engine.convert(prepared, calibration)
    prepared, calibration, _ = qat_network(
        lambda b, m: RangeFakeQuantizer(b, signed=True, scheme="asymmetric", range="current"), "lsq", 4,
        weight_offset=0.4, unsigned_input=True)
    network = engine.convert(prepared, calibration)
    with pytest.raises(ValueError, match="symmetric weights"):
        engine.PyTorchQuantized(network)
