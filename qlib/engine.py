"""A whole network in integers: convert a float model, then run it on integer codes only.

Chapter 4 of the book. :func:`convert` takes a float model (batch norms are folded first),
traces it with ``torch.fx``, calibrates the range of every activation on a few batches, and
builds an :class:`IntegerNetwork`:

* weights: int8, symmetric (zero-point 0), narrow range ``[-127, 127]``, per output channel
  (or per tensor);
* activations: uint8 with a zero-point (the paper's scheme) or int8;
* biases: int32 with scale ``S_in * S_w`` and zero-point 0;
* every layer ends in the fixed-point requantization of :mod:`qlib.fixedpoint`, and a ReLU or
  ReLU6 that follows a layer becomes the clamp of that requantization.

After conversion the float scales are gone from the inference path: :meth:`IntegerNetwork.run`
maps input codes to output codes with integer arithmetic (``quantize_input`` is the one float
step at the entrance, ``dequantize_output`` the one at the exit, for showing logits).

Supported layers: ``Conv1d``, ``Conv2d`` (any groups, so depthwise too), ``Linear``, ``ReLU``,
``ReLU6``, ``MaxPool1d/2d``, ``AvgPool1d/2d``, ``AdaptiveAvgPool1d/2d`` to size 1, ``Flatten`` /
``torch.flatten``, residual ``+``, ``Identity`` and ``Dropout``. Anything else is refused at
convert time with the layer's name and type.

Two backends compute the convolutions and matrix products exactly: ``"float32"`` runs PyTorch's
float kernels on integer values small enough that every partial sum is below 2^24 (split along
the input channels when needed), ``"int"`` uses integer tensors only (an integer im2col and
``torch._int_mm``). Tests prove that both give identical codes.
"""

from __future__ import annotations

import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ._checks import check_bool, check_choice
from .affine import qparams_from_tensor, quantize
from .fixedpoint import FixedPointMultiplier
from .fold import fold_batchnorm
from .gemm import FLOAT32_EXACT, quantized_matmul
from .observers import MinMaxObserver, Observer

