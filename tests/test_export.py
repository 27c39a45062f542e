"""The engine's networks on ExecuTorch (XNNPACK) with the engine's own codes, and torchao's pt2e flow."""

import pytest
import torch
from torch import nn

from qlib import engine, models, qat
from qlib.engine.export import _QDQGraph, int8_spec

from test_engine import calibrated

pytestmark = pytest.mark.slow  # every test lowers a program (seconds each)


def real_inputs(shape, n, seed):
    """Inputs shaped like the running data: smooth MNIST-1D-like curves or blob images, not white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    kernel = torch.ones(1, 1, *([5] * (len(shape) - 1))) / 5 ** (len(shape) - 1)
    conv = nn.functional.conv1d if len(shape) == 2 else nn.functional.conv2d
    return conv(x, kernel, padding=2) * 2


@pytest.fixture(scope="module", params=[("mnist1d_cnn", (1, 40)), ("mnist1d_resnet", (1, 40)),
                                        ("mnist_cnn", (1, 28, 28))], ids=lambda p: p[0])
def exported(request):
    name, shape = request.param
    model = calibrated(models.build_model(name), shape)
    network = engine.convert(model, [real_inputs(shape, 128, 1)])
    q = network.quantize_input(real_inputs(shape, 96, 2))
    return network, engine.ExecuTorchNetwork(network, q, batch=64), q


def test_int8_spec_keeps_every_real_value():
    spec = engine.ActSpec(0.07, 131, 0, 255, torch.uint8)
    s8 = int8_spec(spec)
    assert (s8.zero_point, s8.qmin, s8.qmax, s8.dtype) == (3, -128, 127, torch.int8)
    codes = torch.arange(256).to(torch.uint8)
    assert torch.equal(spec.dequantize(codes), s8.dequantize((codes.to(torch.int16) - 128).to(torch.int8)))
    assert int8_spec(s8) is s8
    with pytest.raises(ValueError, match="spec.dtype"):
        int8_spec(engine.ActSpec(0.1, 0, 0, 255, torch.int32))


def test_the_exported_program_holds_the_engines_codes(exported):
    network, _, q = exported
    exported_program = torch.export.export(_QDQGraph(network), (torch.zeros(2, *q.shape[1:]),))
    state = {**exported_program.state_dict, **exported_program.constants}
    for i, op in enumerate(network.layers()):
        assert torch.equal(state[f"layer{i}_codes"], op.weight)
        assert torch.equal(state[f"layer{i}_scales"], op.w_scale.float())
        assert torch.equal(state[f"layer{i}_bias"], (op.bias.double() * op.bias_scale).float())
    dequantize = [n for n in exported_program.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(dequantize) == len(network.layers())


def test_the_qdq_graph_computes_the_engines_real_arithmetic(exported):
    # eager QDQ = each operation on the same grids with real multipliers (IntOp.simulate), in float32
    network, _, q = exported
    specs, env = network.specs(), network.intermediate_codes(q)
    inputs = [specs[i].dequantize(env[i]) for op in network.ops for i in op.inputs]
    outputs = _QDQGraph(network, layerwise=True)(*inputs)
    for op, y in zip(network.ops, outputs):
        args = [specs[i].dequantize(env[i]) for i in op.inputs]
        reference = op.out.quantize(op.simulate(*args))
        assert (op.out.quantize(y).int() - reference.int()).abs().max() <= 1, op.name
        # an average over an even window ties often, and float32 breaks those ties either way
        agreement = 0.97 if isinstance(op, engine.IntAvgPool) else 0.999
        assert (op.out.quantize(y) == reference).float().mean() >= agreement, op.name
    chain = engine.qdq_module(network)(network.input_spec.dequantize(q))
    assert (chain.argmax(1) == network.simulate(network.input_spec.dequantize(q)).argmax(1)).float().mean() >= 0.95


def test_executorch_agrees_with_the_engine_layer_by_layer(exported):
    network, program, q = exported
    assert program.program.operators_outside_xnnpack() == []
    diffs = program.compare_layers(q)
    assert set(diffs) == {op.name for op in network.ops}
    for name, d in diffs.items():
        assert d.max() <= 1, name            # XNNPACK requantizes in float32, the engine in fixed point
        assert (d == 0).float().mean() >= 0.95, name
    everything = torch.cat([d.flatten() for d in diffs.values()])
    assert (everything == 0).float().mean() >= 0.99


def test_executorch_end_to_end_codes_and_classes(exported):
    network, program, q = exported
    ours, theirs = network.run(q), program.run(q)
    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
    # one-unit differences compound from layer to layer: a loose bound end to end
    assert (ours.int() - theirs.int()).abs().float().mean() < 1.0
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.9
    # slices and padding to the static batch change nothing
    assert torch.equal(program.run(q[:5]), theirs[:5])
    logits = program(network.input_spec.dequantize(q))
    assert torch.equal(logits, network.dequantize_output(theirs))


def test_the_residual_add_runs_in_xnnpack(exported):
    network, program, q = exported
    adds = [op.name for op in network.ops if isinstance(op, engine.IntAdd)]
    if not adds:
        pytest.skip("a plain chain")
    diffs = program.compare_layers(q)
    assert all(diffs[a].max() <= 1 for a in adds)


def test_a_w4a4_qat_network_exports_with_its_4_bit_ranges():
    torch.manual_seed(0)
    shape = (1, 40)
    x = real_inputs(shape, 128, 3)
    model = qat.prepare(calibrated(models.Mnist1DCNN(), shape), "lsq", "lsq", bits=4, example_input=x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randint(0, 10, (128,))
    for _ in range(3):    # a few steps, so that the trained grids are not the initial ones
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    network = engine.convert(model.eval(), [x])
    four_bit = [op for op in network.layers() if op.out.qmax == 15]
    assert four_bit, "the inner layers write 4-bit codes"
    q = network.quantize_input(real_inputs(shape, 64, 4))
    program = engine.ExecuTorchNetwork(network, q, batch=64)
    diffs = program.compare_layers(q)
    assert all(d.max() <= 1 for d in diffs.values())
    # XNNPACK saturates only at the int8 limits: the export clamps to the 4-bit range itself
    graph = torch.export.export(_QDQGraph(network, layerwise=True),
                                tuple(network.input_spec.dequantize(q) if i == network.input_name else
                                      network.specs()[i].dequantize(network.intermediate_codes(q)[i])
                                      for op in network.ops for i in op.inputs))
    assert any("hardtanh" in str(n.target) for n in graph.graph.nodes)


def test_what_cannot_be_exported_is_named():
    g = torch.Generator().manual_seed(0)
    spec_in = engine.ActSpec(0.05, 17, 0, 255, torch.uint8)
    spec_out = engine.ActSpec(0.2, 3, 0, 255, torch.uint8)
    codes = torch.randint(-8, 8, (4, 6), generator=g)
    bias, scales = torch.zeros(4).double(), torch.full((4,), 0.01).double().numpy()
    q = torch.randint(0, 256, (2, 6), generator=g).to(torch.uint8)
    shift = engine.IntShiftAdd("shifts", ["x"], codes, scales, bias, spec_in, spec_out, None)
    with pytest.raises(ValueError, match="'shifts' \\(IntShiftAdd\\) cannot be exported"):
        engine.ExecuTorchNetwork(engine.IntegerNetwork([shift], "x", spec_in, "shifts"), q)
    asymmetric = engine.IntLayer("fc", ["x"], codes, 3, scales, bias, spec_in, spec_out, None)
    with pytest.raises(ValueError, match="'fc' has weight zero-points"):
        engine.ExecuTorchNetwork(engine.IntegerNetwork([asymmetric], "x", spec_in, "fc"), q)
    symmetric = engine.IntegerNetwork([engine.IntLayer("fc", ["x"], codes, 0, scales, bias, spec_in, spec_out, None)],
                                      "x", spec_in, "fc")
    with pytest.raises(TypeError, match="network must be"):
        engine.ExecuTorchNetwork(object(), q)
    with pytest.raises(TypeError, match="example_codes"):
        engine.ExecuTorchNetwork(symmetric, q.float())
    with pytest.raises(ValueError, match="batch must be a positive int"):
        engine.ExecuTorchNetwork(symmetric, q, batch=0)
    program = engine.ExecuTorchNetwork(symmetric, q, batch=2)
    with pytest.raises(TypeError, match="q must be"):
        program.run(q.int())
    with pytest.raises(ValueError, match="q must have shape"):
        program.run(torch.zeros(2, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="inputs must have shapes"):
        program.program(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="at least one input"):
        program.run(q[:0])


def test_pt2e_quantize_gives_per_channel_symmetric_int8_weights_near_float():
    shape = (1, 40)
    model = calibrated(models.Mnist1DCNN(), shape)
    calibration = [real_inputs(shape, 64, 5)]
    x = real_inputs(shape, 64, 6)
    converted = engine.pt2e_quantize(model, calibration, x)
    weights = [n for n in converted.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(weights) == 5
    for node in weights:
        zero_points = getattr(converted, node.args[2].target)
        codes = getattr(converted, node.args[0].target)
        assert codes.dtype == torch.int8 and torch.all(zero_points == 0) and codes.abs().max() <= 127
    with torch.no_grad():
        reference, quantized = model(x), converted(x)
    assert (reference.argmax(1) == quantized.argmax(1)).float().mean() >= 0.9
    program = engine.ExecuTorchProgram(converted, (x,))
    assert program.operators_outside_xnnpack() == []
    on_device = program(x)[0]
    assert (on_device - quantized).abs().max() <= 2 * (quantized.max() - quantized.min()) / 255 + 1e-6
    with pytest.raises(ValueError, match="quantizer must be one of"):
        engine.pt2e_quantize(model, calibration, x, quantizer="fbgemm")
    with pytest.raises(TypeError, match="model must be"):
        engine.pt2e_quantize("model", calibration, x)
    with pytest.raises(TypeError, match="module must be"):
        engine.ExecuTorchProgram("model", (x,))
    with pytest.raises(TypeError, match="example_inputs"):
        engine.ExecuTorchProgram(converted, x)


def test_save_writes_the_program(tmp_path, exported):
    _, program, _ = exported
    path = program.program.save(tmp_path / "net.pte")
    data = path.read_bytes()
    assert data == program.program.pte and data[4:8] == b"ET12"   # the ExecuTorch flatbuffer identifier


def test_agreement_counts_what_it_says(exported):
    network, program, q = exported
    labels = network.run(q).argmax(1)          # the engine's own classes: its accuracy is 100 %
    row = engine.agreement(network, program, q, labels)
    theirs = program.run(q)
    assert row["engine acc (%)"] == 100.0
    assert row["XNNPACK acc (%)"] == pytest.approx(row["same class (%)"])
    assert row["same class (%)"] == pytest.approx(100 * (theirs.argmax(1) == labels).double().mean().item())
    d = (network.run(q).int() - theirs.int()).abs()
    assert row["end to end: max LSB"] == int(d.max())
    assert row["end to end: identical (%)"] == pytest.approx(100 * (d == 0).double().mean().item())
    layerwise = torch.cat([v.flatten() for v in program.compare_layers(q).values()])
    assert row["layer by layer: max LSB"] == int(layerwise.max()) <= 1
    with pytest.raises(ValueError, match="labels must be"):
        engine.agreement(network, program, q, labels[:-1])
    with pytest.raises(ValueError, match="program must be"):
        engine.agreement(network, "program", q, labels)


def test_layer_codes_are_what_compare_layers_measures(exported):
    network, program, q = exported
    theirs = program.layer_codes(q[:10])
    ours = network.intermediate_codes(q[:10])
    diffs = program.compare_layers(q[:10])
    for name, codes in theirs.items():
        spec = network.specs()[name]
        assert codes.dtype == spec.dtype and codes.min() >= spec.qmin and codes.max() <= spec.qmax
        assert torch.equal(diffs[name], (ours[name].int() - codes.int()).abs())


def test_pt2e_result_takes_eval_and_pairs():
    shape = (1, 40)
    model = calibrated(models.Mnist1DCNN(), shape)
    x = real_inputs(shape, 16, 7)
    converted = engine.pt2e_quantize(model, [(x, torch.zeros(16))], x)
    converted.eval()   # raises for a bare exported module
    with torch.no_grad():
        assert converted(x).shape == (16, 10)


def test_without_the_explicit_clamps_xnnpack_overruns_a_4_bit_grid():
    torch.manual_seed(1)
    shape = (1, 40)
    x = real_inputs(shape, 128, 8)
    model = qat.prepare(calibrated(models.Mnist1DCNN(), shape), "lsq", "lsq", bits=4, example_input=x)
    network = engine.convert(model.eval(), [x])
    q = network.quantize_input(real_inputs(shape, 64, 9))
    four_bit = [op.name for op in network.layers() if op.out.qmax == 15]
    clamped = engine.ExecuTorchNetwork(network, q, batch=64)
    unclamped = engine.ExecuTorchNetwork(network, q, batch=64, clamp_narrow_grids=False)
    assert max(int(c.max()) for n, c in clamped.layer_codes(q).items() if n in four_bit) <= 15
    overrun = max(int(c.max()) for n, c in unclamped.layer_codes(q).items() if n in four_bit)
    assert overrun > 15       # the quantize step's quant_max alone does not hold the range
    with pytest.raises(TypeError, match="clamp_narrow_grids must be a bool"):
        engine.ExecuTorchNetwork(network, q, clamp_narrow_grids=1)


def test_quiet_stack_silences_and_restores():
    import logging
    import warnings

    from qlib.engine.export import quiet_stack

    logger = logging.getLogger("torchao")
    before = logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_stack():
            assert logger.level == logging.ERROR
            warnings.warn("inside", DeprecationWarning)
        warnings.warn("outside", UserWarning)
    assert [str(w.message) for w in caught] == ["outside"]
    assert logger.level == before
