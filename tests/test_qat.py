"""Quantization-aware training: prepare, calibrate, train, save and load."""

import pytest
import torch
from torch import nn

from qlib import data, models, qat
from qlib.quantizers import LSQ, PACT, RangeFakeQuantizer, make_quantizer
from qlib.train import TrainConfig, evaluate, seed_everything, train


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def small_cnn(seed=0):
    seed_everything(seed)
    return models.MnistCNN(widths=(8, 16))


def test_prepare_swaps_every_layer_and_keeps_the_weights(digits):
    model = small_cnn()
    prepared = qat.prepare(model, "lsq", "lsq", bits=3, example_input=digits.x_train[:64])
    layers = qat.quantized_layers(prepared)
    originals = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == len(originals)
    for (_, q), m in zip(layers, originals):
        assert torch.equal(q.weight, m.weight)
    bits = [(q.weight_quantizer.bits, q.input_quantizer.bits) for _, q in layers]
    assert bits[0] == (8, 8) and bits[-1] == (8, 8) and all(b == (3, 3) for b in bits[1:-1])
    assert layers[0][1].input_quantizer.signed  # standardised images are negative somewhere
    assert not any(q.input_quantizer.signed for _, q in layers[1:])  # ReLU outputs are not
    assert not any(isinstance(m, qat.QuantConv2d) for m in model.modules())  # original untouched


def test_quantized_layer_computes_with_fake_quantized_tensors():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    prepared = qat.prepare(nn.Sequential(layer), "minmax", "minmax", bits=4, first_last_bits=None)
    q = prepared[0]
    x = torch.randn(2, 2, 5, 5)
    q.train()
    out = q(x)
    expected = nn.functional.conv2d(q.input_quantizer(x), q.weight_quantizer(layer.weight), layer.bias, padding=1)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.slow  # trains a network
