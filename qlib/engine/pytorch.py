"""The same integer network on PyTorch's quantized engine (``torch.ao``, x86/fbgemm), for comparison.

This route is deprecated upstream (``torch.ao.quantization`` warns that it will be removed); it stays
here because it runs *the engine's own codes* through fbgemm's kernels, which the maintained stack
(torchao's pt2e flow, ExecuTorch) cannot be fed directly.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from .network import IntegerNetwork
from .ops import IntAdd, IntAvgPool, IntClamp, IntFlatten, IntLayer, IntMaxPool, IntOp, IntRequantize

__all__ = ["PyTorchQuantized"]

_SUPPORTED = (IntLayer, IntAdd, IntAvgPool, IntMaxPool, IntClamp, IntRequantize, IntFlatten)


def _pytorch_module(op: IntLayer):
    """A prepacked ``torch.ao.nn.quantized`` module holding the layer's int8 weights and int32 bias."""
    import torch.ao.nn.quantized as nnq

    if op.out.dtype != torch.uint8 or op.inp.dtype != torch.uint8:
        raise ValueError(f"layer {op.name!r}: the PyTorch comparison supports uint8 activations (PyTorch's quint8)")
    if not op.symmetric:
        raise ValueError(f"layer {op.name!r}: PyTorch's int8 kernels take symmetric weights (zero-point 0); this "
                         "layer has weight zero-points")
    weight = torch._make_per_channel_quantized_tensor(
        op.weight, op.w_scale.double(), torch.zeros(op.weight.shape[0], dtype=torch.int64), 0)
    bias = (op.bias.double() * op.bias_scale).float()  # PyTorch takes the bias in float and rounds it back
    if op.kind == "linear":
        module = nnq.Linear(op.weight.shape[1], op.weight.shape[0])
    else:
        cls = nnq.Conv1d if op.kind == "conv1d" else nnq.Conv2d
        module = cls(op.weight.shape[1] * op.groups, op.weight.shape[0], tuple(op.weight.shape[2:]), op.stride,
                     op.padding, op.dilation, op.groups)
    module.set_weight_bias(weight, bias)
    module.scale, module.zero_point = op.out.scale, op.out.zero_point
    return module


def _pytorch_op(op: IntOp, args, modules):
    """One operation of an IntegerNetwork with PyTorch's quantized kernels, on quantized tensors."""
    if isinstance(op, IntLayer):
        y = modules[op.name](args[0])
        if op.activation is not None:
            y = torch.clamp(y, 0.0, 6.0) if op.activation == "relu6" else torch.relu(y)
        return y
    if isinstance(op, IntAdd):
        add = torch.ops.quantized.add_relu if op.lo > op.out.qmin else torch.ops.quantized.add
        return add(args[0], args[1], op.out.scale, op.out.zero_point)
    if isinstance(op, (IntAvgPool, IntMaxPool)):
        return op.module(args[0])
    if isinstance(op, IntClamp):
        return torch.relu(args[0])
    if isinstance(op, IntRequantize):
        return torch.quantize_per_tensor(args[0].dequantize(), op.out.scale, op.out.zero_point, torch.quint8)
    return torch.flatten(args[0], op.start_dim)


class PyTorchQuantized:
    """The same integer network on PyTorch's quantized engine (x86/fbgemm), weights prepacked once.

    Same int8 weights, int32 biases (passed as the float ``bias * S_in * S_w`` that PyTorch
    expects), scales and zero-points. PyTorch requantizes in float32 with round-half-to-even, so
    its codes may differ from :meth:`IntegerNetwork.run` by a unit here and there, and such
    differences compound from layer to layer. Convert with ``reduce_range=True`` for this
    comparison (see :func:`convert`).
    """

    def __init__(self, network: IntegerNetwork):
        for op in network.ops:
            if not isinstance(op, _SUPPORTED):
                raise ValueError(f"operation {op.name!r} ({type(op).__name__}) has no counterpart in PyTorch's "
                                 "quantized engine (shift-add layers, for one, do not exist there)")
        self.network = network
        with _pytorch_quantized():
            self.modules = {op.name: _pytorch_module(op) for op in network.layers()}

    @torch.no_grad()
    def run(self, q: torch.Tensor) -> torch.Tensor:
        """Input codes -> output codes, end to end."""
        with _pytorch_quantized():
            env = {self.network.input_name: _quantized(q, self.network.input_spec)}
            for op in self.network.ops:
                env[op.name] = _pytorch_op(op, [env[i] for i in op.inputs], self.modules)
            return env[self.network.output_name].int_repr()

    @torch.no_grad()
    def compare_layers(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, the absolute difference between our codes and PyTorch's, both given *our* input codes."""
        net = self.network
        specs = {net.input_name: net.input_spec, **{op.name: op.out for op in net.ops}}
        env, diffs = {net.input_name: q}, {}
        with _pytorch_quantized():
            for op in net.ops:
                args = [env[i] for i in op.inputs]
                ours = op.forward(*args)
                theirs = _pytorch_op(op, [_quantized(a, specs[i]) for a, i in zip(args, op.inputs)], self.modules)
                diffs[op.name] = (ours.to(torch.int32) - theirs.int_repr().to(torch.int32)).abs()
                env[op.name] = ours
        return diffs


def _quantized(codes, spec):
    return torch._make_per_tensor_quantized_tensor(codes, spec.scale, spec.zero_point)


@contextmanager
def _pytorch_quantized():
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        # PyTorch 2.13 marks quantized tensors as deprecated; they are still what its int8 kernels take.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield
