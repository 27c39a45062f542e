"""Quantizers: forward grids and every gradient against its hand-derived formula."""

import math

import numpy as np
import pytest
import torch

from qlib import affine
from qlib.quantizers import LSQ, PACT, LSQPlus, RangeFakeQuantizer, mse_clip_range, round_ste, scale_gradient


def test_round_ste_and_scale_gradient():
    x = torch.tensor([0.2, 1.5, -2.7], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, -3.0] and x.grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    z = scale_gradient(x, 0.25)
    (3 * z).sum().backward()
    assert torch.equal(z, x) and torch.allclose(x.grad, torch.full((3,), 0.75))


def test_range_quantizer_forward_matches_the_affine_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g) * 3
    q = RangeFakeQuantizer(4, signed=False, range="current")
    expected = affine.fake_quantize(x, affine.qparams_from_tensor(x, 4))
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert len(q.levels()) == 16


def test_range_quantizer_gradient_is_the_clipped_ste():
    q = RangeFakeQuantizer(4, signed=False, range="ema").train()
    q(torch.tensor([0.0, 1.0]))  # range [0, 1]
    x = torch.tensor([-0.5, 0.3, 0.7, 1.5], requires_grad=True)
    q.eval()
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_range_quantizer_ema_updates_only_in_training():
    q = RangeFakeQuantizer(8, range="ema", decay=0.9).train()
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    assert q.observer.max_val.item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    q.eval()
    q(torch.tensor([0.0, 100.0]))
    assert q.observer.max_val.item() == pytest.approx(2.2)


def test_range_quantizer_per_channel_weights():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).reshape(4, 1, 1, 1)
    q = RangeFakeQuantizer(4, signed=True, scheme="symmetric", narrow_range=True, axis=0, range="current")
    out = q(w)
    expected = affine.fake_quantize(w, affine.qparams_from_tensor(w, 4, "symmetric", True, True, axis=0))
    assert torch.allclose(out, expected, atol=1e-6)


def test_pact_forward_and_gradients():
    pact = PACT(bits=2, alpha=3.0)
    x = torch.tensor([-1.0, 0.4, 1.4, 2.9, 3.0, 5.0], requires_grad=True)
    y = pact(x)
    step = 3.0 / 3
    assert y.tolist() == pytest.approx([0.0, 0.0, step, 3 * step, 3.0, 3.0])
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (y * upstream).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # 1 on [0, alpha), 0 elsewhere
    assert pact.alpha.grad.item() == pytest.approx(5.0 + 6.0)  # sum of upstream where x >= alpha
    assert len(pact.levels()) == 4 and pact.levels()[-1].item() == pytest.approx(3.0)


def test_lsq_initialisation_and_step_gradient():
    torch.manual_seed(0)
    x = torch.randn(1000) * 2
    lsq = LSQ(bits=3, signed=True)
    lsq(x)
    qn, qp = -4, 3
    assert lsq.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    x = x.clone().requires_grad_(True)
    lsq.step.grad = None
    y = lsq(x)
    upstream = torch.randn(1000)
    (y * upstream).sum().backward()
    s = lsq.step.detach()
    v = x.detach() / s
    inside = (v > qn) & (v < qp)
    per_element = torch.where(inside, -v + torch.round(v), torch.where(v <= qn, torch.tensor(float(qn)),
                                                                         torch.tensor(float(qp))))
    expected = (upstream * per_element).sum() / math.sqrt(1000 * qp)
    assert lsq.step.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    assert torch.allclose(x.grad, torch.where(inside, upstream, torch.zeros(1)))
    assert len(lsq.levels()) == 8


def test_lsq_step_stays_positive_and_per_channel():
    lsq = LSQ(bits=4, signed=True, axis=0)
    w = torch.randn(5, 8) * torch.logspace(-2, 1, 5).reshape(5, 1)
    lsq(w)
    assert lsq.step.shape == (5,)
    assert torch.allclose(lsq.step, 2 * w.abs().mean(1) / math.sqrt(7))
    with torch.no_grad():
        lsq.step.fill_(-1.0)  # an optimizer step that overshoots
    out = lsq(w)
    assert torch.isfinite(out).all() and (lsq.qparams().scale > 0).all()
    fresh = LSQ(bits=4, signed=True, axis=0)
    fresh.load_state_dict(lsq.state_dict())
    assert fresh.step.shape == (5,) and bool(fresh.initialized)