ACTIVATION_DTYPES = ("uint8", "int8")
ENGINE_BACKENDS = ("float32", "int")
_WEIGHT_BOUND = 127  # narrow-range int8 weights (the engine's own choice)
_WEIGHT_MAX = 128  # the largest |code| a trained quantizer may export (int8)
_CONVS = (nn.Conv1d, nn.Conv2d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_PASS = (nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class ActSpec:
    """How an activation tensor is coded: ``r = scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax).to(self.dtype)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.int32) - self.zero_point).to(torch.float32) * self.scale

    def fake_quantize(self, x: torch.Tensor, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        lo = self.qmin if lo is None else lo
        hi = self.qmax if hi is None else hi
        return (torch.clamp(torch.round(x / self.scale) + self.zero_point, lo, hi) - self.zero_point) * self.scale


def _clamp_bounds(spec: ActSpec, activation: str | None) -> tuple[int, int]:
    """The output code range, narrowed by a fused ReLU (at Z) or ReLU6 (also at Z + 6/S)."""
    lo, hi = spec.qmin, spec.qmax
    if activation in ("relu", "relu6"):
        lo = max(lo, spec.zero_point)
    if activation == "relu6":
        hi = min(hi, spec.zero_point + int(round(6.0 / spec.scale)))
    return lo, hi


class IntOp:
    """One integer operation: ``forward`` on codes, ``simulate`` the same step in exact real arithmetic."""

    name: str
    inputs: list[str]
    out: ActSpec


class IntLayer(IntOp):
    """Conv1d/Conv2d/Linear with int8 weights, int32 bias, fixed-point requantization and a fused clamp."""

    def __init__(self, name, inputs, module, in_spec: ActSpec, out_spec: ActSpec, activation, per_channel,
                 weight_codes: torch.Tensor | None = None, weight_scale: np.ndarray | None = None):
        self.name, self.inputs, self.out, self.inp = name, inputs, out_spec, in_spec
        self.kind = "linear" if isinstance(module, nn.Linear) else f"conv{module.weight.ndim - 2}d"
        w = module.weight.detach().double()
        exported = weight_codes is not None
        if weight_codes is None:  # 8-bit symmetric narrow-range weights from the float weights
            w_qp = qparams_from_tensor(w, 8, "symmetric", True, True, axis=0 if per_channel else None)
            w_scale = np.broadcast_to(w_qp.scale.astype(np.float64), (w.shape[0],))
            scale_shape = (-1, *[1] * (w.ndim - 1))
            weight_codes = torch.clamp(torch.round(w / torch.from_numpy(w_scale.copy()).reshape(scale_shape)),
                                       -_WEIGHT_BOUND, _WEIGHT_BOUND)
        else:  # codes and per-channel scales exported by a trained weight quantizer
            w_scale = np.broadcast_to(np.asarray(weight_scale, dtype=np.float64), (w.shape[0],))
            if weight_codes.shape != w.shape or weight_codes.abs().max() > 128:
                raise ValueError(f"layer {name!r}: weight codes must match the weights' shape and fit int8")
        self.weight = weight_codes.to(torch.int8)
        bias = (module.bias.detach().double() if module.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64))
        # The bias lives in the accumulator, at scale S_in * S_w / 2^k. The paper's scheme is k = 0. For
        # weights exported by a trained low-bit quantizer S_in * S_w is coarse (a 2-bit layer's step can be
        # half the size of a typical bias), so those layers keep the bias 2^k times finer and shift the
        # accumulator left by k bits, with k as large as the int32 worst case allows (at most 16).
        self.bias_shift = 0
        if exported:
            k_terms = int(np.prod(weight_codes.shape[1:]))
            worst = k_terms * (in_spec.qmax - in_spec.qmin) * int(weight_codes.abs().max()) + float(
                (bias.abs() / torch.from_numpy(in_spec.scale * w_scale)).max()) + 1
            while self.bias_shift < 16 and worst * 2 ** (self.bias_shift + 1) < 2**31 - 1:
                self.bias_shift += 1
        bias_scale = in_spec.scale * w_scale / 2**self.bias_shift
        bias_codes = torch.round(bias / torch.from_numpy(bias_scale))
        if bias_codes.abs().max() >= 2**31:
            raise ValueError(f"layer {name!r}: the bias does not fit int32 at scale S_in * S_w (a weight scale is "
                             f"tiny: {w_scale.min():.3g}); retrain or re-initialise that quantizer")
        self.bias = bias_codes.to(torch.int32)
        shape = (-1,) if self.kind == "linear" else (1, -1) + (1,) * (w.ndim - 2)
        # A multiplier below 2^-32 sends every int32 accumulator to 0 (|acc| M < 1/2); so does 2^-32 itself,
        # which quantize_multiplier accepts: flooring there is exact.
        multipliers = np.maximum(bias_scale / out_spec.scale, 2.0**-32)
        self.requant = FixedPointMultiplier.from_reals(multipliers, shape)
        self.w_scale, self.bias_scale = torch.from_numpy(w_scale.copy()), torch.from_numpy(bias_scale)
        self.lo, self.hi = _clamp_bounds(out_spec, activation)
        if self.kind != "linear":
            self.stride, self.padding = module.stride, module.padding
            self.dilation, self.groups = module.dilation, module.groups
            if isinstance(self.padding, str) or module.padding_mode != "zeros":
                raise ValueError(f"layer {name!r}: only explicit zero padding is supported")
        self.activation = activation
        self.weight_f32 = self.weight.to(torch.float32)

    # -- the integer path ------------------------------------------------------------
    def accumulate(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The int32 accumulator ``2^k sum (x - Zx) w + bias`` for codes ``x``, shaped like the output."""
        if self.kind == "linear":
            acc = quantized_matmul(x, self.inp.zero_point, self.weight.t(), 0, None,
                                   "float32" if backend == "float32" else "int_mm")
        elif backend == "float32":
            acc = self._conv_float32(x)
        else:
            acc = self._conv_int(x)
        shape = [1, -1] + [1] * (acc.ndim - 2)
        if self.bias_shift:  # int64 only for the shift; the bound above keeps the result in int32 range
            return (acc.to(torch.int64) << self.bias_shift) + self.bias.reshape(shape)
        return acc + self.bias.reshape(shape)

    def _conv_fn(self):
        return F.conv1d if self.kind == "conv1d" else F.conv2d

    def _conv_float32(self, x):
        # Centre the codes (int16), then let the float conv kernel sum products of integers. Every
        # partial sum is an integer below 2^24 in magnitude (checked), so float32 holds it exactly.
        centred = (x.to(torch.int16) - self.inp.zero_point).to(torch.float32)
        per_input = int(np.prod(self.weight.shape[2:])) * 255 * _WEIGHT_MAX
        cin_per_group = self.weight.shape[1]
        chunk = max(1, (FLOAT32_EXACT - 1) // per_input)
        conv = self._conv_fn()
        kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if cin_per_group <= chunk:
            return conv(centred, self.weight_f32, **kwargs).to(torch.int32)
        if self.groups != 1:
            return self._conv_int(x)
        total = None
        for start in range(0, cin_per_group, chunk):
            part = conv(centred[:, start:start + chunk], self.weight_f32[:, start:start + chunk], **kwargs)
            part = part.to(torch.int32)
            total = part if total is None else total + part
        return total

    def _conv_int(self, x):
        # Integer im2col: pad with the zero-point code (the real value 0), unfold, then the
        # zero-point-folded integer GEMM of chapter 3 per group.
        dims = self.weight.ndim - 2
        pad = []
        for p in reversed(self.padding):
            pad += [p, p]
        xp = F.pad(x, pad, value=self.inp.zero_point) if any(self.padding) else x
        patches = xp
        for d in range(dims):
            k = self.weight.shape[2 + d]
            patches = patches.unfold(2 + d, (k - 1) * self.dilation[d] + 1, self.stride[d])
            if self.dilation[d] > 1:
                patches = patches[..., ::self.dilation[d]]
        n, c = x.shape[:2]
        spatial = patches.shape[2:2 + dims]
        # patches: (N, C, *spatial, *kernel) -> per group (N * spatial, C/g * kernel)
        cpg, outs = c // self.groups, []
        out_per_group = self.weight.shape[0] // self.groups
        for g in range(self.groups):
            p = patches[:, g * cpg:(g + 1) * cpg]
            p = p.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)).reshape(-1, cpg * int(
                np.prod(self.weight.shape[2:])))
            w = self.weight[g * out_per_group:(g + 1) * out_per_group].reshape(out_per_group, -1)
            outs.append(quantized_matmul(p.contiguous(), self.inp.zero_point, w.t().contiguous(), 0, None, "int_mm"))
        acc = torch.cat(outs, dim=1).reshape(n, *spatial, -1)
        return acc.permute(0, dims + 1, *range(1, dims + 1)).contiguous()

    def forward(self, x, backend="float32"):
        scaled = self.requant.apply_unchecked(self.accumulate(x, backend).to(torch.int64))
        return (scaled + self.out.zero_point).clamp(self.lo, self.hi).to(self.out.dtype)

    # -- the same layer in exact real arithmetic (the fake-quant reference) ------------------
    def simulate(self, x):
        shape = [-1] + [1] * (self.weight.ndim - 1)
        w = self.weight.double() * self.w_scale.reshape(shape)
        bias = self.bias.double() * self.bias_scale
        x = x.double()
        if self.kind == "linear":
            y = F.linear(x, w, bias)
        else:
            conv = self._conv_fn()
            y = conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return self.out.fake_quantize(y, self.lo, self.hi).float()


class IntAdd(IntOp):
    """Residual add of two coded tensors with different scales (TensorFlow Lite's scheme).

    Both inputs are centred, shifted left by 20 bits for headroom, rescaled to a common scale
    ``2 max(S_a, S_b)`` by fixed-point multipliers, added, and requantized to the output.
    """

    LEFT_SHIFT = 20

    def __init__(self, name, inputs, a: ActSpec, b: ActSpec, out: ActSpec, activation):
        self.name, self.inputs, self.a, self.b, self.out = name, inputs, a, b, out
        twice_max = 2 * max(a.scale, b.scale)
        self.ma = FixedPointMultiplier.from_reals(a.scale / twice_max)
        self.mb = FixedPointMultiplier.from_reals(b.scale / twice_max)
        self.mo = FixedPointMultiplier.from_reals(twice_max / ((1 << self.LEFT_SHIFT) * out.scale))
        self.lo, self.hi = _clamp_bounds(out, activation)

    def forward(self, qa, qb, backend="float32"):
        xa = (qa.to(torch.int64) - self.a.zero_point) << self.LEFT_SHIFT  # |x| < 2^29: int32 range
        xb = (qb.to(torch.int64) - self.b.zero_point) << self.LEFT_SHIFT
        total = self.ma.apply_unchecked(xa) + self.mb.apply_unchecked(xb)  # each <= 2^28: no overflow
        out = self.mo.apply_unchecked(total) + self.out.zero_point
        return out.clamp(self.lo, self.hi).to(self.out.dtype)

    def simulate(self, a, b):
        return self.out.fake_quantize(a.double() + b.double(), self.lo, self.hi).float()


class IntAvgPool(IntOp):
    """Average pooling: an int32 sum of centred codes times ``1/n`` in fixed point.

    The output keeps the input's scale and zero-point (an average never leaves the input's
    range), as in TensorFlow Lite and PyTorch.
    """

    def __init__(self, name, inputs, module, inp: ActSpec):
        self.name, self.inputs, self.inp, self.out = name, inputs, inp, inp
        self.module = module
        self.adaptive = isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d))
        if self.adaptive:
            size = module.output_size
            if any(s != 1 for s in ((size,) if isinstance(size, int) else size)):
                raise ValueError(f"layer {name!r}: only adaptive average pooling to size 1 is supported")
        else:
            if not _all_equal(module.padding, 0) or getattr(module, "ceil_mode", False):
                raise ValueError(f"layer {name!r}: average pooling with padding or ceil_mode is not supported")
            if getattr(module, "divisor_override", None):
                raise ValueError(f"layer {name!r}: divisor_override is not supported")
        self._multipliers = {}

    def _window(self, x):
        if self.adaptive:
            return int(np.prod(x.shape[2:]))
        k = self.module.kernel_size
        return int(np.prod((k,) * (x.ndim - 2) if isinstance(k, int) else k))

    def _sum(self, centred):
        dims = centred.ndim - 2
        if self.adaptive:
            return centred.sum(dim=tuple(range(2, 2 + dims)), keepdim=True)
        return _pool_windows(centred, self.module).sum(dim=tuple(range(-dims, 0)))

    def forward(self, x, backend="float32"):
        n = self._window(x)
        if n not in self._multipliers:
            self._multipliers[n] = FixedPointMultiplier.from_reals(1.0 / n)
        total = self._sum(x.to(torch.int64) - self.inp.zero_point)
        out = self._multipliers[n].apply_unchecked(total) + self.out.zero_point
        return out.clamp(self.out.qmin, self.out.qmax).to(self.out.dtype)

    def simulate(self, x):
        return self.out.fake_quantize(self.module(x.double())).float()


