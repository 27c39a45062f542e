"""DSQ, DAQ and EWGS: forward = hard rounding, backward = the hand-derived formulas."""

import math

import pytest
import torch
from torch import nn

from qlib import qat
from qlib.quantizers import (DAQ, DSQ, EWGS, LSQ, STE, APoT, EWGSSchedule, daq_soft_round, dsq_round,
                             estimate_ewgs_deltas, ewgs_discretize, ewgs_quantizers)
from qlib.data import Dataset


def off_ties(lo=-0.45, hi=3.45, n=391):
    """Points in steps that avoid exact ties (k + 1/2) and integers."""
    return torch.linspace(lo, hi, n, dtype=torch.float64) + 1e-3


def elementwise_grad(fn, u):
    u = u.clone().requires_grad_(True)
    y = fn(u)
    (g,) = torch.autograd.grad(y.sum(), u)
    return y.detach(), g


# DSQ

@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.9])
def test_dsq_forward_is_rounding_and_backward_is_tanh_slope(alpha):
    u = off_ties()
    y, g = elementwise_grad(lambda t: dsq_round(t, torch.tensor(alpha, dtype=torch.float64)), u)
    assert torch.equal(y, torch.round(u))
    s, k = 1 / (1 - alpha), math.log(2 / alpha - 1)
    centre = torch.floor(u) + 0.5
    expected = 0.5 * s * k * (1 - torch.tanh(k * (u - centre)) ** 2)
    assert torch.allclose(g, expected, atol=1e-12)
    # the soft staircase meets the grid at the interval ends: slope there is (1 - (1 - alpha)^2) * s * k / 2
    edge = elementwise_grad(lambda t: dsq_round(t, torch.tensor(alpha, dtype=torch.float64)),
                            torch.tensor([1.0 + 1e-12], dtype=torch.float64))[1]
    assert float(edge) == pytest.approx(0.5 * s * k * (1 - (1 - alpha) ** 2), rel=1e-6)


def test_dsq_alpha_gradient_matches_finite_difference():
    u = off_ties(n=37)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, len(u), dtype=torch.float64)
    (dalpha,) = torch.autograd.grad((dsq_round(u, alpha) * weights).sum(), alpha)

    def soft(a):
        s, k = 1 / (1 - a), math.log(2 / a - 1)
        lower = torch.floor(u)
        return (lower + 0.5 + 0.5 * s * torch.tanh(k * (u - lower - 0.5))) * weights

    eps = 1e-6
    numeric = (soft(0.3 + eps).sum() - soft(0.3 - eps).sum()) / (2 * eps)
    assert float(dalpha) == pytest.approx(float(numeric), rel=1e-5)


def test_dsq_rejects_alpha_outside_unit_interval():
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha must lie in"):
            dsq_round(torch.zeros(3), torch.tensor(alpha))
    with pytest.raises(ValueError, match="alpha"):
        DSQ(alpha=1.0)


def test_dsq_alpha_stays_inside_unit_interval_under_huge_steps():
    q = LSQ(2, signed=True, rounding=DSQ())
    x = torch.randn(64, 8)
    for direction in (1e4, -1e4):
        opt = torch.optim.SGD(q.parameters(), lr=1.0)
        for _ in range(3):
            loss = direction * q(x).pow(2).sum() + direction * q.rounding.alpha
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert 0 < float(q.rounding.alpha.detach()) < 1
            assert torch.isfinite(q(x)).all()


# DAQ

@pytest.mark.parametrize("temperature,sigma", [(2.0, 1.0), (2.0, 2.0), (1.0, 1.0), (4.0, 0.5)])
def test_daq_soft_rounding_equals_hard_rounding(temperature, sigma):
    u = off_ties()
    y = daq_soft_round(u, temperature, sigma)
    assert torch.allclose(y, torch.round(u), atol=1e-12)


def test_daq_backward_is_the_derived_bump_peaking_at_the_boundary():
    temperature, sigma = 2.0, 1.0
    d = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    _, g = elementwise_grad(lambda t: daq_soft_round(t, temperature, sigma), d + 3)
    nearest = (d > 0.5).double()
    s0 = torch.exp(-d) * torch.exp(-nearest**2 / sigma**2)
    s1 = torch.exp(-(1 - d)) * torch.exp(-(1 - nearest) ** 2 / sigma**2)
    e = math.exp(temperature)
    expected = temperature * e / (e**2 - 1) * (s0 + s1) / (s0 - s1).abs()
    assert torch.allclose(g, expected, rtol=1e-9)
    assert (g > 0).all()
    below = g[d < 0.5]
    assert torch.all(below[1:] > below[:-1])          # rises towards the boundary
    assert float(g[(d - 0.49).abs().argmin()]) > 1.3 * float(g[0])
    # the values the notes derived for T = 2, sigma = 1
    for point, value in ((0.01, 0.364), (0.25, 0.434), (0.49, 0.587)):
        assert float(g[(d - point).abs().argmin()]) == pytest.approx(value, abs=2e-3)


