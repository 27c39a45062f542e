"""The engine's integer network on ExecuTorch's XNNPACK backend, with the engine's own codes.

:func:`~qlib.engine.qdq_module` rewrites an :class:`~qlib.engine.IntegerNetwork` as a *QDQ
graph*, the form every current runtime receives: each weighted layer reads its weights as
``dequantize_per_channel(int8 codes, scales)``, computes in float, and hands its output to
``quantize_per_tensor(scale, zero-point)`` followed by ``dequantize_per_tensor``. Nothing is
re-observed: the codes, scales and zero-points are the engine's.
:class:`~qlib.engine.ExecuTorchNetwork` exports that graph with ``torch.export``, lowers it with
the XNNPACK partitioner (which replaces every ``dequantize -> op -> quantize`` pattern by one int8
kernel) to a ``.pte`` program and runs it with ``executorch.runtime``.

What had to change on the way:

* XNNPACK's int8 kernels take **int8** activations: a uint8 grid ``(S, Z)`` becomes the int8 grid
  ``(S, Z - 128)`` and every code ``q`` becomes ``q - 128``, which is exact (same real values);
* it takes **symmetric** weights (zero-point 0): a layer with weight zero-points (the per-tensor
  asymmetric grid of Jacob et al.) is refused;
* it quantizes a float bias itself, at ``S_in * S_w``: a layer whose int32 bias the engine keeps
  ``2^k`` times finer (``bias_shift``, trained low-bit layers) loses those ``k`` bits;
* it requantizes in float32 where the engine uses gemmlowp's fixed-point multipliers, so single
  codes may differ by one unit (:meth:`~qlib.engine.ExecuTorchNetwork.compare_layers` measures it).

Shift-add layers (:class:`~qlib.engine.IntShiftAdd`) have no counterpart and are refused by name.
torchao and ExecuTorch are imported on first use (``pip install quantbook-qlib[deploy]``; the book's
``requirements.txt`` pins them).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .network import IntegerNetwork
from .ops import ActSpec, IntAdd, IntAvgPool, IntClamp, IntFlatten, IntLayer, IntMaxPool, IntRequantize

__all__ = ["qdq_module", "int8_spec", "ExecuTorchProgram", "ExecuTorchNetwork", "pt2e_quantize", "EXPORTABLE_OPS",
           "PT2E_QUANTIZERS", "quiet_stack", "agreement"]

#: The engine operations the export takes (shift-add layers are the one kind it refuses).
EXPORTABLE_OPS = (IntLayer, IntAdd, IntAvgPool, IntMaxPool, IntClamp, IntRequantize, IntFlatten)


@contextmanager
def quiet_stack():
    """Silence the import- and lowering-time chatter of torchao and ExecuTorch (CUDA extensions that
    a CPU machine cannot load, deprecations inside those packages, "experimental API" notices),
    which says nothing about the program being built. Errors still propagate."""
    names = ("torchao", "torch.utils._pytree", "executorch", "torch._export", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _quiet_native_stderr():
    """ExecuTorch's runtime logs its CPU probing (``cpuinfo_utils.cpp: ... Failed to open midr
    file``) when it loads a program, through Python's ``sys.stderr`` and, outside Python, file
    descriptor 2; a notebook would show it. Errors are raised as Python exceptions either way."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load_stack():
    """Import torchao's op registrations and ExecuTorch lazily: the rest of qlib never needs them."""
    with quiet_stack(), _quiet_native_stderr():
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (registers quantized_decomposed ops)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    return XnnpackPartitioner, to_edge_transform_and_lower, Runtime


def int8_spec(spec: ActSpec) -> ActSpec:
    """The same grid with int8 codes: a uint8 grid ``(S, Z)`` on ``[qmin, qmax]`` becomes
    ``(S, Z - 128)`` on ``[qmin - 128, qmax - 128]`` (same real values); an int8 grid is returned as is."""
    if spec.dtype == torch.int8:
        return spec
    if spec.dtype != torch.uint8:
        raise ValueError(f"spec.dtype must be torch.uint8 or torch.int8, got {spec.dtype}")
    return ActSpec(spec.scale, spec.zero_point - 128, spec.qmin - 128, spec.qmax - 128, torch.int8)