class IntMaxPool(IntOp):
    """Max pooling commutes with the monotonic affine map: pool the codes directly."""

    def __init__(self, name, inputs, module, spec: ActSpec):
        self.name, self.inputs, self.module, self.out = name, inputs, module, spec
        if not _all_equal(module.padding, 0) or not _all_equal(module.dilation, 1) or module.ceil_mode:
            raise ValueError(f"layer {name!r}: max pooling with padding, dilation or ceil_mode is not supported")

    def forward(self, x, backend="float32"):
        # torch's pooling kernels take no integer tensors: take the maximum over unfolded windows
        return _pool_windows(x, self.module).amax(dim=tuple(range(-(x.ndim - 2), 0))).to(self.out.dtype)

    def simulate(self, x):
        return self.module(x)


def _all_equal(value, expected) -> bool:
    """Whether an int-or-tuple pooling argument is ``expected`` in every dimension."""
    return all(v == expected for v in (value if isinstance(value, (tuple, list)) else (value,)))


def _pool_windows(x, module):
    """The pooling windows of ``x`` as trailing dimensions: ``(N, C, *out, *kernel)``."""
    dims = x.ndim - 2
    k, s = module.kernel_size, module.stride
    k = (k,) * dims if isinstance(k, int) else k
    s = (s,) * dims if isinstance(s, int) else s
    for d in range(dims):
        x = x.unfold(2 + d, k[d], s[d])
    return x