def test_daq_quantizer_forward_exactly_matches_lsq_grid():
    torch.manual_seed(0)
    x = torch.randn(16, 9)
    lsq, daq = LSQ(2, signed=True), LSQ(2, signed=True, rounding=DAQ())
    assert torch.equal(lsq(x), daq(x))
    with pytest.raises(ValueError, match="temperature"):
        daq_soft_round(torch.zeros(2), temperature=0.0)
    with pytest.raises(ValueError, match="sigma"):
        DAQ(sigma=-1.0)


@pytest.mark.parametrize("grid", [lambda r: LSQ(3, signed=True, rounding=r),
                                  lambda r: APoT(3, signed=True, rounding=r)], ids=["lsq", "apot"])
def test_every_rounding_on_a_grid_shares_its_forward_and_differs_only_in_gradient(grid):
    torch.manual_seed(1)
    x = torch.randn(32, 5)
    outputs, grads = [], []
    for rounding in (STE(), DSQ(), DAQ(), EWGS()):
        q = grid(rounding)
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        y.sum().backward()
        outputs.append(y.detach())
        grads.append(xi.grad)
        assert torch.allclose(q.export(x).dequantize().float(), y.detach(), atol=1e-6)  # all export alike
    for y in outputs[1:]:
        assert torch.equal(y, outputs[0])
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])
    assert torch.equal(grads[0], grads[3])  # EWGS with delta = 0 is the STE


# EWGS

def test_ewgs_backward_formula():
    torch.manual_seed(2)
    u = (torch.rand(200, dtype=torch.float64) * 4 - 0.5).requires_grad_(True)
    u_q = torch.round(u.detach())
    g = torch.randn(200, dtype=torch.float64)
    for delta in (0.0, 0.3, 2.5):
        counts = torch.zeros(2, dtype=torch.float64)
        y = ewgs_discretize(u, u_q, delta, flip_counts=counts)
        assert torch.equal(y, u_q)
        (grad,) = torch.autograd.grad(y, u, g)
        factor = 1 + delta * torch.sign(g) * (u.detach() - u_q)
        assert torch.allclose(grad, g * factor)
        assert counts[0] == (factor < 0).sum() and counts[1] == 200
        if delta < 2:  # |u - u_q| <= 1/2, so the factor stays positive below delta = 2
            assert counts[0] == 0
        else:
            assert counts[0] > 0


def test_ewgs_scales_up_a_gradient_that_pushes_towards_the_next_level():
    u = torch.tensor([1.3, 1.3, 1.7, 1.7], requires_grad=True)
    y = ewgs_discretize(u, torch.round(u.detach()), 0.5)
    g = torch.tensor([1.0, -1.0, 1.0, -1.0])
    (grad,) = torch.autograd.grad(y, u, g)
    # 1.3 rounds down: a descent step (-g) that lowers u (g > 0) moves it away from the next level -> larger
    assert grad.tolist() == pytest.approx([1.15, -0.85, 0.85, -1.15])


def test_ewgs_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        ewgs_discretize(torch.zeros(3), torch.zeros(4), 0.1)


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Dataset("tiny", x, y, x[:32], y[:32], ("a", "b"))


