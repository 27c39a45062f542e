"""One quantizer interface: any grid takes any rounding, every grid exports alike, methods by name,
and training paths that stay on the tensor's device."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib import affine, qat
from qlib.quantizers import (DAQ, DSQ, EWGS, GRIDS, LSQ, PACT, ROUNDINGS, STE, APoT, LSQPlus, RangeFakeQuantizer,
                             Rounding, apot_levels, enclosing_levels, make_quantizer, method_names, parse_method)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def grids(rounding):
    """One quantizer of every grid, all with the same rounding."""
    return {
        "minmax weights": RangeFakeQuantizer(3, signed=True, scheme="symmetric", narrow_range=True, axis=0,
                                             range="current", rounding=rounding),
        "ema activations": RangeFakeQuantizer(3, signed=False, range="ema", rounding=rounding),
        "pact": PACT(3, alpha=None, rounding=rounding),
        "lsq": LSQ(3, signed=True, axis=0, rounding=rounding),
        "lsq+": LSQPlus(3, signed=False, rounding=rounding),
        "apot": APoT(3, signed=True, rounding=rounding),
        "pot activations": APoT(3, signed=False, grid="pot", rounding=rounding),
    }


def data_for(name, g):
    x = torch.randn(8, 3, 5, generator=g, dtype=torch.float64).float()
    return x.relu() if name in ("pact", "pot activations") else x


@pytest.mark.parametrize("rounding", [STE, DSQ, DAQ, EWGS], ids=lambda r: r.__name__)
def test_every_grid_takes_every_rounding_and_exports_what_it_computes(rounding):
    g = torch.Generator().manual_seed(0)
    reference = grids(STE())
    for name, q in grids(rounding()).items():
        x = data_for(name, g)
        ref = reference[name]
        y, y_ref = q(x), ref(x)
        assert torch.equal(y, y_ref), name                      # the rounding changes the backward pass only
        export = q.export(x)
        assert export.codes.dtype == torch.int64
        assert torch.allclose(export.dequantize().float(), y, atol=1e-6), name
        assert int(export.codes.min()) >= export.qmin and int(export.codes.max()) <= export.qmax
        xi = x.clone().requires_grad_(True)
        q(xi).sum().backward()
        assert torch.isfinite(xi.grad).all(), name


def test_a_new_rounding_is_a_few_lines():
    class Zero(Rounding):        # a rounding that lets no gradient through: the true derivative a.e.
        def round(self, u, u_q, levels):
            return u_q + 0 * u

    for q in (LSQ(2, signed=True, rounding=Zero()), APoT(2, signed=False, rounding=Zero())):
        x = torch.rand(20, requires_grad=True)
        q(x).sum().backward()
        assert torch.equal(x.grad, torch.zeros(20))


def test_enclosing_levels_on_the_integer_grid_and_on_a_level_set():
    u = torch.tensor([-1.5, 0.0, 0.3, 2.0])
    lower, upper = enclosing_levels(u)
    assert lower.tolist() == [-2.0, 0.0, 0.0, 2.0] and upper.tolist() == [-1.0, 1.0, 1.0, 3.0]
    levels = apot_levels(2, signed=False).float()     # 0, 1/4, 1/2, 1
    lower, upper = enclosing_levels(torch.tensor([0.0, 0.3, 0.6, 1.0]), levels)
    assert lower.tolist() == [0.0, 0.25, 0.5, 0.5] and upper.tolist() == [0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("make", [DSQ, DAQ])
def test_soft_roundings_scale_to_the_interval_of_an_uneven_grid(make):
    """On a level set the soft staircase lives in each interval: d(u_q)/du at u equals the unit-grid
    slope at (u - l) / (h - l), the width cancelling (value scales by h - l, argument by 1 / (h - l))."""
    rounding = make()
    levels = apot_levels(2, signed=False).double()                       # widths 1/4, 1/4, 1/2
    d = torch.tensor([0.2, 0.35, 0.7], dtype=torch.float64)
    u = torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64) + d * torch.tensor([0.25, 0.25, 0.5],
                                                                              dtype=torch.float64)
    u.requires_grad_(True)
    (grad,) = torch.autograd.grad(rounding(u, levels).sum(), u)
    unit = d.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(rounding(unit + 3).sum(), unit)    # integer grid, same fractions
    assert torch.allclose(grad, expected, rtol=1e-9)


def test_method_names_parse_into_grid_and_rounding():
    assert parse_method("lsq") == ("lsq", "ste")
    assert parse_method("apot+ewgs") == ("apot", "ewgs")
    assert parse_method("lsq+") == ("lsq+", "ste")
    assert parse_method("lsq++daq") == ("lsq+", "daq") == parse_method("lsq+ + daq")
    assert parse_method("lsq+dsq") == ("lsq", "dsq")
    for bad in ("dsq", "lsq++", "apot+", "apot+sgd", "LSQ"):
        with pytest.raises(ValueError, match="method must be a grid"):
            parse_method(bad)
    with pytest.raises(TypeError, match="method must be a string"):
        parse_method(3)


@pytest.mark.parametrize("role", ["weight", "act"])
def test_every_method_name_builds_a_working_quantizer(role):
    names = method_names(role)
    assert len(names) == len([g for g in GRIDS.values() if getattr(g, role)]) * len(ROUNDINGS)
    x = torch.randn(4, 3, 6)
    for name in names:
        for bits in (2, 4, 8):
            q = make_quantizer(name, bits, role, signed=True)
            grid, rounding = parse_method(name)
            assert type(q.rounding).__name__.lower() == rounding.split("-")[0], name
            assert q.bits == bits and torch.isfinite(q(x)).all(), name
    with pytest.raises(ValueError, match="no weight quantizer"):
        make_quantizer("pact", 4, "weight")
    with pytest.raises(ValueError, match="role must be one of"):
        make_quantizer("lsq", 4, "bias")


def test_jacob_grid_is_per_tensor_asymmetric_and_narrow_only_at_8_bits():
    w = torch.randn(6, 4) + 0.5
    for bits, narrow in ((8, True), (4, False)):
        q = make_quantizer("jacob", bits, "weight")
        q(w)
        qp = q.qparams()
        assert qp.axis is None and qp.narrow_range == narrow and int(qp.zero_point) != 0
        expected = affine.qparams_from_tensor(w, bits, "asymmetric", True, narrow)
        assert float(qp.scale) == float(expected.scale) and int(qp.zero_point) == int(expected.zero_point)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 0, allow_subnormal=False), st.floats(0, 1e4, allow_subnormal=False),
       st.integers(2, 16), st.sampled_from(affine.SCHEMES), st.booleans(), st.booleans())
def test_torch_scale_and_zero_point_equal_qparams_from_range(lo, hi, bits, scheme, signed, narrow):
    if narrow and not signed:
        narrow = False
    expected = affine.qparams_from_range(lo, hi, bits, scheme, signed, narrow)
    lo64, hi64 = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    scale, zero_point = affine.scale_zero_point(lo64, hi64, bits, scheme, signed, narrow)
    assert scale.dtype == torch.float32 and float(scale) == float(expected.scale)
    assert float(zero_point) == int(expected.zero_point)


def test_range_quantizer_reloads_per_channel_ranges():
    w = torch.randn(5, 3)
    q = make_quantizer("minmax", 4, "weight")
    q(w)
    fresh = make_quantizer("minmax", 4, "weight")
    fresh.load_state_dict(q.state_dict())
    assert fresh.observer.min_val.shape == (5,) and torch.equal(fresh(w), q(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["minmax", "jacob", "pact", "lsq", "lsq+", "apot", "lsq+dsq", "lsq+daq",
                                    "apot+ewgs"])
def test_training_forward_and_backward_never_leave_the_device(method, device, monkeypatch):
    """No quantizer converts to numpy (a host round trip, and a crash for CUDA tensors) in training."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    prepared = qat.prepare(model, method if method != "pact" else "lsq", method, bits=3).to(device)
    qat.calibrate_quantizers(prepared, [torch.randn(16, 6)])

    def refuse(*args, **kwargs):
        raise AssertionError("a quantizer called Tensor.numpy() during training")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    prepared.train()
    for _ in range(2):
        out = prepared(torch.randn(16, 6, device=device))
        out.square().mean().backward()
    assert out.device.type == device


class ReadableSTE(STE):
    """The straight-through estimator through autograd, step by step (a subclass skips the fused path)."""


@pytest.mark.parametrize("make", [
    lambda r: LSQ(3, signed=True, rounding=r), lambda r: LSQ(4, signed=True, axis=0, rounding=r),
    lambda r: LSQ(2, signed=False, rounding=r),
    lambda r: RangeFakeQuantizer(4, signed=False, range="ema", rounding=r),
    lambda r: RangeFakeQuantizer(3, signed=True, scheme="asymmetric", range="current", rounding=r),
    lambda r: RangeFakeQuantizer(4, signed=True, scheme="symmetric", narrow_range=True, axis=0, range="current",
                                 rounding=r),
    lambda r: LSQPlus(3, signed=False, rounding=r), lambda r: LSQPlus(2, signed=True, init="minmax", rounding=r)],
    ids=["lsq", "lsq per channel", "lsq unsigned", "ema", "asymmetric", "symmetric per channel", "lsq+",
         "lsq+ signed minmax"])
def test_the_fused_straight_through_path_equals_the_readable_one(make):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, generator=g) * 2
    x[0, 0, :3] = torch.tensor([3.5, -4.0, 100.0])          # beyond the range, on a half step
    upstream = torch.randn(6, 4, 5, generator=g)
    fused, readable = make(STE()), make(ReadableSTE())
    fused(x), readable(x)                                      # same initialisation
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = fused(xa), readable(xb)
    assert torch.equal(ya, yb)
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    for pa, pb in zip(fused.parameters(), readable.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_half_straight_through_halves_the_gradient_and_zero_free_grids_have_no_zero():
    u = torch.tensor([0.2, 1.7, 2.5], requires_grad=True)
    y = STE(0.5)(u)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, 2.0] and u.grad.tolist() == [0.5, 0.5, 0.5]
    q = make_quantizer("apot-nozero", 4, "weight")
    w = torch.randn(500)
    out = q(w)
    assert (out != 0).all() and len(out.detach().round(decimals=5).unique()) <= 14
    export = q.export(w)
    assert (export.codes != 0).all() and torch.allclose(export.dequantize().float(), out, atol=1e-6)
    assert isinstance(make_quantizer("apot-nozero", 4, "act"), APoT)
    assert make_quantizer("apot-nozero", 4, "act").grid == "apot"


@pytest.mark.parametrize("step, offset", [(0.7, -1.3), (-0.7, -1.3), (0.5, 40.0), (0.5, -40.0), (1e-12, 0.3)],
                         ids=["inside", "negative step", "zero-point clamped low", "clamped high", "tiny step"])
def test_lsq_plus_fused_form_equals_the_readable_one_in_every_regime(step, offset):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g) * 3
    upstream = torch.randn(3, 7, generator=g)
    fused, readable = LSQPlus(3, signed=False), LSQPlus(3, signed=False, rounding=ReadableSTE())
    for q in (fused, readable):
        q(x)
        with torch.no_grad():
            q.step.fill_(step)
            q.offset.fill_(offset)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = fused(xa), readable(xb)
    assert torch.equal(ya, yb)
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)  # autograd's is g * s / s, not exactly g
    for pa, pb in ((fused.step, readable.step), (fused.offset, readable.offset)):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-6), (pa.grad, pb.grad)