def test_quantization_aware_training_lowers_the_loss(digits):
    prepared = qat.prepare(small_cnn(), "lsq", "lsq", bits=3, example_input=digits.x_train[:64])
    history = train(prepared, digits, TrainConfig(epochs=4, batch_size=32, lr=1e-2), seed=0, progress=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["val_acc"] > 60
    steps = [q.weight_quantizer.step for _, q in qat.quantized_layers(prepared)]
    assert all(torch.isfinite(s).all() for s in steps)


def test_calibrate_sets_ranges_without_changing_weights(digits):
    prepared = qat.prepare(small_cnn(), "minmax", "minmax", bits=4, example_input=digits.x_train[:64])
    before = [p.clone() for p in prepared.parameters()]
    qat.calibrate_quantizers(prepared, [digits.x_train[:100], (digits.x_train[100:200], None)])
    assert all(torch.equal(a, b) for a, b in zip(before, prepared.parameters()))
    for _, q in qat.quantized_layers(prepared):
        assert torch.isfinite(q.input_quantizer.observer.max_val).all()
    assert 0 <= evaluate(prepared, digits) <= 100


def test_set_quantization_and_state_dict_roundtrip(digits, tmp_path):
    prepared = qat.prepare(small_cnn(), "lsq", "pact", bits=4, example_input=digits.x_train[:64])
    x = digits.x_test[:16]
    prepared.eval()
    out = prepared(x)
    torch.save(prepared.state_dict(), tmp_path / "qat.pt")
    fresh = qat.prepare(small_cnn(1), "lsq", "pact", bits=4, example_input=digits.x_train[:64])
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    fresh.eval()
    assert torch.allclose(fresh(x), out)
    qat.set_quantization(fresh, weights=False, activations=False)
    float_model = small_cnn()
    float_model.load_state_dict({k: v for k, v in prepared.state_dict().items() if "quantizer" not in k})
    assert torch.allclose(fresh(x), float_model.eval()(x), atol=1e-5)


def test_mismatched_quantizers_are_refused_on_load(digits):
    lsq = qat.prepare(small_cnn(), "lsq", "lsq", bits=4, example_input=digits.x_train[:64])
    lsq(digits.x_train[:8])
    pact = qat.prepare(small_cnn(), "minmax", "pact", bits=4, example_input=digits.x_train[:64])
    with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
        pact.load_state_dict(lsq.state_dict())


def test_learned_ranges_start_from_the_calibration_batch(digits):
    from qlib.quantizers import mse_clip_range
    from qlib.observers import capture_outputs

    model = small_cnn()
    prepared = qat.prepare(model, "lsq", "pact", bits=2, example_input=digits.x_train[:64])
    batch = digits.x_train[:100]
    qat.calibrate_quantizers(prepared, [batch])
    layers = qat.quantized_layers(prepared)
    name, layer = layers[1]  # its input is the first ReLU output
    assert isinstance(layer.input_quantizer, PACT)
    relu_out = capture_outputs(prepared, ["features.0"], batch)["features.0"]  # after the 8-bit first layer
    expected = mse_clip_range(relu_out.clamp(min=0), bits=2)[1]
    assert layer.input_quantizer.alpha.item() == pytest.approx(expected.item(), rel=1e-5)


def test_custom_factories():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    prepared = qat.prepare(model, weight=lambda b, m: LSQ(b, signed=True), act=lambda b, s: PACT(b, alpha=2.0),
                           bits=2, first_last_bits=None)
    assert isinstance(prepared[0].weight_quantizer, LSQ) and isinstance(prepared[2].input_quantizer, PACT)
    assert prepared[2].input_quantizer.bits == 2


def test_bad_input():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weight: the 'pact' grid has no weight quantizer"):
        qat.prepare(model, weight="pact")
    with pytest.raises(ValueError, match="act: method must be a grid"):
        qat.prepare(model, act="lsq++")
    with pytest.raises(ValueError, match="act: method must be a grid"):
        qat.prepare(model, act="dsq")              # a rounding needs its grid: "lsq+dsq"
    with pytest.raises(ValueError, match="bits must be in \\[2, 16\\]"):
        qat.prepare(model, bits=1)
    with pytest.raises(ValueError, match="no Conv1d, Conv2d or Linear layer"):
        qat.prepare(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="model has no quantizers"):
        qat.calibrate_quantizers(model, [torch.zeros(1, 2)])
    with pytest.raises(TypeError, match="weight_quantizer must be a qlib.quantizers.Quantizer"):
        qat.prepare(model, weight=lambda b, m: nn.Identity())
    assert isinstance(make_quantizer("pact", 4, "act", signed=True), RangeFakeQuantizer)


@pytest.fixture(scope="module")
def float_small_cnn(digits):
    model = small_cnn()
    train(model, digits, TrainConfig(epochs=8, batch_size=32, lr=1e-2), seed=0, progress=False)
    return model


# At 2 bits one code is a third of the range: a single rounding difference (the engine's fixed point
# against torch.round's ties-to-even) flips more decisions, hence the lower bar.
# Fine-tuned from a float network, as in the book (2-bit training from scratch on 1,257 images is
# too slow to learn for a test); PACT starts from a fixed clip as in its paper.
@pytest.mark.slow  # trains a network
@pytest.mark.parametrize("weight, act, bits, min_agreement", [("lsq", "lsq", 4, 0.95),
                                                              ("minmax", lambda b, s: PACT(b, alpha=6.0), 4, 0.95),
                                                              ("lsq", "lsq", 2, 0.9), ("lsq", "lsq+", 2, 0.9)])
def test_a_trained_qat_model_converts_to_the_integer_engine(digits, float_small_cnn, weight, act, bits,
                                                           min_agreement):
    from qlib import engine
    from qlib.train import accuracy

    prepared = qat.prepare(float_small_cnn, weight, act, bits=bits, example_input=digits.x_train[:64])
    qat.calibrate_quantizers(prepared, [digits.x_train[:200]])
    history = train(prepared, digits, TrainConfig(epochs=5, batch_size=32, lr=1e-2), seed=0, progress=False)
    assert history[-1]["val_acc"] > 50  # a model that learned something, so its logits are not near ties
    prepared.eval()
    network = engine.convert(prepared, [digits.x_train[:200]])
    inner = [op for op in network.layers()][1:-1]
    assert all(int(op.weight.abs().max()) <= 2 ** (bits - 1) for op in inner)  # the trained low-bit grid
    for error in network.layer_errors(network.quantize_input(digits.x_test)).values():
        assert error.max() <= 1
    with torch.no_grad():
        fake_quant = prepared(digits.x_test)
    integer = network(digits.x_test)
    agreement = (fake_quant.argmax(1) == integer.argmax(1)).float().mean().item()
    assert agreement >= min_agreement
    assert abs(accuracy(integer, digits.y_test) - accuracy(fake_quant, digits.y_test)) <= 3.0


def conv_bn_pair(seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def test_conv_bn_folding_in_training_matches_batch_norm_without_quantization():
    conv, bn = conv_bn_pair()
    fused = qat.QuantConvBn(conv, bn, make_quantizer("minmax", 8, "weight"), None)
    fused.weight_quantizer.enabled = False
    reference = nn.Sequential(copy_of(conv), copy_of(bn)).train()
    fused.train()
    x = torch.randn(8, 3, 6, 6)
    assert torch.allclose(fused(x), reference(x), atol=1e-5)  # batch statistics plus the correction
    assert torch.allclose(fused.bn.running_mean, reference[1].running_mean, atol=1e-6)
    assert torch.allclose(fused.bn.running_var, reference[1].running_var, atol=1e-5)
    fused.freeze_statistics()
    reference.eval()
    assert torch.allclose(fused(x), reference(x), atol=1e-5)  # frozen: the folded inference network
    fused.eval()
    assert torch.allclose(fused(x), reference(x), atol=1e-5)


def copy_of(module):
    import copy

    return copy.deepcopy(module)


def test_conv_bn_quantizes_the_folded_weights_and_trains():
    conv, bn = conv_bn_pair(1)
    fused = qat.QuantConvBn(conv, bn, make_quantizer("minmax", 4, "weight"), None).eval()
    x = torch.randn(4, 3, 5, 5)
    weight, bias = fused.folded()
    levels_per_channel = [len(torch.unique(fused.quantized_weight()[c])) for c in range(4)]
    assert max(levels_per_channel) <= 15  # 4-bit narrow grid on the *folded* weights
    expected = nn.functional.conv2d(x, fused.weight_quantizer(weight), bias, padding=1)
    assert torch.allclose(fused(x), expected, atol=1e-6)
    fused.train()
    fused(x).square().mean().backward()
    assert fused.conv.weight.grad is not None and fused.bn.weight.grad is not None and fused.bn.bias.grad is not None


@pytest.mark.slow  # trains a network
def test_prepare_with_fold_bn_and_export(digits):
    from qlib import engine, fold

    model = small_cnn()
    prepared = qat.prepare(model, "minmax", "minmax", bits=4, example_input=digits.x_train[:64], fold_bn=True)
    kinds = [type(m).__name__ for _, m in qat.quantized_layers(prepared)]
    assert kinds.count("QuantConvBn") == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    train(prepared, digits, TrainConfig(epochs=3, batch_size=32, lr=1e-2), seed=0, progress=False)
    qat.freeze_batchnorm_statistics(prepared)
    prepared.eval()
    assert any(isinstance(m, qat.QuantConvBn) for m in fold.fold_batchnorm(prepared).modules())  # left alone
    network = engine.convert(prepared, [digits.x_train[:200]])
    for error in network.layer_errors(network.quantize_input(digits.x_test)).values():
        assert error.max() <= 1
    with torch.no_grad():
        agreement = (prepared(digits.x_test).argmax(1) == network(digits.x_test).argmax(1)).float().mean()
    assert agreement >= 0.95
    with pytest.raises(TypeError, match="QuantConvBn needs a Conv1d/Conv2d"):
        qat.QuantConvBn(nn.Linear(2, 2), nn.BatchNorm1d(2), make_quantizer("minmax", 4, "weight"), None)


@pytest.mark.slow  # trains a network
def test_mixed_precision_layers_keep_their_own_grids_through_the_integer_engine(digits, float_small_cnn):
    from qlib import engine, sensitivity

    names = sensitivity.weight_layers(float_small_cnn)
    inner = names[1:-1]
    weight_bits = dict(zip(inner, [2, 4, 3, 8, 2, 4, 3][:len(inner)]))
    act_bits = dict(zip(inner, [8, 3, 4, 2, 4, 8, 3][:len(inner)]))
    prepared = qat.prepare(float_small_cnn, "lsq", "lsq+", bits=weight_bits, act_bits=act_bits,
                           example_input=digits.x_train[:64])
    for name in names:
        layer = prepared.get_submodule(name)
        assert layer.weight_quantizer.bits == weight_bits.get(name, 8)
        assert layer.input_quantizer.bits == act_bits.get(name, 8)
    qat.calibrate_quantizers(prepared, [digits.x_train[:200]])
    train(prepared, digits, TrainConfig(epochs=2, batch_size=32, lr=1e-2), seed=0, progress=False)
    prepared.eval()
    network = engine.convert(prepared, [digits.x_train[:200]])
    layers = network.layers()
    sizes = sensitivity.layer_sizes(float_small_cnn)
    for op, name in zip(layers, names):
        bits = weight_bits.get(name, 8)
        assert op.weight_bits == bits
        span = int(op.weight.to(torch.int64).max() - op.weight.to(torch.int64).min()) + 1
        assert span <= 2**bits  # per layer, no more codes than its grid has
        assert op.inp.qmax - op.inp.qmin + 1 == 2 ** act_bits.get(name, 8)  # its input grid's clamps
    assert network.packed_weight_bits() == {op.name: sizes[n] * weight_bits.get(n, 8) for op, n in zip(layers, names)}
    # each operation at its own widths is within one unit of exact arithmetic on the same grids
    x = digits.x_test[:64]
    for name, error in network.layer_errors(network.quantize_input(x)).items():
        assert error.max() <= 1, f"{name} is {error.max()} units off the exact requantization"
    with torch.no_grad():
        fake = prepared(x).argmax(1)
    assert (network(x).argmax(1) == fake).double().mean() >= 0.9  # and it is the trained network
    for error in network.layer_errors(network.quantize_input(digits.x_test)).values():
        assert error.max() <= 1
    with torch.no_grad():
        fake_quant = prepared(digits.x_test)
    integer = network(digits.x_test)
    assert (fake_quant.argmax(1) == integer.argmax(1)).float().mean().item() >= 0.9
    with pytest.raises(ValueError, match="missing"):
        qat.prepare(float_small_cnn, bits={inner[0]: 4})
    with pytest.raises(ValueError, match="not expected"):
        qat.prepare(float_small_cnn, bits={**weight_bits, names[0]: 4})
    with pytest.raises(ValueError, match="bits"):
        qat.prepare(float_small_cnn, bits={**weight_bits, inner[0]: 1})