class IntClamp(IntOp):
    """A ReLU or ReLU6 that could not be fused: a clamp of the codes (same scale in and out)."""

    def __init__(self, name, inputs, spec: ActSpec, activation):
        self.name, self.inputs, self.out = name, inputs, spec
        self.lo, self.hi = _clamp_bounds(spec, activation)

    def forward(self, x, backend="float32"):
        return x.clamp(self.lo, self.hi)

    def simulate(self, x):
        return self.out.fake_quantize(x, self.lo, self.hi)


class IntRequantize(IntOp):
    """Move codes from one grid to another: ``Z_out + M (q - Z_in)`` with ``M = S_in / S_out``.

    Needed where a trained quantizer expects its input on a grid other than the one the
    producing operation writes (e.g. after pooling, before a quantized classifier).
    """

    def __init__(self, name, inputs, inp: ActSpec, out: ActSpec):
        self.name, self.inputs, self.inp, self.out = name, inputs, inp, out
        self.requant = FixedPointMultiplier.from_reals(inp.scale / out.scale)

    def forward(self, x, backend="float32"):
        scaled = self.requant.apply_unchecked(x.to(torch.int64) - self.inp.zero_point)
        return (scaled + self.out.zero_point).clamp(self.out.qmin, self.out.qmax).to(self.out.dtype)

    def simulate(self, x):
        return self.out.fake_quantize(x.double()).float()


