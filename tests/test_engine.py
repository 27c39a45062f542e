"""The integer engine: integer-only inference, exact backends, agreement with the real-arithmetic reference."""

import pytest
import torch
from torch import nn

from qlib import engine, models


def calibrated(model, shape, seed=0):
    """A randomly initialised model whose batch norms have realistic running statistics."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *shape))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


NETWORKS = [("mnist_cnn", (1, 28, 28)), ("mnist1d_cnn", (1, 40)), ("mnist1d_resnet", (1, 40)),
            ("resnet20", (3, 32, 32))]


@pytest.fixture(scope="module", params=NETWORKS, ids=[n for n, _ in NETWORKS])
def converted(request):
    name, shape = request.param
    model = calibrated(models.build_model(name), shape)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(64, *shape, generator=g) for _ in range(2)]
    x = torch.randn(48, *shape, generator=g)
    return model, engine.convert(model, calibration), x


def test_backends_give_identical_codes(converted):
    _, network, x = converted
    q = network.quantize_input(x)
    codes = network.run(q, "float32")
    assert torch.equal(codes, network.run(q, "int"))
    assert torch.equal(codes, network.run(q, "fast"))
    reference, fast = network.intermediate_codes(q), {network.input_name: q}
    for op in network.ops:                 # every operation, not only the output
        fast[op.name] = op.forward(*(fast[i] for i in op.inputs), backend="fast")
        assert torch.equal(fast[op.name], reference[op.name]), op.name


def test_integer_backend_computes_with_integer_tensors_only(converted):
    _, network, x = converted
    q = network.quantize_input(x)
    with engine.DtypeRecorder() as recorder:
        network.run(q, "int")
    assert recorder.counts and sum(recorder.counts.values()) > len(network.ops)
    assert not recorder.floating(), f"float tensors on the integer path: {recorder.floating()}"
    with engine.DtypeRecorder() as recorder:
        network.run(q, "float32")
    assert torch.float32 in recorder.floating()       # the fast route sums integers in float32 (exactly)


def test_shift_add_layer_accumulates_what_the_multiplier_layer_does():
    g = torch.Generator().manual_seed(0)
    codes = torch.tensor([-10, -8, -5, -4, -2, -1, 0, 1, 2, 4, 5, 8, 10])[torch.randint(0, 13, (6, 4, 3, 3),
                                                                                       generator=g)]
    spec_in = engine.ActSpec(0.05, 17, 0, 255, torch.uint8)
    spec_out = engine.ActSpec(0.2, 3, 0, 255, torch.uint8)
    conv = ((2, 1), (1, 1), (1, 1), 2)
    bias = torch.randn(6, generator=g).double()
    scales = torch.rand(6, generator=g).double().numpy() * 0.01 + 0.001
    multiply = engine.IntLayer("m", ["x"], codes, 0, scales, bias, spec_in, spec_out, "relu", conv, fine_bias=True)
    shift = engine.IntShiftAdd("s", ["x"], codes, scales, bias, spec_in, spec_out, "relu", conv)
    x = torch.randint(0, 256, (3, 8, 7, 6), generator=g).to(torch.uint8)
    assert torch.equal(shift.weights.accumulate(x.to(torch.int64) - 17), multiply.accumulate(x).to(torch.int64))
    assert torch.equal(shift.forward(x), multiply.forward(x))
    assert torch.equal(shift.forward(x, backend="fast"), multiply.forward(x, backend="fast"))
    with engine.DtypeRecorder() as recorder:
        shift.forward(x)
    assert not recorder.floating()


def test_agrees_with_the_real_arithmetic_reference(converted):
    _, network, x = converted
    codes = network.run(network.quantize_input(x))
    reference = network.output_spec.quantize(network.simulate(x))
    diff = (codes.to(torch.int32) - reference.to(torch.int32)).abs()
    assert diff.max() <= 4  # fixed-point rounding, compounded over the layers
    assert (diff == 0).float().mean() > 0.5


def test_close_to_the_float_model(converted):
    model, network, x = converted
    with torch.no_grad():
        expected = model(x)
    got = network(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.15 * scale


def test_relu_is_fused_and_weights_are_narrow_int8(converted):
    _, network, _ = converted
    assert not any(isinstance(op, engine.IntClamp) for op in network.ops)
    for layer in network.layers():
        assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() <= 127
        assert layer.bias.dtype == torch.int32


def test_pytorch_quantized_engine_agrees_layer_by_layer():
    model = calibrated(models.MnistCNN(), (1, 28, 28))
    g = torch.Generator().manual_seed(2)
    network = engine.convert(model, [torch.randn(64, 1, 28, 28, generator=g)], reduce_range=True)
    q = network.quantize_input(torch.randn(32, 1, 28, 28, generator=g))
    pytorch = engine.PyTorchQuantized(network)
    diffs = torch.cat([d.flatten() for d in pytorch.compare_layers(q).values()])
    assert (diffs <= 1).float().mean() >= 0.999
    end_to_end = pytorch.run(q)
    assert end_to_end.shape == network.run(q).shape
    assert (end_to_end.int() - network.run(q).int()).abs().float().mean() < 1.0


def test_int8_activations():
    model = calibrated(models.Mnist1DCNN(), (1, 40))
    g = torch.Generator().manual_seed(3)
    network = engine.convert(model, [torch.randn(64, 1, 40, generator=g)], activation_dtype="int8")
    x = torch.randn(16, 1, 40, generator=g)
    q = network.quantize_input(x)
    assert q.dtype == torch.int8
    out = network.run(q)
    assert out.dtype == torch.int8 and torch.equal(out, network.run(q, "int"))
    assert torch.equal(out, network.run(q, "fast"))


def test_relu6_and_maxpool():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 6, 6, generator=g) * 3
    network = engine.convert(model, [x])
    codes = network.run(network.quantize_input(x))
    assert torch.equal(network.run(network.quantize_input(x), "fast"), codes)
    reference = network.output_spec.quantize(network.simulate(x))
    assert (codes.int() - reference.int()).abs().max() <= 1
    conv = network.layers()[0]
    assert conv.activation == "relu6" and conv.hi <= conv.out.zero_point + round(6 / conv.out.scale)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    with pytest.raises(ValueError, match="unsupported layer '1' of type Sigmoid"):
        engine.convert(model, [torch.randn(2, 4)])


def test_bad_input(converted):
    _, network, x = converted
    with pytest.raises(TypeError, match="q must be a torch tensor of torch.uint8 codes"):
        network.run(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        network.run(network.quantize_input(x), "gpu")
    with pytest.raises(ValueError, match="calibration must hold at least one batch"):
        engine.convert(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="activation_dtype must be one of"):
        engine.convert(nn.Linear(2, 2), [torch.zeros(1, 2)], activation_dtype="int4")


def test_each_operation_is_within_one_unit_of_exact_arithmetic(converted):
    _, network, x = converted
    errors = network.layer_errors(network.quantize_input(x))
    assert set(errors) == {op.name for op in network.ops}
    for name, error in errors.items():
        assert error.max() <= 1, f"{name} is {error.max()} units off the exact requantization"


def test_average_pooling_with_a_window():
    model = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool1d(4), nn.Flatten(), nn.Linear(15, 2))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, 20, generator=g)
    network = engine.convert(model, [x])
    for error in network.layer_errors(network.quantize_input(x)).values():
        assert error.max() <= 1
    with pytest.raises(ValueError, match="max pooling with padding, dilation or ceil_mode"):
        engine.convert(nn.Sequential(nn.MaxPool2d(2, padding=1)), [torch.randn(1, 1, 4, 4)])


def test_dequantize_output_and_weight_bytes(converted):
    model, network, x = converted
    q = network.run(network.quantize_input(x))
    spec = network.output_spec
    logits = network.dequantize_output(q)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, (q.to(torch.float32) - spec.zero_point) * spec.scale)
    # One int8 per weight of every weighted layer (the folded float model has the same count)
    # plus four bytes per int32 bias (one per output channel).
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert network.weight_bytes() == sum(m.weight.numel() + 4 * m.out_channels if not isinstance(m, nn.Linear)
                                         else m.weight.numel() + 4 * m.out_features for m in weighted)
