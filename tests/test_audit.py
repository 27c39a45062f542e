"""Regression tests for the bugs an audit of qlib found (issue 11); each failed before its fix.

* a model prepared with the default ``weight="ste"`` could not be reloaded (per-channel ranges);
* the engine dropped weight zero-points (per-tensor asymmetric weights ran at chance);
* negative batch-norm gamma, batch-norm eps and the per-channel LSQ gradient scale were unguarded:
  a mutation of any of them passed the whole suite;
* average pooling rounded twice (SRDHM, then a rounding shift): not the nearest code;
* ReLU6's upper clamp rounded 6/S half to even.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlib import engine, models, qat
from qlib.quantizers import LSQ, RangeFakeQuantizer


def tiny_1d(seed=0, negative_gamma=False, eps=1e-5):
    """A small Mnist1DCNN with realistic batch-norm statistics (optionally negative gammas, large eps)."""
    torch.manual_seed(seed)
    model = models.Mnist1DCNN(width=8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eps = eps
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 1, 40))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                if negative_gamma:
                    m.weight[::2] *= -1          # every other channel flips sign
                m.bias.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.01, 0.05)  # small variances: eps matters
    return model.eval()


def batches(n=3, seed=1, shape=(1, 40)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, *shape, generator=g) for _ in range(n)]


# -- 1. every method prepare() accepts survives a save -> load round trip --------------------------

PAIRS = [(w, "lsq") for w in qat.WEIGHT_METHODS] + [("lsq", a) for a in qat.ACT_METHODS if a != "lsq"]


@pytest.mark.parametrize("weight,act", PAIRS, ids=[f"{w}-{a}" for w, a in PAIRS])
def test_prepared_model_reloads_for_every_method(weight, act):
    model = tiny_1d()
    prepared = qat.prepare(model, weight, act, bits=4)
    qat.calibrate_quantizers(prepared, batches())
    fresh = qat.prepare(model, weight, act, bits=4)
    fresh.load_state_dict(prepared.state_dict())
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(prepared.eval()(x), fresh.eval()(x))


# -- 2. the engine runs weight zero-points, negative gamma and eps as the fake-quant model ---------

def asymmetric_per_tensor_weights(bits, module):
    return RangeFakeQuantizer(bits, signed=True, scheme="asymmetric", axis=None, range="current")


def fake_quant_vs_engine(prepared, calibration, x):
    """Max output difference (in output LSB) and argmax agreement of the engine vs the QAT model."""
    network = engine.convert(prepared, calibration)
    with torch.no_grad():
        fake = prepared.eval()(x)
    ours = network(x)
    lsb = network.output_spec.scale
    return float((ours - fake).abs().max()) / lsb, float((ours.argmax(1) == fake.argmax(1)).float().mean())


@pytest.mark.parametrize("bits", [8, 4])
def test_engine_runs_asymmetric_weights_with_their_zero_points(bits):
    prepared = qat.prepare(tiny_1d(), asymmetric_per_tensor_weights, "lsq", bits=bits, first_last_bits=None)
    calibration = batches()
    qat.calibrate_quantizers(prepared, calibration)
    max_lsb, agreement = fake_quant_vs_engine(prepared, calibration, batches(1, seed=7)[0])
    assert agreement >= 0.95 and max_lsb <= 8, (max_lsb, agreement)


def test_engine_export_handles_negative_gamma():
    prepared = qat.prepare(tiny_1d(negative_gamma=True), "lsq", "lsq", bits=4)
    calibration = batches()
    qat.calibrate_quantizers(prepared, calibration)
    max_lsb, agreement = fake_quant_vs_engine(prepared, calibration, batches(1, seed=7)[0])
    assert agreement >= 0.95 and max_lsb <= 8, (max_lsb, agreement)


def test_engine_export_uses_batchnorm_eps():
    prepared = qat.prepare(tiny_1d(eps=0.05), "lsq", "lsq", bits=4)
    calibration = batches()
    qat.calibrate_quantizers(prepared, calibration)
    max_lsb, agreement = fake_quant_vs_engine(prepared, calibration, batches(1, seed=7)[0])
    assert agreement >= 0.95 and max_lsb <= 8, (max_lsb, agreement)


def test_conv_bn_folding_uses_eps():
    model = tiny_1d(eps=0.05)
    conv, bn = model.features[1][0], model.features[1][1]
    fused = qat.QuantConvBn(conv, bn, LSQ(8), None)
    fused.weight_quantizer.enabled = False
    fused.freeze_statistics()
    x = torch.randn(16, 8, 40)
    with torch.no_grad():
        assert torch.allclose(fused.eval()(x), bn(conv(x)), atol=1e-5)


# -- 3. LSQ's gradient scale counts the elements per step ------------------------------------------

def test_per_channel_lsq_gradient_scale_counts_elements_per_channel():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0, 0.2]).reshape(6, 1, 1)
    q = LSQ(bits=3, signed=True, axis=0)
    q(x)  # initialise
    upstream = torch.randn_like(x)
    step = q.positive_step().detach().reshape(6, 1, 1)
    (q(x) * upstream).sum().backward()
    qn, qp = q.code_range
    v = x / step
    inside = (v > qn) & (v < qp)
    local = torch.where(inside, torch.round(v) - v, torch.where(v <= qn, torch.tensor(float(qn)),
                                                                torch.tensor(float(qp))))
    g = 1.0 / np.sqrt(15 * qp)  # 15 elements share each channel's step
    expected = g * (local * upstream).sum(dim=(1, 2))
    assert torch.allclose(q.step.grad, expected, rtol=1e-5, atol=1e-7)


# -- 4. average pooling rounds once, to the nearest code ------------------------------------------

def exact_mean_code(window_codes, zero_point):
    """The nearest integer to the exact mean of the centred codes (ties away from zero), plus Z."""
    mean = Fraction(int(sum(int(c) - zero_point for c in window_codes)), len(window_codes))
    magnitude = abs(mean)
    rounded = int(magnitude) + (1 if magnitude - int(magnitude) >= Fraction(1, 2) else 0)
    return zero_point + (rounded if mean >= 0 else -rounded)


def pool_network(module, shape, zero_point, signed=False):
    """A converted network that is a single pooling layer on a known input grid."""
    model = nn.Sequential(module)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    lo = -(zero_point - qmin) * 0.1
    hi = (qmax - zero_point) * 0.1
    calibration = torch.zeros(1, *shape)
    calibration.view(-1)[:2] = torch.tensor([lo, hi])
    network = engine.convert(model, [calibration], activation_dtype="int8" if signed else "uint8")
    assert network.input_spec.zero_point == zero_point
    return network


@pytest.mark.parametrize("window,total,expected", [(4, 1, 0), (4, 5, 1), (9, 4, 0), (9, -4, 0), (16, 7, 0),
                                                    (4, 2, 1), (4, -2, -1), (4, -6, -2)])
def test_average_pool_examples(window, total, expected):
    side = int(np.sqrt(window))
    codes = [0] * window
    codes[0] = total
    network = pool_network(nn.AvgPool2d(side), (1, side, side), zero_point=100)
    q = (torch.tensor(codes) + 100).reshape(1, 1, side, side).to(torch.uint8)
    out = network.run(q)
    assert int(out.flatten()[0]) - 100 == expected


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(nn.AvgPool2d(2), (1, 4, 4)), (nn.AvgPool2d(3), (1, 6, 6)), (nn.AvgPool1d(4), (1, 8)),
                        (nn.AdaptiveAvgPool2d(1), (1, 4, 4)), (nn.AdaptiveAvgPool1d(1), (1, 7))]),
       st.integers(0, 255), st.booleans(), st.integers(0, 2**31 - 1))
def test_average_pool_is_the_nearest_code_to_the_exact_mean(pool_shape, zero_point, signed, seed):
    module, shape = pool_shape
    if signed:
        zero_point -= 128
    network = pool_network(module, shape, zero_point, signed)
    low, high = (-128, 127) if signed else (0, 255)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high + 1, (2, *shape), generator=g).to(torch.int8 if signed else torch.uint8)
    out = network.run(q).to(torch.int64)
    windows = module(torch.zeros(1, *shape)).shape[2:]
    x = q.to(torch.int64)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        expected = [[exact_mean_code(x[n, 0].flatten().tolist(), zero_point)] for n in range(2)]
        assert out.reshape(2, -1).tolist() == expected
    else:
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        for n in range(2):
            for idx in np.ndindex(*windows):
                window = x[n, 0][tuple(slice(i * k, i * k + k) for i in idx)].flatten().tolist()
                assert int(out[n, 0][idx]) == exact_mean_code(window, zero_point)


# -- 5. ReLU6's upper clamp: zero-point + round(6 / S), halves away from zero ----------------------

def test_relu6_upper_clamp_rounds_halves_away_from_zero():
    # S = 12: 6 / S = 0.5 exactly; half away from zero gives 1 (round-half-even gave 0)
    spec = engine.ActSpec(12.0, 0, 0, 255, torch.uint8)
    assert engine.clamp_bounds(spec, "relu6") == (0, 1)
    spec = engine.ActSpec(4.0, 3, 0, 255, torch.uint8)   # 6 / 4 = 1.5 -> 2
    assert engine.clamp_bounds(spec, "relu6") == (3, 5)