class IntFlatten(IntOp):
    def __init__(self, name, inputs, spec: ActSpec, start_dim=1):
        self.name, self.inputs, self.out, self.start_dim = name, inputs, spec, start_dim

    def forward(self, x, backend="float32"):
        return torch.flatten(x, self.start_dim)

    def simulate(self, x):
        return torch.flatten(x, self.start_dim)


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

    @torch.no_grad()
    def layer_errors(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, the absolute difference between its codes and the exact codes, for the same input codes.

        No compounding: every operation gets the engine's own input codes. "Exact" is the same
        operation with real multipliers (:meth:`simulate` for one step); the
        difference is the fixed-point rounding alone, at most one unit for a layer.
        """
        specs = {self.input_name: self.input_spec, **{op.name: op.out for op in self.ops}}
        env, errors = {self.input_name: q}, {}
        for op in self.ops:
            args = [env[i] for i in op.inputs]
            ours = op.forward(*args)
            exact = op.out.quantize(op.simulate(*[specs[i].dequantize(a) for a, i in zip(args, op.inputs)]))
            errors[op.name] = (ours.to(torch.int32) - exact.to(torch.int32)).abs()
            env[op.name] = ours
        return errors

    def layers(self) -> list[IntLayer]:
        return [op for op in self.ops if isinstance(op, IntLayer)]

    def weight_bytes(self) -> int:
        """Bytes of int8 weights and int32 biases."""
        return sum(op.weight.numel() + 4 * op.bias.numel() for op in self.layers())


# ---------------------------------------------------------------- conversion -----------------

def _activation_of(node, modules):
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return "relu"
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm, observers):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.observers and isinstance(out, torch.Tensor) and torch.is_floating_point(out):
            self.observers[n.name](out)
        return out


def convert(model: nn.Module, calibration, activation_dtype: str = "uint8", per_channel: bool = True,
            make_observer=MinMaxObserver, reduce_range: bool = False) -> IntegerNetwork:
    """Fold, trace, calibrate and convert ``model`` into an :class:`IntegerNetwork`.

    ``calibration`` is a list of input batches (float tensors, or ``(x, y)`` pairs). Every
    activation gets asymmetric 8-bit parameters from ``make_observer()`` (min-max by default).
    ``reduce_range=True`` uses 7-bit activation codes, as PyTorch's x86 backend does: its AVX2
    kernels add pairs of uint8 x int8 products in int16, which saturates for 8-bit activations
    (2 * 255 * 127 > 2^15 - 1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice(activation_dtype, "activation_dtype", ACTIVATION_DTYPES)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not batches:
        raise ValueError("calibration must hold at least one batch")
    from .qat import QuantConvBn

    folded, factors = fold_batchnorm(model, return_factors=True)
    for name, module in list(folded.named_modules()):
        if isinstance(module, QuantConvBn):  # batch norm folded during training: take its inference form
            parent_name, _, child = name.rpartition(".")
            setattr(folded.get_submodule(parent_name) if parent_name else folded, child, module.to_quantized_conv())
    gm = fx.GraphModule(folded, _Tracer().trace(folded))
    modules = dict(gm.named_modules())
    _check_supported(list(gm.graph.nodes), modules)
    exported = {}  # QAT layers: integer weight codes and scales, batch norm folded in
    for target, module in modules.items():
        if not hasattr(module, "weight_quantizer"):
            continue
        codes, scale = _exported_weights(model, target, factors)
        if codes is not None:
            exported[target] = (codes, scale)
            # Calibrate the folded copy with exactly the weights the engine will use (its weight quantizer
            # learned the unfolded weights' grid and must not re-quantize the folded ones).
            with torch.no_grad():
                shape = (-1,) + (1,) * (codes.ndim - 1)
                module.weight.copy_(codes.to(module.weight.dtype) * torch.from_numpy(scale).reshape(shape))
            module.weight_quantizer.enabled = False
    for node in list(gm.graph.nodes):  # folded batch norms became Identity: drop them so ReLUs fuse
        if node.op == "call_module" and isinstance(modules[node.target], _PASS):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    nodes = list(gm.graph.nodes)

    observers = {n.name: make_observer() for n in nodes if n.op not in ("output", "get_attr")}
    for o in observers.values():
        if not isinstance(o, Observer):
            raise TypeError("make_observer must return a qlib.observers.Observer")
    recorder = _Recorder(gm, observers)
    with torch.no_grad():
        for x in batches:
            recorder.run(x)
    signed = activation_dtype == "int8"
    act_bits = 7 if check_bool(reduce_range, "reduce_range") else 8
    by_name = {n.name: n for n in nodes}
    wanted = _exported_input_grids(nodes, modules)  # tensor name -> {consumer name: spec} (QAT models)

    def spec(name):
        grids = wanted.get(name, {})
        if grids and len(set(grids.values())) == 1 and len(grids) == len(by_name[name].users):
            return next(iter(grids.values()))  # every consumer is a trained quantizer with this grid
        qp = observers[name].qparams(act_bits, "asymmetric", signed)
        return ActSpec(float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax, torch.int8 if signed else torch.uint8)

    def input_for(node, source):
        """The name of ``source``'s codes on the grid ``node`` expects, adding a requantization if needed."""
        target = wanted.get(node.args[0].name, {}).get(node.name)
        if target is None or target == specs[source]:
            return source
        op = IntRequantize(f"{node.name}_input", [source], specs[source], target)
        ops.append(op)
        specs[op.name] = target
        return op.name

    fused = {}  # relu node name -> the node whose op absorbed it
    alias = {}  # node name -> the name whose codes it shares
    ops, input_name, output_name = [], None, None

    def src(n):
        while n in alias:
            n = alias[n]
        return n

    specs = {}
    for node in nodes:
        if node.op == "placeholder":
            input_name = node.name
            specs[node.name] = spec(node.name)
            continue
        if node.op == "output":
            output_name = src(node.args[0].name)
            continue
        if node.name in fused:
            alias[node.name] = fused[node.name]
            continue
        ins = [src(a.name) for a in node.args if isinstance(a, fx.Node)]
        module = modules.get(node.target) if node.op == "call_module" else None
        users = list(node.users)
        follower = users[0] if len(users) == 1 else None
        activation = _activation_of(follower, modules) if follower is not None else None
        out_name = follower.name if activation else node.name
        if isinstance(module, (*_CONVS, nn.Linear)):
            ins = [input_for(node, ins[0])]
            codes, scale = exported.get(node.target, (None, None))
            op = IntLayer(node.name, ins, module, specs[ins[0]], spec(out_name), activation, per_channel, codes, scale)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            op = IntAdd(node.name, ins, specs[ins[0]], specs[ins[1]], spec(out_name), activation)
        elif _activation_of(node, modules):
            op = IntClamp(node.name, ins, specs[ins[0]], _activation_of(node, modules))
            activation = None
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            op, activation = IntMaxPool(node.name, ins, module, specs[ins[0]]), None
        elif isinstance(module, _POOLS):
            op, activation = IntAvgPool(node.name, ins, module, specs[ins[0]]), None
        elif isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = module.start_dim if module is not None else (node.args[1] if len(node.args) > 1 else 1)
            op, activation = IntFlatten(node.name, ins, specs[ins[0]], start), None
        else:  # _check_supported has already refused anything else
            raise AssertionError(node)
        if activation:
            fused[follower.name] = node.name
        specs[node.name] = op.out
        ops.append(op)
    return IntegerNetwork(ops, input_name, specs[input_name], output_name)


class _Tracer(fx.Tracer):
    """Treats qlib's quantized layers as single operations, like the torch.nn layers they replace."""

    def is_leaf_module(self, m, qualname):
        from .qat import _QuantMixin

        return isinstance(m, _QuantMixin) or super().is_leaf_module(m, qualname)


def _active_quantizer(module, attribute):
    q = getattr(module, attribute, None)
    return q if q is not None and q.enabled else None


def _exported_input_grids(nodes, modules) -> dict[str, dict[str, ActSpec]]:
    """For a QAT model: the grid each quantized layer's input quantizer expects, keyed by the input tensor."""
    grids = {}
    for node in nodes:
        q = _active_quantizer(modules.get(node.target), "input_quantizer") if node.op == "call_module" else None
        if q is not None:
            qp = q.qparams()
            grids.setdefault(node.args[0].name, {})[node.name] = ActSpec(
                float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax, torch.int8 if qp.signed else torch.uint8)
    return grids


def _exported_weights(model, target, factors):
    """Integer weight codes and per-channel scales from a trained weight quantizer, batch norm folded in.

    Folding multiplies channel c by f_c = gamma / sigma. On the trained grid that is exact:
    ``f (s round(W / s)) = (|f| s) (sign(f) round(W / s))``. Returns ``(None, None)`` for layers
    without an active weight quantizer (the engine then quantizes the folded float weights).
    """
    original = model.get_submodule(target)
    q = _active_quantizer(original, "weight_quantizer")
    if q is None:
        return None, None
    # a QuantConvBn quantized its folded weights during training; other layers their own weights
    weight = original.folded()[0].detach() if hasattr(original, "folded") else original.weight.detach()
    with torch.no_grad():
        q(weight)  # refresh a range computed from the current weights
    qp = q.qparams()
    codes = torch.as_tensor(quantize(weight, qp), dtype=torch.int64)
    scale = np.broadcast_to(qp.scale.astype(np.float64), (weight.shape[0],)).copy()
    if target in factors:
        f = factors[target].double()
        codes = codes * torch.sign(f).to(torch.int64).reshape(-1, *[1] * (codes.ndim - 1))
        scale = scale * f.abs().numpy()
    return codes, scale


def _check_supported(nodes, modules):
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (*_CONVS, nn.Linear, nn.ReLU, nn.ReLU6, *_POOLS, nn.Flatten, *_PASS)):
                continue
            raise ValueError(f"unsupported layer {node.target!r} of type {type(m).__name__}; the integer engine "
                             "supports Conv1d/Conv2d/Linear/ReLU/ReLU6/pooling/Flatten/add")
        if node.op == "call_function" and node.target in (operator.add, torch.add, torch.flatten, F.relu, torch.relu):
            continue
        if node.op == "call_method" and node.target == "flatten":
            continue
        target = getattr(node.target, "__name__", node.target)
        raise ValueError(f"unsupported operation {node.name!r} ({node.op} {target}); the integer engine supports "
                         "Conv1d/Conv2d/Linear/ReLU/ReLU6/pooling/Flatten/add")


# ---------------------------------------------------------------- PyTorch's quantized engine -----

def _pytorch_module(op: IntLayer):
    """A prepacked ``torch.ao.nn.quantized`` module holding the layer's int8 weights and int32 bias."""
    import torch.ao.nn.quantized as nnq

    if op.out.dtype != torch.uint8 or op.inp.dtype != torch.uint8:
        raise ValueError("the PyTorch comparison supports uint8 activations (PyTorch's quint8)")
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
