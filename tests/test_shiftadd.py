"""Shift-add inference of APoT/PoT weights: exact terms, exact accumulators, agreement with fake quantization."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from qlib import qat
from qlib.quantizers import LSQ, PACT, APoT, grid_codes
from qlib.quantizers.apot import _LEVEL_SETS
from qlib.shiftadd import ShiftAddLayer, max_terms, power_of_two_terms, term_counts


def reconstruct(terms, shape):
    total = torch.zeros(shape, dtype=torch.int64)
    for e, signs in terms:
        total += signs * 2**e
    return total


# ---------------------------------------------------------------- power-of-two terms -----

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40))
def test_power_of_two_terms_reconstruct_any_integers(values):
    codes = torch.tensor(values, dtype=torch.int64)
    terms = power_of_two_terms(codes)
    assert torch.equal(reconstruct(terms, codes.shape), codes)
    exponents = [e for e, _ in terms]
    assert exponents == sorted(set(exponents))
    for _, signs in terms:
        assert signs.dtype == torch.int64 and signs.shape == codes.shape
        assert set(signs.unique().tolist()) <= {-1, 0, 1} and bool(signs.any())
        assert torch.all((signs == 0) | (signs == codes.sign()))  # a term carries the sign of its code
    assert torch.equal(term_counts(codes), torch.tensor([bin(abs(v)).count("1") for v in values]))


def test_power_of_two_terms_on_tensors_with_zeros_and_other_integer_dtypes():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-300, 300, (4, 5, 6), generator=g)
    codes[codes.abs() < 60] = 0
    assert torch.equal(reconstruct(power_of_two_terms(codes), codes.shape), codes)
    small = torch.tensor([[0, 5], [-7, 128]], dtype=torch.int16)
    assert torch.equal(reconstruct(power_of_two_terms(small), small.shape), small.long())
    assert power_of_two_terms(torch.zeros(3, dtype=torch.int64)) == []
    assert power_of_two_terms(torch.zeros(0, dtype=torch.int64)) == []
    assert max_terms(torch.zeros(0, dtype=torch.int64)) == 0
    assert max_terms(torch.tensor([0, -7, 8])) == 3


def test_apot_codes_need_two_terms_and_pot_codes_one():
    assert max_terms(grid_codes(3)[0]) == 2
    assert max_terms(grid_codes(4)[0]) == 2
    assert max_terms(grid_codes(2)[0]) == 1
    # the codes a quantizer exports, signed weights and unsigned activations
    x = torch.randn(2000)
    for bits, signed, grid, most in ((4, True, "apot", 2), (5, True, "apot", 2), (3, False, "apot", 2),
                                     (4, False, "apot", 2), (5, True, "pot", 1), (3, False, "pot", 1)):
        q = APoT(bits, signed=signed, grid=grid)
        q(x)
        codes = q.export(x).codes
        assert max_terms(codes) <= most
        assert torch.equal(reconstruct(power_of_two_terms(codes), codes.shape), codes)


def test_power_of_two_terms_rejects_non_integers():
    with pytest.raises(TypeError, match="integer dtype"):
        power_of_two_terms(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integer dtype"):
        power_of_two_terms(torch.tensor([True]))
    with pytest.raises(TypeError, match="integer torch.Tensor"):
        power_of_two_terms([1, 2])
    with pytest.raises(ValueError, match="-2\\^63"):
        power_of_two_terms(torch.tensor([-(2**63)]))


# ---------------------------------------------------------------- layers -----

def quant_layer(module, weight_q, input_q, x):
    """The qat twin of ``module`` with these quantizers, initialised on ``x``."""
    layer = qat._quantized_twin(module, weight_q, input_q)
    with torch.no_grad():
        layer(x)
    return layer


def as_float64(layer):
    """The layer in float64, with the level sets rebuilt in float64 (the buffers were rounded to float32)."""
    layer = layer.double()
    for q in (layer.weight_quantizer, layer.input_quantizer):
        if isinstance(q, APoT):
            q.level_set = _LEVEL_SETS[q.grid](q.bits, q.signed)
    return layer


LAYERS = {
    "linear": (lambda: nn.Linear(20, 7), (6, 20)),
    "linear-3d-input": (lambda: nn.Linear(12, 5), (2, 3, 12)),
    "linear-no-bias": (lambda: nn.Linear(12, 5, bias=False), (4, 12)),
    "conv1d-stride-pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 11)),
    "conv2d-stride-pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "conv2d-groups-dilation": (lambda: nn.Conv2d(4, 6, 3, stride=(1, 2), padding=2, dilation=2, groups=2),
                               (2, 4, 8, 9)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(3, 5, 4, padding="same", bias=False), (2, 3, 7, 7)),
    "conv1d-valid": (lambda: nn.Conv1d(2, 3, 5, padding="valid"), (3, 2, 12)),
}

QUANTIZERS = {
    "w2-ternary/a2": (lambda: APoT(2, signed=True), lambda: APoT(2, signed=False)),
    "w3/a3": (lambda: APoT(3, signed=True), lambda: APoT(3, signed=False)),
    "w4/a4": (lambda: APoT(4, signed=True), lambda: APoT(4, signed=False)),
    "w5/a3": (lambda: APoT(5, signed=True), lambda: APoT(3, signed=False)),
    "pot-w4/pot-a3": (lambda: APoT(4, signed=True, grid="pot"), lambda: APoT(3, signed=False, grid="pot")),
    "w4/uniform-apot-a3": (lambda: APoT(4, signed=True), lambda: APoT(3, signed=False, grid="uniform")),
    "w4/lsq-a4": (lambda: APoT(4, signed=True), lambda: LSQ(4, signed=False)),
    "w3/pact-a4": (lambda: APoT(3, signed=True), lambda: PACT(4, alpha=None)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's, for the reference
@pytest.mark.parametrize("quantizers", list(QUANTIZERS), ids=list(QUANTIZERS))
@pytest.mark.parametrize("layer_name", list(LAYERS), ids=list(LAYERS))
def test_shift_add_matches_integer_products_and_fake_quantization(layer_name, quantizers):
    make_layer, shape = LAYERS[layer_name]
    make_w, make_a = QUANTIZERS[quantizers]
    torch.manual_seed(0)
    x = torch.rand(shape) * 3
    layer = quant_layer(make_layer(), make_w(), make_a(), x)
    sa = ShiftAddLayer.from_module(layer)

    codes, scale = sa.quantize_input(x)
    acc = sa.accumulate(codes)
    assert acc.dtype == torch.int64
    assert torch.equal(acc, sa.multiply_accumulate(codes))
    # the input codes are those the fake-quant input quantizer used, and the weights scale * codes
    assert torch.allclose(scale * codes.double(), layer.input_quantizer(x).double(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(sa.weight_scale * sa.weight_codes.double(), layer.quantized_weight().double(),
                          rtol=1e-6, atol=1e-7)

    with torch.no_grad():
        y = layer(x)
    out = sa(x)
    assert out.shape == y.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))

    layer64 = as_float64(layer)
    sa64 = ShiftAddLayer.from_module(layer64)
    x64 = x.double()
    with torch.no_grad():
        y64 = layer64(x64)
    assert torch.equal(sa64.accumulate(sa64.quantize_input(x64)[0]), acc)  # the same codes in float64
    out64 = sa64(x64)
    assert out64.dtype == torch.float64
    # PACT's step alpha / (2^b - 1) reaches us through qparams(), which stores scales in float32
    tolerance = 1e-7 if isinstance(layer64.input_quantizer, PACT) else 1e-12
    assert float((out64 - y64).abs().max()) <= tolerance * float(y64.abs().max())


def test_ternary_weights_are_one_term_with_exponent_zero():
    x = torch.rand(4, 3, 8, 8)
    layer = quant_layer(nn.Conv2d(3, 4, 3), APoT(2, signed=True), APoT(2, signed=False), x)
    sa = ShiftAddLayer.from_module(layer)
    assert set(sa.weight_codes.unique().tolist()) <= {-1, 0, 1}
    assert [e for e, _ in sa.terms] == [0]
    stats = sa.term_stats()
    assert stats["max"] == 1 and 0 < stats["mean"] <= 1 and stats["zeros"] == pytest.approx(1 - stats["mean"])
    assert "ShiftAddLayer(conv2d" in repr(sa)


def test_term_stats_report_two_terms_for_apot_and_one_for_pot():
    x = torch.rand(8, 32)
    apot = ShiftAddLayer.from_module(quant_layer(nn.Linear(32, 16), APoT(5, signed=True), APoT(4, signed=False), x))
    pot = ShiftAddLayer.from_module(quant_layer(nn.Linear(32, 16), APoT(5, True, grid="pot"), APoT(4, False), x))
    assert apot.term_stats()["max"] == 2 and pot.term_stats()["max"] == 1
    counts = term_counts(apot.weight_codes)
    assert apot.term_stats()["mean"] == pytest.approx(float(counts.double().mean()))


def test_signed_uniform_inputs_shift_negative_codes():
    # a signed LSQ input (zero-point 0): negative codes shifted left stay exact
    torch.manual_seed(1)
    x = torch.randn(3, 2, 10)
    layer = quant_layer(nn.Conv1d(2, 3, 3, padding=1), APoT(4, signed=True), LSQ(4, signed=True), x)
    sa = ShiftAddLayer.from_module(layer)
    codes, _ = sa.quantize_input(x)
    assert bool((codes < 0).any())
    assert torch.equal(sa.accumulate(codes), sa.multiply_accumulate(codes))
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(sa(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_unbatched_convolution_input():
    x = torch.rand(2, 3, 9, 9)
    layer = quant_layer(nn.Conv2d(3, 4, 3, padding=1), APoT(3, signed=True), APoT(3, signed=False), x)
    sa = ShiftAddLayer.from_module(layer)
    codes, _ = sa.quantize_input(x)
    assert torch.equal(sa.accumulate(codes[0]), sa.accumulate(codes)[0])
    assert torch.equal(sa.multiply_accumulate(codes[0]), sa.accumulate(codes[0]))
    with torch.no_grad():
        y = layer(x[0])
    torch.testing.assert_close(sa(x[0]), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_prepared_model_runs_layer_by_layer_in_shift_add():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.rand(8, 3, 8, 8)
    prepared = qat.prepare(model, weight="apot", act="apot", bits=3, first_last_bits=None, example_input=x)
    with torch.no_grad():
        prepared(x)  # initialises every alpha
    h = x
    for module in prepared:
        if isinstance(module, qat.QuantLayer):
            assert isinstance(module.weight_quantizer, APoT) and isinstance(module.input_quantizer, APoT)
            sa = ShiftAddLayer.from_module(module)
            codes, _ = sa.quantize_input(h)
            assert torch.equal(sa.accumulate(codes), sa.multiply_accumulate(codes))
            with torch.no_grad():
                expected = module(h)
            torch.testing.assert_close(sa(h), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        with torch.no_grad():
            h = module(h)


def test_accumulate_uses_only_integer_tensors():
    x = torch.rand(2, 3, 6, 6)
    layer = quant_layer(nn.Conv2d(3, 4, 3), APoT(5, signed=True), APoT(4, signed=False), x)
    sa = ShiftAddLayer.from_module(layer)
    codes, _ = sa.quantize_input(x)
    for _, signs in sa.terms:
        assert set(signs.unique().tolist()) <= {-1, 0, 1}

    class Recorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.dtypes.add(t.dtype)
            return out

    with Recorder() as recorder:
        sa.accumulate(codes)
    assert recorder.dtypes <= {torch.int64, torch.bool}


def test_later_training_does_not_change_the_shift_add_layer():
    x = torch.rand(4, 6)
    layer = quant_layer(nn.Linear(6, 3), APoT(3, signed=True), APoT(3, signed=False), x)
    sa = ShiftAddLayer.from_module(layer)
    before = sa(x)
    with torch.no_grad():
        layer.weight.mul_(-2)
        layer.input_quantizer.alpha.mul_(0.5)
    assert torch.equal(sa(x), before)


# ---------------------------------------------------------------- bad input -----

def test_unsupported_layers_and_quantizers_are_refused():
    x = torch.rand(4, 6)
    with pytest.raises(TypeError, match="QuantConv1d, QuantConv2d or QuantLinear"):
        ShiftAddLayer.from_module(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="power-of-two weight codes .* got LSQ with a uniform grid"):
        ShiftAddLayer.from_module(quant_layer(nn.Linear(6, 3), LSQ(4, signed=True), APoT(3, signed=False), x))
    with pytest.raises(ValueError, match="got APoT with a uniform grid"):
        ShiftAddLayer.from_module(quant_layer(nn.Linear(6, 3), APoT(3, True, grid="uniform"), APoT(3, False), x))
    per_channel = ShiftAddLayer.from_module(quant_layer(nn.Linear(6, 3), APoT(3, signed=True), LSQ(4, False, axis=1),
                                                        x))
    with pytest.raises(ValueError, match="per-tensor codes with zero-point 0"):
        per_channel(x)
    with pytest.raises(TypeError, match="needs an input quantizer"):
        ShiftAddLayer.from_module(quant_layer(nn.Linear(6, 3), APoT(3, signed=True), None, x))
    disabled = quant_layer(nn.Linear(6, 3), APoT(3, signed=True), APoT(3, signed=False), x)
    disabled.input_quantizer.enabled = False
    with pytest.raises(ValueError, match="input quantizer is disabled"):
        ShiftAddLayer.from_module(disabled)
    fresh = qat._quantized_twin(nn.Linear(6, 3), APoT(3, signed=True), APoT(3, signed=False))
    with pytest.raises(ValueError, match="not been initialised"):
        ShiftAddLayer.from_module(fresh)
    reflect = nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="zero padding only"):
        ShiftAddLayer.from_module(quant_layer(reflect, APoT(3, signed=True), APoT(3, signed=False),
                                              torch.rand(2, 2, 8)))


def test_bad_codes_and_inputs_are_refused():
    x = torch.rand(4, 3, 6, 6)
    sa = ShiftAddLayer.from_module(quant_layer(nn.Conv2d(3, 4, 3), APoT(3, True), APoT(3, False), x))
    codes, _ = sa.quantize_input(x)
    with pytest.raises(TypeError, match="integer dtype"):
        sa.accumulate(codes.float())
    with pytest.raises(ValueError, match="codes must be"):
        sa.accumulate(codes[:, :2])
    with pytest.raises(ValueError, match="overflow"):
        sa.accumulate(codes.clamp(max=1) * 2**62)
    with pytest.raises(TypeError, match="x must be a floating"):
        sa(codes)
    with pytest.raises(ValueError, match="kind must be"):
        ShiftAddLayer("conv3d", torch.zeros(1, 1, 1, 1, 1, dtype=torch.int64), 1.0, APoT(3, False, alpha=1.0))
    with pytest.raises(ValueError, match="weight_scale"):
        ShiftAddLayer("linear", torch.zeros(2, 3, dtype=torch.int64), 0.0, APoT(3, False, alpha=1.0))
    with pytest.raises(ValueError, match="bias must have 2"):
        ShiftAddLayer("linear", torch.zeros(2, 3, dtype=torch.int64), 1.0, APoT(3, False, alpha=1.0), torch.ones(3))
