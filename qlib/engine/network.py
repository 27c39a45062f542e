"""The interpreter: a converted network is a list of integer operations in topological order."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .._checks import check_choice
from .ops import ActSpec, IntLayer, IntOp, IntShiftAdd

__all__ = ["IntegerNetwork", "DtypeRecorder", "ENGINE_BACKENDS"]

#: How the engine computes: ``"float32"``, a convolution's integer sums by float32 kernels on integer
#: values (exact) and the rest by readable tensor operations (the route the book teaches);
#: ``"int"``, integer tensors only (an integer im2col and ``torch._int_mm``); ``"fast"``, the float32
#: sums with every elementwise integer step (centring, requantization, residual add) fused into one
#: compiled loop (:mod:`qlib.engine.fused`). All three give identical codes.
ENGINE_BACKENDS = ("float32", "int", "fast")


class IntegerNetwork:
    """A converted network: integer operations in topological order between an input and an output spec."""

    def __init__(self, ops: list[IntOp], input_name: str, input_spec: ActSpec, output_name: str):
        self.ops, self.input_name, self.input_spec, self.output_name = ops, input_name, input_spec, output_name
        self.output_spec = next(op.out for op in ops if op.name == output_name)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The entrance: float input -> codes (the only float step before the output)."""
        return self.input_spec.quantize(x)

    def dequantize_output(self, q: torch.Tensor) -> torch.Tensor:
        """The exit: output codes -> real logits, only for showing them."""
        return self.output_spec.dequantize(q)

    @torch.no_grad()
    def run(self, q: torch.Tensor, backend: str = "float32") -> torch.Tensor:
        """Input codes -> output codes with integer arithmetic only."""
        check_choice(backend, "backend", ENGINE_BACKENDS)
        if not isinstance(q, torch.Tensor) or q.dtype != self.input_spec.dtype:
            raise TypeError(f"q must be a torch tensor of {self.input_spec.dtype} codes (use quantize_input)")
        env = {self.input_name: q}
        for op in self.ops:
            env[op.name] = op.forward(*(env[i] for i in op.inputs), backend=backend)
        return env[self.output_name]

    @torch.no_grad()
    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The same network in exact real arithmetic with the same grids (the fake-quant reference)."""
        env = {self.input_name: self.input_spec.fake_quantize(x.double()).float()}
        for op in self.ops:
            env[op.name] = op.simulate(*(env[i] for i in op.inputs))
        return env[self.output_name]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, backend: str = "float32") -> torch.Tensor:
        """Float in, dequantized logits out, integer arithmetic in between."""
        return self.dequantize_output(self.run(self.quantize_input(x), backend))

    def specs(self) -> dict[str, ActSpec]:
        """The grid of every tensor the network computes, by name (input included)."""
        return {self.input_name: self.input_spec, **{op.name: op.out for op in self.ops}}

    @torch.no_grad()
    def intermediate_codes(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codes of every tensor (input included) for input codes ``q``, by name."""
        env = {self.input_name: q}
        for op in self.ops:
            env[op.name] = op.forward(*(env[i] for i in op.inputs))
        return env

    @torch.no_grad()
    def layer_errors(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, the absolute difference between its codes and the exact codes, for the same input codes.

        No compounding: every operation gets the engine's own input codes. "Exact" is the same
        operation with real multipliers (:meth:`simulate` for one step); the difference is the
        fixed-point rounding alone, at most one unit for a layer.
        """
        specs = self.specs()
        env, errors = {self.input_name: q}, {}
        for op in self.ops:
            args = [env[i] for i in op.inputs]
            ours = op.forward(*args)
            exact = op.out.quantize(op.simulate(*[specs[i].dequantize(a) for a, i in zip(args, op.inputs)]))
            errors[op.name] = (ours.to(torch.int32) - exact.to(torch.int32)).abs()
            env[op.name] = ours
        return errors

    def layers(self) -> list[IntLayer | IntShiftAdd]:
        """The weighted operations (conv/linear layers, multiplier or shift-add), in order."""
        return [op for op in self.ops if isinstance(op, (IntLayer, IntShiftAdd))]

    def packed_weight_bits(self) -> dict[str, int]:
        """Per weighted layer, the bits its weight codes take packed at the layer's own width
        (``weight_bits`` per weight, what a deployment stores; the int8 containers here hold one
        code per byte whatever the width). Biases are not included (32 bits each)."""
        return {op.name: _weight_codes(op).numel() * op.weight_bits for op in self.layers()}

    def weight_bytes(self) -> int:
        """Bytes of int8 weight codes and int32 biases (one byte per weight, as stored)."""
        return sum(_weight_codes(op).numel() + 4 * op.bias.numel() for op in self.layers())


def _weight_codes(op: IntLayer | IntShiftAdd) -> torch.Tensor:
    return op.weight if isinstance(op, IntLayer) else op.weight_codes


class DtypeRecorder(TorchFunctionMode):
    """Records the dtype of every tensor the PyTorch operations inside its ``with`` block create.

    ``counts`` maps each dtype to how many tensors of it were created: how a reader checks that an
    inference path is integer-only (chapter 4).
    """

    def __init__(self):
        super().__init__()
        self.counts: dict[torch.dtype, int] = {}

    @property
    def dtypes(self) -> set[torch.dtype]:
        return set(self.counts)

    def floating(self) -> set[torch.dtype]:
        """The floating or complex dtypes seen (empty on an integer-only path)."""
        return {d for d in self.counts if d.is_floating_point or d.is_complex}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.counts[t.dtype] = self.counts.get(t.dtype, 0) + 1
        return out
