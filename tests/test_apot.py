"""PoT and APoT levels, the APoT quantizer's forward and gradients, EWGS on APoT and its fixes."""

import pytest
import torch

from qlib import qat
from qlib.quantizers import (EWGS, APoT, LSQ, apot_levels, grid_codes, local_gap, make_quantizer, nearest_level,
                             pot_levels, uniform_levels, zero_free_levels)


def as_list(t):
    return [round(v, 6) for v in t.tolist()]


def test_enumerated_level_sets():
    assert as_list(apot_levels(3, signed=False)) == [0, .1, .2, .3, .4, .6, .8, 1]
    assert as_list(apot_levels(2, signed=False)) == [0, .25, .5, 1]
    assert as_list(apot_levels(2, signed=True)) == [-1, 0, 1]                      # ternary weights
    assert as_list(apot_levels(3, signed=True)) == [-1, -.5, -.25, 0, .25, .5, 1]
    four = [0, 1 / 48, 1 / 24, 1 / 16, 1 / 12, 1 / 8, 1 / 6, 3 / 16, 1 / 4, 1 / 3, 3 / 8, 1 / 2, 2 / 3, 11 / 16,
            3 / 4, 1]
    assert as_list(apot_levels(4, signed=False)) == as_list(torch.tensor(four, dtype=torch.float64))
    assert as_list(apot_levels(4, signed=True)) == [-1, -.8, -.6, -.4, -.3, -.2, -.1, 0, .1, .2, .3, .4, .6, .8, 1]
    assert as_list(pot_levels(3, signed=False)) == as_list(torch.tensor([0] + [2.0**-k for k in range(6, -1, -1)]))
    assert as_list(uniform_levels(2, signed=False)) == as_list(torch.tensor([0, 1 / 3, 2 / 3, 1]))
    for bits in (2, 3, 4):
        assert len(apot_levels(bits, signed=False)) == 2**bits
        assert len(apot_levels(bits + 1, signed=True)) == 2 ** (bits + 1) - 1


def test_zero_free_levels_drop_only_the_zero_weight_level():
    assert as_list(zero_free_levels(3, signed=True)) == [-1, -.5, -.25, .25, .5, 1]
    for bits in (2, 3, 4):
        levels = zero_free_levels(bits, signed=True)
        assert len(levels) == 2**bits - 2 and not (levels == 0).any()
        assert torch.equal(levels, apot_levels(bits, signed=True)[apot_levels(bits, signed=True) != 0])
        assert torch.equal(zero_free_levels(bits, signed=False), apot_levels(bits, signed=False))  # ReLU needs 0
    weight_q = make_quantizer("apot-nozero", 4, "weight")
    w = torch.randn(8, 3, 5) * 0.1
    w[0, 0, 0] = 0.0
    out = weight_q(w)
    assert not (out == 0).any()                                  # even an exact zero goes to a nonzero level
    act_q = make_quantizer("apot-nozero", 4, "act", signed=False)
    x = torch.relu(torch.randn(256))
    assert torch.equal(act_q(x)[x == 0], x[x == 0])             # activations keep their zero level


def test_grid_codes_are_sums_of_at_most_n_powers_of_two():
    for bits, terms in ((2, 1), (3, 2), (4, 2)):
        codes, _ = grid_codes(bits)
        assert len(codes) == 2**bits
        assert max(bin(int(c)).count("1") for c in codes) <= terms
    with pytest.raises(ValueError, match="1 to 4"):
        grid_codes(5)
    with pytest.raises(ValueError, match="APoT supports"):
        apot_levels(6, signed=False)


def test_nearest_level_and_local_gap():
    levels = apot_levels(2, signed=False).float()   # 0, .25, .5, 1
    u = torch.tensor([0.1, 0.13, 0.6, 0.74, 0.76, 1.0, 0.125])
    index, value = nearest_level(u, levels)
    assert value.tolist() == [0.0, 0.25, 0.5, 0.5, 1.0, 1.0, 0.0]      # a tie goes to the lower level
    assert local_gap(u, levels).tolist() == [0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.25]


def elementwise(q, x):
    x = x.clone().requires_grad_(True)
    y = q(x)
    dx, dalpha = torch.autograd.grad(y, [x, q.alpha], torch.ones_like(y), retain_graph=True)
    per_alpha = torch.stack([torch.autograd.grad(y[i], q.alpha, retain_graph=True)[0] for i in range(len(x))])
    return y.detach(), dx, dalpha, per_alpha


def test_activation_forward_and_gradients_match_the_paper():
    q = APoT(3, signed=False, alpha=2.0)
    x = torch.linspace(-0.5, 3.0, 57, dtype=torch.float32) + 1e-3
    y, dx, dalpha, per_alpha = elementwise(q, x)
    u = torch.clamp(x / 2.0, 0, 1)
    levels = apot_levels(3, signed=False).float()
    expected = levels[(u[:, None] - levels[None]).abs().argmin(1)] * 2.0
    assert torch.allclose(y, expected)
    inside = (x >= 0) & (x <= 2.0)
    assert torch.equal(dx, inside.float())                       # clipped activations get no gradient
    formula = torch.where(x > 2.0, torch.ones_like(x), torch.where(x < 0, torch.zeros_like(x), expected / 2 - x / 2))
    assert torch.allclose(per_alpha, formula, atol=1e-6)
    assert float(dalpha) == pytest.approx(float(formula.sum()), abs=1e-5)