def test_lsq_plus_offset_gradient():
    x = torch.tensor([0.0, 0.5, 1.0, 2.0, 10.0])
    q = LSQPlus(bits=2, signed=False, init="minmax")
    q(x)  # init: step = 10 / 3, offset = 0
    assert q.step.item() == pytest.approx(10 / 3) and q.offset.item() == pytest.approx(0.0)
    with torch.no_grad():
        q.step.fill_(1.0)
        q.offset.fill_(-0.8)  # used as a whole step: Z = round(0.8) = 1, grid {-1, 0, 1, 2}
    assert q.levels().tolist() == [-1.0, 0.0, 1.0, 2.0] and q.qparams().zero_point == 1
    xr = torch.tensor([-3.0, 0.4, 1.6, 9.0], requires_grad=True)
    y = q(xr)
    assert y.tolist() == pytest.approx([-1.0, 0.0, 2.0, 2.0])
    y.sum().backward()
    g = 1 / math.sqrt(4 * 3)
    # d y / d offset: 0 inside the range (the offset cancels), 1 where clamped
    assert q.offset.grad.item() == pytest.approx(2 * g)
    assert xr.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def relu_with_outliers():
    # ReLU-like data with two large values: covering them wastes a 2-bit grid
    x = torch.relu(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    x[:2] = 8.0
    return x


def test_mse_clip_range_is_the_least_error_candidate():
    x = relu_with_outliers()
    lo, hi = mse_clip_range(x, bits=2)
    # brute force over the same candidates a * [0, 8], from the formula of a 4-level grid
    errors = {a: ((torch.round(torch.clamp(x / (a * 8 / 3), 0, 3)) * (a * 8 / 3) - x) ** 2).mean().item()
              for a in torch.linspace(0.01, 1.0, 100).tolist()}
    best = min(errors, key=errors.get)
    assert lo.item() == 0.0 and hi.item() == pytest.approx(best * 8, rel=1e-5)
    assert errors[best] < errors[1.0] / 5
    # more bits: less clipping pays
    assert mse_clip_range(x, bits=6)[1] > hi
    # signed, asymmetric data: both ends scale together
    z = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    lo, hi = mse_clip_range(z * torch.sigmoid(z), bits=3)
    assert lo < 0 < hi
    with pytest.raises(TypeError, match="x must be a non-empty floating-point"):
        mse_clip_range(torch.arange(4), bits=2)
    with pytest.raises(ValueError, match="x must be finite"):
        mse_clip_range(torch.tensor([1.0, float("nan")]), bits=2)
    with pytest.raises(ValueError, match="bits must be in"):
        mse_clip_range(x, bits=1)


def test_lsq_plus_and_pact_initialise_from_the_least_error_range():
    x = relu_with_outliers()
    mse, minmax = LSQPlus(bits=2, signed=False), LSQPlus(bits=2, signed=False, init="minmax")
    mse(x), minmax(x)
    _, hi = mse_clip_range(x, bits=2)
    assert mse.step.item() == pytest.approx(hi.item() / 3) and mse.offset.item() == pytest.approx(0.0, abs=1e-7)
    assert minmax.step.item() == pytest.approx(8 / 3)
    assert ((mse(x) - x) ** 2).mean() < ((minmax(x) - x) ** 2).mean() / 5
    z = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    swish = LSQPlus(bits=3, signed=False)
    swish(z * torch.sigmoid(z))
    assert swish.offset.item() < 0  # the grid starts below zero
    pact = PACT(bits=2, alpha=None)  # set on the first batch
    with pytest.raises(ValueError, match="PACT has not been initialised"):
        pact.qparams()
    pact(x)
    assert pact.alpha.item() == pytest.approx(hi.item())
    before = pact.alpha.item()
    pact(x * 3)  # only the first batch initialises
    assert pact.alpha.item() == before
    fresh = PACT(bits=2, alpha=None)
    fresh.load_state_dict(pact.state_dict())
    assert bool(fresh.initialized) and fresh.alpha.item() == before
    with pytest.raises(ValueError, match="init must be one of"):
        LSQPlus(bits=2, init="percentile")


@pytest.mark.parametrize("make", [lambda b: RangeFakeQuantizer(b, range="current"), lambda b: PACT(b),
                                  lambda b: LSQ(b), lambda b: LSQPlus(b)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_quantizer_has_2_to_the_b_levels_and_outputs_on_them(make, bits):
    q = make(bits)
    x = torch.randn(4000, generator=torch.Generator().manual_seed(bits)) * 2
    y = q(x)
    levels = q.levels()
    assert len(levels) == 2**bits
    distance = (y.detach()[:, None] - levels[None, :].float()).abs().min(dim=1).values
    assert distance.max() < 1e-4 * max(1.0, float(levels.abs().max()))


def test_disabled_quantizer_is_the_identity_and_bad_input():
    q = LSQ(4)
    q.enabled = False
    x = torch.randn(10)
    assert torch.equal(q(x), x)
    with pytest.raises(TypeError, match="x must be a floating torch tensor"):
        PACT(4)(torch.arange(3))
    with pytest.raises(ValueError, match="bits must be in \\[2, 16\\]"):
        LSQ(1)
    with pytest.raises(ValueError, match="LSQ has not been initialised"):
        LSQ(4).qparams()
    with pytest.raises(ValueError, match="alpha must be > 0.0"):
        PACT(4, alpha=0.0)
    with pytest.raises(ValueError, match="range must be one of"):
        RangeFakeQuantizer(8, range="max")
    with pytest.raises(ValueError, match="RangeFakeQuantizer has seen no data"):
        RangeFakeQuantizer(8).qparams()