def tiny_model(method="lsq+ewgs", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    return qat.prepare(model, method, method, bits=2, first_last_bits=None, example_input=torch.rand(8, 6))


@pytest.mark.slow  # 1,500 Hutchinson probes
def test_delta_estimates_are_finite_nonnegative_and_follow_the_definition():
    data = tiny_data()
    model = tiny_model()
    qat.calibrate_quantizers(model, [data.x_train[:32]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    batches = [(data.x_train[i:i + 32], data.y_train[i:i + 32]) for i in (0, 32, 64)]
    deltas = estimate_ewgs_deltas(model, batches, max_probes=1500, tol=0.0)
    assert set(deltas) == set(ewgs_quantizers(model))
    assert all(math.isfinite(d) and d >= 0 for d in deltas.values())
    assert any(d > 0 for d in deltas.values())
    for k, v in model.state_dict().items():  # only the deltas changed
        if not k.endswith("ewgs_delta"):
            assert torch.equal(v, before[k]), k
    # the same parameter objects: an optimizer created before the estimate still trains them
    assert all(p is q for p, q in zip(model.parameters(), parameters))

    # recompute one delta by hand with the exact Hessian of the loss w.r.t. the last layer's input codes
    name = "4.input_quantizer"
    q = ewgs_quantizers(model)[name]
    total = 0.0
    for x, y in batches:
        q.capture = True
        loss = nn.functional.cross_entropy(model(x), y)
        out = q.captured
        q.capture = False
        (grad,) = torch.autograd.grad(loss, out, create_graph=True)
        flat = grad.reshape(-1)
        trace = sum(torch.autograd.grad(flat[i], out, retain_graph=True)[0].reshape(-1)[i]
                    for i in range(flat.numel()))
        total += float(trace) / out.numel() / (3 * float(grad.detach().std()))
    assert deltas[name] == pytest.approx(max(0.0, total / 3), rel=0.1, abs=1e-4)


def test_delta_is_zero_when_the_gradient_has_no_spread():
    model = tiny_model()
    x, y = torch.rand(4, 6), torch.zeros(4, dtype=torch.long)
    for p in model.parameters():   # a constant network: every gradient w.r.t. the codes is equal or zero
        nn.init.zeros_(p) if p.dim() > 0 else None
    deltas = estimate_ewgs_deltas(model, [(x, y)], max_probes=5)
    assert all(d == 0.0 for d in deltas.values())


def test_schedule_logs_deltas_and_leaves_first_epochs_as_ste():
    data = tiny_data()
    model = tiny_model()
    schedule = EWGSSchedule(data, every=2, first=2, num_batches=2, batch_size=32, max_probes=20)
    schedule(1, model)
    assert all(row["delta"] == 0.0 for row in schedule.log)
    schedule(2, model)
    schedule(3, model)
    schedule.close(model)
    epochs = {row["epoch"] for row in schedule.log}
    assert epochs == {1, 2, 3}
    second = [row["delta"] for row in schedule.log if row["epoch"] == 2]
    third = [row["delta"] for row in schedule.log if row["epoch"] == 3]
    assert second == third and any(d > 0 for d in second)   # not re-estimated at epoch 3
    assert all(row["flipped"] is not None and row["peak"] is not None for row in schedule.log)


def test_peak_scaled_error_tracks_the_flip_margin():
    q = LSQ(2, signed=True, rounding=EWGS())
    q.train()
    x = torch.randn(50, 3)
    q(x)
    q.rounding.ewgs_delta.fill_(1.5)
    q.rounding.peak()                    # reset
    q(x)
    u = torch.clamp(x / q.positive_step().detach(), *q.code_range)
    assert q.rounding.peak() == pytest.approx(1.5 * float((u - torch.round(u)).abs().max()), rel=1e-5)


def test_estimate_needs_ewgs_quantizers_and_batches():
    with pytest.raises(ValueError, match="no EWGS quantizer"):
        estimate_ewgs_deltas(tiny_model("lsq"), [(torch.rand(2, 6), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="empty"):
        estimate_ewgs_deltas(tiny_model(), [])
    with pytest.raises(ValueError, match="every"):
        EWGSSchedule(tiny_data(), every=0)


@pytest.mark.slow  # trains a network
def test_qat_with_each_gradient_method_lowers_the_loss():
    data = tiny_data()
    for method in ("lsq+dsq", "lsq+daq", "lsq+ewgs"):
        model = tiny_model(method)
        qat.calibrate_quantizers(model, [data.x_train[:32]])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for step in range(60):
            if method == "lsq+ewgs" and step == 10:
                estimate_ewgs_deltas(model, [(data.x_train[:32], data.y_train[:32])], max_probes=10)
            model.train()
            loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), method


def test_estimate_leaves_batchnorm_statistics_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 2))
    model = qat.prepare(model, "lsq+ewgs", "lsq+ewgs", bits=2, first_last_bits=None, example_input=torch.rand(8, 6))
    data = tiny_data()
    qat.calibrate_quantizers(model, [data.x_train[:32]])
    stats = [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm1d) for b in m.buffers()]
    estimate_ewgs_deltas(model, [(data.x_train[:32], data.y_train[:32])], max_probes=5)
    after = [b for m in model.modules() if isinstance(m, nn.BatchNorm1d) for b in m.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))
    assert not model.training   # the mode it was in