def test_weight_gradients_pass_clipped_values_and_alpha_gets_sign():
    q = APoT(3, signed=True, alpha=1.5, standardize=False)
    x = torch.linspace(-3, 3, 61) + 1e-3
    y, dx, _, per_alpha = elementwise(q, x)
    assert torch.equal(dx, torch.ones_like(x))                    # not masked, as in the paper's code
    u = x / 1.5
    q_u = y / 1.5
    formula = torch.where(u.abs() > 1, torch.sign(u), q_u - u)
    assert torch.allclose(per_alpha, formula, atol=1e-6)


def test_standardisation_keeps_the_weights_scale():
    torch.manual_seed(0)
    w = torch.randn(200) * 0.05 + 0.01
    q = APoT(4, signed=True, alpha=3.0)
    y = q(w)
    std = w.std()
    levels = 3.0 * apot_levels(4, signed=True).float() * std
    values = y.detach().unique()
    assert (values[:, None] - levels[None, :]).abs().min(1).values.max() < 1e-7   # every output is a level
    assert float(values.abs().max()) <= 3.0 * float(std) + 1e-7   # the weights' scale, not units of std
    export = q.export(w)
    assert export.grid == "apot" and int(export.zero_point) == 0
    assert torch.allclose(export.dequantize().float(), y, atol=1e-7)


def test_default_alpha_is_the_least_squared_error_clip():
    torch.manual_seed(1)
    x = torch.relu(torch.randn(5000))
    q = APoT(2, signed=False)
    q(x)
    best = float(q.alpha.detach())
    levels = apot_levels(2, signed=False).float()

    def error(alpha):
        u = torch.clamp(x / alpha, 0, 1)
        return ((nearest_level(u, levels)[1] * alpha - x) ** 2).mean()

    assert error(best) <= min(error(best * 0.9), error(best * 1.1))
    assert 0 < best < float(x.max())


def test_ewgs_on_apot_and_the_fixes():
    levels = apot_levels(2, signed=False).float()
    x = torch.tensor([0.2, 0.3, 0.7, 0.8]).requires_grad_(True)
    g = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    expected_error = {None: torch.tensor([-0.05, 0.05, 0.2, -0.2]),
                      "gap": torch.tensor([-0.05, 0.05, 0.2, -0.2]) / torch.tensor([.25, .25, .5, .5]) / 3}
    for fix in (None, "gap"):
        q = APoT(2, signed=False, alpha=1.0, rounding=EWGS(fix=fix))
        q.rounding.ewgs_delta.fill_(2.0)
        (dx,) = torch.autograd.grad(q(x), x, g)
        assert torch.allclose(dx, g * (1 + 2.0 * torch.sign(g) * expected_error[fix]), atol=1e-6)
    assert torch.equal(nearest_level(x.detach(), levels)[1], APoT(2, False, alpha=1.0)(x).detach())
    # a delta large enough to flip: delta * |error| = 10 * 0.2 > 1
    q = APoT(2, signed=False, alpha=1.0, rounding=EWGS())
    q.train()
    q.rounding.ewgs_delta.fill_(10.0)
    (dx,) = torch.autograd.grad(q(x), x, g)
    assert (dx * g < 0).sum() == 2 and q.rounding.flipped_fraction() == 0.5
    bounded = APoT(2, signed=False, alpha=1.0, rounding=EWGS(fix="bound"))
    bounded.train()
    bounded.rounding.ewgs_delta.fill_(10.0)
    (dx,) = torch.autograd.grad(bounded(x), x, g)
    assert (dx * g >= 0).all() and bounded.rounding.flipped_fraction() == 0.0
    assert float(bounded.rounding.effective_delta(torch.tensor([0.2, -0.05]))) == pytest.approx(5.0)


def test_apot_in_prepare_keeps_8_bit_edges_uniform():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    q = qat.prepare(model, "apot+ewgs", "apot+ewgs", bits=2, example_input=torch.randn(4, 4))
    layers = [m for _, m in qat.quantized_layers(q)]
    assert isinstance(layers[0].weight_quantizer, LSQ) and isinstance(layers[-1].weight_quantizer, LSQ)
    assert isinstance(layers[1].weight_quantizer, APoT) and isinstance(layers[1].weight_quantizer.rounding, EWGS)
    assert isinstance(layers[1].input_quantizer, APoT) and not layers[1].input_quantizer.signed
    q(torch.randn(3, 4)).sum().backward()


def test_bad_input():
    with pytest.raises(ValueError, match="grid"):
        APoT(2, grid="log")
    with pytest.raises(ValueError, match="fix"):
        EWGS(fix="clip")
    with pytest.raises(ValueError, match="alpha"):
        APoT(2, alpha=-1.0)
    with pytest.raises(ValueError, match="APoT supports"):
        APoT(8, signed=True)
    with pytest.raises(ValueError, match="not been initialised"):
        APoT(2).levels()
    q = APoT(3, signed=True, alpha=1.0)
    with pytest.raises(ValueError, match="no uniform integer grid"):
        q.qparams()
    uniform = APoT(3, signed=False, grid="uniform", alpha=1.0).export(torch.linspace(0, 1, 8))
    assert uniform.grid == "uniform" and uniform.codes.tolist() == list(range(8))
    with pytest.raises(TypeError, match="floating"):
        q(torch.zeros(3, dtype=torch.int64))