def _to_int8_codes(q: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    return q if spec.dtype == torch.int8 else (q.to(torch.int16) - 128).to(torch.int8)


def _from_int8_codes(q: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    return q if spec.dtype == torch.int8 else (q.to(torch.int16) + 128).to(torch.uint8)


def _check_exportable(network: IntegerNetwork):
    if not isinstance(network, IntegerNetwork):
        raise TypeError(f"network must be a qlib.engine.IntegerNetwork, got {type(network).__name__}")
    for op in network.ops:
        if not isinstance(op, EXPORTABLE_OPS):
            raise ValueError(f"operation {op.name!r} ({type(op).__name__}) cannot be exported to XNNPACK, "
                             "which has no shift-add kernel; the export takes "
                             + ", ".join(c.__name__ for c in EXPORTABLE_OPS))
        if isinstance(op, IntLayer) and not op.symmetric:
            raise ValueError(f"layer {op.name!r} has weight zero-points (an asymmetric weight grid); XNNPACK's "
                             "int8 kernels take symmetric weights only: convert with symmetric weights")
        specs = [op.out] + ([op.inp] if isinstance(op, IntLayer) else [])
        for spec in specs:
            if spec.dtype not in (torch.uint8, torch.int8):
                raise ValueError(f"operation {op.name!r}: activation codes must be uint8 or int8, got {spec.dtype}")


class _QDQGraph(nn.Module):
    """The network as ``dequantize -> float op -> quantize`` steps with the engine's codes and grids.

    ``layerwise=False``: one chain, float input (the dequantized input codes) to the dequantized
    output. ``layerwise=True``: every operation reads its own graph inputs (the engine's codes of
    its inputs, dequantized), and the graph returns every operation's output, so that each
    operation is compared on the engine's inputs, without compounding.
    """

    def __init__(self, network: IntegerNetwork, layerwise: bool = False, clamp_narrow_grids: bool = True):
        super().__init__()
        _check_exportable(network)
        self.network, self.layerwise, self.clamp_narrow_grids = network, layerwise, clamp_narrow_grids
        self.specs = {name: int8_spec(spec) for name, spec in network.specs().items()}
        self._buffers_of = {}
        for i, op in enumerate(network.layers()):
            key = f"layer{i}"
            # every code in its int8 container, [-128, 127]: a [-8, 7] range would send 4-bit codes
            # down XNNPACK's packed-int4 path, which convolutions do not have
            self.register_buffer(f"{key}_codes", op.weight.clone())
            self.register_buffer(f"{key}_scales", op.w_scale.to(torch.float32).clone())
            self.register_buffer(f"{key}_zero_points", torch.zeros(op.weight.shape[0], dtype=torch.int64))
            self.register_buffer(f"{key}_bias", (op.bias.double() * op.bias_scale).to(torch.float32))
            self._buffers_of[op.name] = key

    def _qdq(self, y: torch.Tensor, spec: ActSpec) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor.default(y, spec.scale, spec.zero_point, spec.qmin, spec.qmax, torch.int8)
        return qd.dequantize_per_tensor.default(q, spec.scale, spec.zero_point, spec.qmin, spec.qmax, torch.int8)

    def _op(self, op, args):
        if isinstance(op, IntLayer):
            key = self._buffers_of[op.name]
            w = torch.ops.quantized_decomposed.dequantize_per_channel.default(
                getattr(self, f"{key}_codes"), getattr(self, f"{key}_scales"), getattr(self, f"{key}_zero_points"),
                0, -128, 127, torch.int8)
            bias = getattr(self, f"{key}_bias")
            if op.kind == "linear":
                y = F.linear(args[0], w, bias)
            else:
                conv = F.conv1d if op.kind == "conv1d" else F.conv2d
                y = conv(args[0], w, bias, op.stride, op.padding, op.dilation, op.groups)
        elif isinstance(op, IntAdd):
            y = args[0] + args[1]
        elif isinstance(op, (IntAvgPool, IntMaxPool)):
            y = op.module(args[0])
        elif isinstance(op, IntFlatten):
            y = torch.flatten(args[0], op.start_dim)
        else:  # IntClamp, IntRequantize
            y = args[0]
        return self._qdq(self._clamp(y, op), self.specs[op.name])

    def _clamp(self, y, op):
        """The operation's output range as a float clamp that XNNPACK fuses into the kernel.

        XNNPACK saturates only at the int8 limits, whatever ``quant_min``/``quant_max`` the graph
        names: a narrower grid (a 4-bit activation, a ReLU's zero, ReLU6) must be an explicit clamp.
        """
        spec = self.specs[op.name]
        lo, hi = getattr(op, "lo", op.out.qmin), getattr(op, "hi", op.out.qmax)
        lo, hi = lo - op.out.zero_point + spec.zero_point, hi - op.out.zero_point + spec.zero_point  # int8 codes
        if lo <= -128 and hi >= 127:
            return y
        if lo == spec.zero_point and (hi >= 127 or not self.clamp_narrow_grids):
            return torch.relu(y)
        if not self.clamp_narrow_grids:   # only the ReLU: what the graph says without explicit clamps
            return y
        return F.hardtanh(y, (lo - spec.zero_point) * spec.scale, (hi - spec.zero_point) * spec.scale)

    def forward(self, *inputs):
        if not self.layerwise:
            name = self.network.input_name
            env = {name: self._qdq(inputs[0], self.specs[name])}
            for op in self.network.ops:
                env[op.name] = self._op(op, [env[i] for i in op.inputs])
            return env[self.network.output_name]
        outputs, position = [], 0
        for op in self.network.ops:
            args = [self._qdq(x, self.specs[i]) for x, i in zip(inputs[position:position + len(op.inputs)], op.inputs)]
            position += len(op.inputs)
            outputs.append(self._op(op, args))
        return tuple(outputs)


def qdq_module(network: IntegerNetwork) -> nn.Module:
    """The network as a float PyTorch module of ``dequantize -> op -> quantize`` steps (a QDQ graph)
    holding the engine's int8 weight codes, scales and zero-points (int8 activation grids).

    Input: the dequantized input codes; output: the dequantized output codes. Run eagerly, it
    computes what the integer network computes with real multipliers instead of fixed-point ones
    (in float32: :meth:`~qlib.engine.IntegerNetwork.simulate` to within float32 rounding).
    """
    return _QDQGraph(network)


def _dequantized(q: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    s8 = int8_spec(spec)
    return (_to_int8_codes(q, spec).to(torch.int32) - s8.zero_point).to(torch.float32) * s8.scale


def _padded(q: torch.Tensor, batch: int) -> torch.Tensor:
    """``q`` with its last input repeated up to ``batch`` inputs."""
    if len(q) == 0:
        raise ValueError("q must hold at least one input")
    return q if len(q) == batch else torch.cat([q, q[-1:].expand(batch - len(q), *q.shape[1:])])


def _codes(y: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """Codes back from dequantized values (exact: ``y = S (q - Z)`` in float32)."""
    s8 = int8_spec(spec)
    q8 = (torch.round(y.double() / s8.scale) + s8.zero_point).clamp(-128, 127).to(torch.int8)
    return _from_int8_codes(q8, spec)


class ExecuTorchProgram:
    """A module exported with ``torch.export``, lowered with the XNNPACK partitioner to an ExecuTorch
    program and loaded in ``executorch.runtime``: ``program(*inputs)`` returns its outputs (a list).

    ``module``: a QDQ module (:func:`qdq_module`, or torchao's ``convert_pt2e`` output);
    ``example_inputs``: a tuple of tensors whose shapes the program keeps (static shapes, as a
    deployed program has).
    """

    def __init__(self, module: nn.Module, example_inputs: tuple):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a tuple of tensors")
        partitioner, to_edge_transform_and_lower, runtime = _load_stack()
        with quiet_stack(), torch.no_grad():
            exported = torch.export.export(module, example_inputs)
            self._edge = to_edge_transform_and_lower(exported, partitioner=[partitioner()])
            self._program = self._edge.to_executorch()
            # the loaded method reads the program's bytes in place: self._program keeps them alive
            with _quiet_native_stderr():
                self._method = runtime.get().load_program(self._program.buffer).load_method("forward")
        self.input_shapes = [tuple(t.shape) for t in example_inputs]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        shapes = [tuple(t.shape) for t in inputs]
        if shapes != self.input_shapes:
            raise ValueError(f"inputs must have shapes {self.input_shapes} (the exported ones), got {shapes}")
        return list(self._method.execute(list(inputs)))

    @property
    def pte(self) -> bytes:
        """The serialized ExecuTorch program (what a phone app loads)."""
        return self._program.buffer

    def save(self, path: str | Path) -> Path:
        """Write the ``.pte`` program to ``path`` and return the path."""
        path = Path(path)
        path.write_bytes(self.pte)
        return path

    def operators_outside_xnnpack(self) -> list[str]:
        """The operators of the lowered program that XNNPACK did not take (they run on ExecuTorch's
        portable CPU kernels); empty when every operation is inside an XNNPACK delegate."""
        graph = self._edge.exported_program().graph_module.graph
        names = [getattr(n.target, "__name__", str(n.target)) for n in graph.nodes if n.op == "call_function"]
        return [name for name in names if not any(k in name for k in ("call_delegate", "getitem", "sym_size"))]


class ExecuTorchNetwork:
    """An integer network on ExecuTorch's XNNPACK backend with the engine's own codes.

    ``network``: a converted :class:`~qlib.engine.IntegerNetwork` (symmetric weights, no shift-add
    layers). :meth:`run` maps the engine's input codes to output codes in the engine's dtype, so
    the two compare code for code. The program has a static ``batch`` (as a deployed one does;
    :meth:`run` slices and pads to it); ``example_codes`` give the input shape. ``program`` is the
    :class:`ExecuTorchProgram` (its ``pte`` the file to deploy).

    ``clamp_narrow_grids=False`` leaves out the explicit clamps that hold a grid narrower than int8
    (a 4-bit activation, ReLU6); the graph's quantize steps still name the narrow range, and the
    result shows what XNNPACK makes of that alone (it saturates at the int8 limits).
    """

    def __init__(self, network: IntegerNetwork, example_codes: torch.Tensor, batch: int = 256,
                 clamp_narrow_grids: bool = True):
        _check_exportable(network)
        if not isinstance(clamp_narrow_grids, bool):
            raise TypeError(f"clamp_narrow_grids must be a bool, got {type(clamp_narrow_grids).__name__}")
        self.clamp_narrow_grids = clamp_narrow_grids
        if not isinstance(example_codes, torch.Tensor) or example_codes.dtype != network.input_spec.dtype:
            raise TypeError(f"example_codes must be a tensor of {network.input_spec.dtype} input codes "
                            "(network.quantize_input)")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.network, self.batch = network, batch
        self._example = _padded(example_codes[:batch], batch)
        self.program = ExecuTorchProgram(_QDQGraph(network, clamp_narrow_grids=clamp_narrow_grids),
                                         (_dequantized(self._example, network.input_spec),))
        self._layerwise = None

    def _check_codes(self, q):
        if not isinstance(q, torch.Tensor) or q.dtype != self.network.input_spec.dtype:
            raise TypeError(f"q must be a torch tensor of {self.network.input_spec.dtype} codes (use quantize_input)")
        if q.shape[1:] != self._example.shape[1:]:
            raise ValueError(f"q must have shape (batch, {', '.join(map(str, self._example.shape[1:]))}), "
                             f"got {tuple(q.shape)}")

    @torch.no_grad()
    def run(self, q: torch.Tensor) -> torch.Tensor:
        """Input codes -> output codes (the engine's dtype), computed by the XNNPACK program
        (in slices of the exported batch, the last one padded)."""
        self._check_codes(q)
        spec = self.network.input_spec
        outs = [self.program(_dequantized(_padded(part, self.batch), spec))[0][:len(part)]
                for part in q.split(self.batch)]
        return _codes(torch.cat(outs), self.network.output_spec)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float in, dequantized logits out (the engine's input grid at the entrance)."""
        return self.network.dequantize_output(self.run(self.network.quantize_input(x)))

    @torch.no_grad()
    def layer_codes(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, XNNPACK's output codes (the engine's dtype) when every operation is given
        the *engine's* input codes for input codes ``q``. The layer-wise program is lowered on first use."""
        self._check_codes(q)
        net = self.network
        specs = net.specs()

        def inputs_of(env):
            return tuple(_dequantized(env[i], specs[i]) for op in net.ops for i in op.inputs)

        if self._layerwise is None:
            self._layerwise = ExecuTorchProgram(
                _QDQGraph(net, layerwise=True, clamp_narrow_grids=self.clamp_narrow_grids),
                inputs_of(net.intermediate_codes(self._example)))
        codes = {op.name: [] for op in net.ops}
        for part in q.split(self.batch):
            env = net.intermediate_codes(_padded(part, self.batch))
            for op, y in zip(net.ops, self._layerwise(*inputs_of(env))):
                codes[op.name].append(_codes(y[:len(part)], op.out))
        return {name: torch.cat(c) for name, c in codes.items()}

    @torch.no_grad()
    def compare_layers(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, ``|engine code - XNNPACK code|`` with both given the *engine's* input codes
        (no compounding)."""
        ours = self.network.intermediate_codes(q)
        return {name: (ours[name].to(torch.int32) - theirs.to(torch.int32)).abs()
                for name, theirs in self.layer_codes(q).items()}


#: torchao's post-training quantizers, by name: ``"xnnpack"`` (per-channel symmetric int8 weights,
#: int8 activations; the ExecuTorch route) and ``"x86_inductor"`` (for ``torch.compile`` on x86).
PT2E_QUANTIZERS = ("xnnpack", "x86_inductor")


def pt2e_quantize(model: nn.Module, calibration, example: torch.Tensor, quantizer: str = "xnnpack") -> nn.Module:
    """torchao's post-training quantization of a float model (the flow a PyTorch user runs today):
    ``torch.export`` -> ``prepare_pt2e`` with ``quantizer``'s observers -> the ``calibration`` batches
    -> ``convert_pt2e``. The result is a QDQ module; its grids are torchao's, not qlib's.

    ``example``: an input batch (the batch dimension stays dynamic); ``calibration``: input batches
    (or ``(x, y)`` pairs). Lower the result with
    :class:`ExecuTorchProgram` (``"xnnpack"``) or ``torch.compile`` (``"x86_inductor"``).
    """
    if quantizer not in PT2E_QUANTIZERS:
        raise ValueError(f"quantizer must be one of {PT2E_QUANTIZERS}, got {quantizer!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _load_stack()
    with quiet_stack():
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        if quantizer == "xnnpack":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            observer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        else:
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
            observer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        model = model.eval()
        with torch.no_grad():
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            prepared = prepare_pt2e(exported.module(), observer)
            for batch in calibration:
                prepared(batch[0] if isinstance(batch, (tuple, list)) else batch)
            converted = convert_pt2e(prepared)
        # an exported module refuses .train()/.eval(); torchao's switch lets it take them (a no-op here:
        # the converted graph has no dropout or batch norm left)
        allow_exported_model_train_eval(converted)
        return converted


@torch.no_grad()
def agreement(network: IntegerNetwork, program: ExecuTorchNetwork, q: torch.Tensor, labels: torch.Tensor,
              layer_inputs: int | None = None) -> dict:
    """How closely ``program`` (the network on XNNPACK) reproduces ``network`` on input codes ``q``.

    Layer by layer (every operation given the engine's input codes, on the first ``layer_inputs``
    inputs; ``None``: all): the percentage of identical output codes and the largest difference in
    LSB, over every code of every operation; end to end
    (each side on its own codes): the same for the output codes, the percentage of inputs whose
    predicted class agrees, and both test accuracies (in %) on ``labels``.
    """
    if not isinstance(program, ExecuTorchNetwork) or program.network is not network:
        raise ValueError("program must be the ExecuTorchNetwork exported from this network")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(q),):
        raise ValueError(f"labels must be a tensor of {len(q)} class indices, one per input")
    if layer_inputs is not None and (isinstance(layer_inputs, bool) or not isinstance(layer_inputs, int)
                                     or layer_inputs < 1):
        raise ValueError(f"layer_inputs must be a positive int or None, got {layer_inputs!r}")
    layerwise = torch.cat([d.flatten() for d in program.compare_layers(q[:layer_inputs]).values()])
    ours, theirs = network.run(q), program.run(q)
    end_to_end = (ours.to(torch.int32) - theirs.to(torch.int32)).abs()
    return {
        "layer by layer: identical (%)": 100 * (layerwise == 0).double().mean().item(),
        "layer by layer: max LSB": int(layerwise.max()),
        "end to end: identical (%)": 100 * (end_to_end == 0).double().mean().item(),
        "end to end: max LSB": int(end_to_end.max()),
        "same class (%)": 100 * (ours.argmax(1) == theirs.argmax(1)).double().mean().item(),
        "engine acc (%)": 100 * (ours.argmax(1) == labels).double().mean().item(),
        "XNNPACK acc (%)": 100 * (theirs.argmax(1) == labels).double().mean().item(),
    }
