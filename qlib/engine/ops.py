"""The integer operations of the engine: each maps input codes to output codes with integers only.

Every operation is an :class:`IntOp`: ``forward`` on codes (the integer path), and ``simulate``,
the same step in exact real arithmetic on the same grids (what fake quantization computes), so
that the fixed-point rounding can be measured one operation at a time.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..fixedpoint import INT32_MAX, FixedPointMultiplier
from ..gemm import FLOAT32_EXACT, im2col, quantized_matmul, unfold_windows
from ..shiftadd import ShiftAddWeights
from . import fused

__all__ = ["ActSpec", "clamp_bounds", "IntOp", "IntLayer", "IntShiftAdd", "IntAdd", "IntAvgPool", "IntMaxPool",
           "IntClamp", "IntRequantize", "IntFlatten", "average_codes"]

#: The widest weight code a layer may hold: an int8 container.
WEIGHT_CODE_RANGE = (-128, 127)


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


def clamp_bounds(spec: ActSpec, activation: str | None) -> tuple[int, int]:
    """The output code range, narrowed by a fused ReLU (at ``Z``) or ReLU6 (also at ``Z + round(6 / S)``).

    ``round`` takes halves away from zero, as TensorFlow Lite's activation range does.
    """
    lo, hi = spec.qmin, spec.qmax
    if activation in ("relu", "relu6"):
        lo = max(lo, spec.zero_point)
    if activation == "relu6":
        hi = min(hi, spec.zero_point + math.floor(6.0 / spec.scale + 0.5))
    return lo, hi


class IntOp(abc.ABC):
    """One integer operation of an :class:`~qlib.engine.IntegerNetwork`.

    ``name`` (its node in the traced graph), ``inputs`` (the names of the tensors it reads) and
    ``out`` (the :class:`ActSpec` of its output codes).
    """

    name: str
    inputs: list[str]
    out: ActSpec

    @abc.abstractmethod
    def forward(self, *codes: torch.Tensor, backend: str = "float32") -> torch.Tensor:
        """Input codes -> output codes, integers only."""

    @abc.abstractmethod
    def simulate(self, *values: torch.Tensor) -> torch.Tensor:
        """The same operation in exact real arithmetic on the same grids (the fake-quant reference)."""


class _Requantizing(IntOp):
    """An int32 accumulator at scale ``S_in * S_w`` plus an int32 bias, requantized per output channel."""

    def _set_bias_and_multipliers(self, name, bias, in_spec: ActSpec, w_scale: np.ndarray, out_spec: ActSpec,
                                  worst_sum: int, fine_bias: bool, shape):
        """Bias codes, fixed-point multipliers ``S_in S_w / S_out`` and the fused clamp.

        The bias lives in the accumulator at scale ``S_in S_w / 2^k``. The paper's scheme is
        ``k = 0``; for weights exported by a trained low-bit quantizer ``S_in S_w`` is coarse (a 2-bit
        layer's step can be half a typical bias), so those layers (``fine_bias``) keep the bias 2^k
        times finer and shift the accumulator left by ``k`` bits, with ``k`` as large as the int32
        worst case allows (at most 16).
        """
        channels = len(w_scale)
        bias = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
        if worst_sum > INT32_MAX:
            raise ValueError(f"layer {name!r}: the worst-case accumulator ({worst_sum}) does not fit int32")
        self.bias_shift = 0
        if fine_bias:
            worst = worst_sum + float((bias.abs() / torch.from_numpy(in_spec.scale * w_scale)).max()) + 1
            while self.bias_shift < 16 and worst * 2 ** (self.bias_shift + 1) < INT32_MAX:
                self.bias_shift += 1
        bias_scale = in_spec.scale * w_scale / 2**self.bias_shift
        bias_codes = torch.round(bias / torch.from_numpy(bias_scale))
        if bias_codes.abs().max() >= 2**31:
            raise ValueError(f"layer {name!r}: the bias does not fit int32 at scale S_in * S_w (a weight scale is "
                             f"tiny: {w_scale.min():.3g}); retrain or re-initialise that quantizer")
        self.bias = bias_codes.to(torch.int32)
        self.w_scale, self.bias_scale = torch.from_numpy(w_scale.copy()), torch.from_numpy(bias_scale)
        # A multiplier below 2^-32 sends every int32 accumulator to 0 (|acc| M < 1/2); so does 2^-32 itself,
        # which quantize_multiplier accepts: flooring there is exact.
        self.requant = FixedPointMultiplier.from_reals(np.maximum(bias_scale / out_spec.scale, 2.0**-32), shape)

    def _requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """``clamp(Z_out + M (2^k acc + bias))`` as output codes."""
        shape = [1, -1] + [1] * (acc.ndim - 2)
        acc = acc.to(torch.int64)
        if self.bias_shift:  # the bound checked at construction keeps this in the int32 range
            acc = acc << self.bias_shift
        scaled = self.requant.apply_unchecked(acc + self.bias.reshape(shape))
        return (scaled + self.out.zero_point).clamp(self.lo, self.hi).to(self.out.dtype)

    def _requantize_fast(self, acc: torch.Tensor) -> torch.Tensor:
        """:meth:`_requantize` in one compiled pass (:mod:`qlib.engine.fused`); the same codes."""
        if getattr(self, "_fused", None) is None:
            self._fused = fused.FusedRequantizer(self.requant, self.bias, self.bias_shift, self.out.zero_point,
                                                 self.lo, self.hi, self.out.dtype)
        return self._fused(acc)


class IntLayer(_Requantizing):
    """Conv1d/Conv2d/Linear with int8 weight codes (and weight zero-points), an int32 bias, fixed-point
    requantization and a fused clamp.

    ``weight_codes``, ``weight_zero_points`` and ``weight_scales`` (one per output channel) describe
    the weights ``S_w (q_w - Z_w)``; the accumulator is the exact ``sum (q_x - Z_x)(q_w - Z_w)``
    (Jacob et al.'s eq. 7, folded as eq. 8 for the linear layers). ``conv`` holds
    ``(stride, padding, dilation, groups)`` of a convolution, ``None`` for a linear layer.
    """

    #: The bit width of the weight grid (set by :func:`qlib.engine.convert`; the codes sit in int8).
    weight_bits: int = 8

    def __init__(self, name, inputs, weight_codes: torch.Tensor, weight_zero_points, weight_scales, bias,
                 in_spec: ActSpec, out_spec: ActSpec, activation: str | None, conv=None, fine_bias: bool = False):
        self.name, self.inputs, self.inp, self.out, self.activation = name, list(inputs), in_spec, out_spec, activation
        codes = torch.as_tensor(weight_codes).to(torch.int64)
        lo, hi = WEIGHT_CODE_RANGE
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(f"layer {name!r}: weight codes must fit int8 [{lo}, {hi}], got "
                             f"[{int(codes.min())}, {int(codes.max())}] (more than 8 weight bits?)")
        channels = codes.shape[0]
        zero_points = np.broadcast_to(np.asarray(weight_zero_points, dtype=np.int64), (channels,)).copy()
        if (zero_points < lo).any() or (zero_points > hi).any():
            raise ValueError(f"layer {name!r}: weight zero-points must lie in [{lo}, {hi}]")
        self.kind = "linear" if conv is None else f"conv{codes.ndim - 2}d"
        self.weight = codes.to(torch.int8)
        self.weight_zero_point = torch.from_numpy(zero_points)
        zw = self.weight_zero_point.reshape(-1, *[1] * (codes.ndim - 1))
        self.centred_weight = (codes - zw).to(torch.int16)  # |q_w - Z_w| <= 255
        if conv is not None:
            self.stride, self.padding, self.dilation, self.groups = conv
        widest = int(self.centred_weight.abs().max()) if codes.numel() else 0
        self.lo, self.hi = clamp_bounds(out_spec, activation)
        worst = int(np.prod(codes.shape[1:])) * max(abs(in_spec.qmin - in_spec.zero_point),
                                                    abs(in_spec.qmax - in_spec.zero_point)) * widest
        shape = (-1,) if conv is None else (1, -1) + (1,) * (codes.ndim - 2)
        w_scale = np.broadcast_to(np.asarray(weight_scales, dtype=np.float64), (channels,)).copy()
        self._set_bias_and_multipliers(name, bias, in_spec, w_scale, out_spec, worst, fine_bias, shape)
        self._widest = max(widest, 1)
        self.weight_f32 = self.centred_weight.to(torch.float32)

    @property
    def symmetric(self) -> bool:
        """Whether every weight zero-point is 0 (what PyTorch's and XNNPACK's int8 kernels take)."""
        return bool((self.weight_zero_point == 0).all())

    # -- the integer path ------------------------------------------------------------
    def accumulate(self, x: torch.Tensor, backend: str = "float32") -> torch.Tensor:
        """The exact accumulator ``sum (x - Z_x)(w - Z_w)``, shaped like the output (int32)."""
        if self.kind == "linear":
            return quantized_matmul(x, self.inp.zero_point, self.weight.t(), self.weight_zero_point, None,
                                    "float32" if backend == "float32" else "int_mm")
        return self._conv_float32(x) if backend == "float32" else self._conv_int(x)

    def _conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _conv_float32(self, x):
        # Centre the codes, then let the float conv kernel sum products of integers. Every partial sum
        # is an integer below 2^24 in magnitude (checked), so float32 holds it exactly.
        centred = (x.to(torch.int16) - self.inp.zero_point).to(torch.float32)
        per_input = int(np.prod(self.weight.shape[2:])) * 255 * self._widest
        cin_per_group = self.weight.shape[1]
        chunk = max(1, (FLOAT32_EXACT - 1) // per_input)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        if cin_per_group <= chunk:
            return conv(centred, self.weight_f32, **self._conv_kwargs()).to(torch.int32)
        if self.groups != 1:
            return self._conv_int(x)
        total = None
        for start in range(0, cin_per_group, chunk):
            part = conv(centred[:, start:start + chunk], self.weight_f32[:, start:start + chunk],
                        **self._conv_kwargs()).to(torch.int32)
            total = part if total is None else total + part
        return total

    def _conv_int(self, x):
        # Integer im2col (padding with the zero-point code: the real value 0), then the zero-point-folded
        # integer GEMM of chapter 3 per group.
        kernel = tuple(self.weight.shape[2:])
        columns, spatial = im2col(x, kernel, self.stride, self.padding, self.dilation, self.groups,
                                  self.inp.zero_point)
        n, out_per_group = x.shape[0], self.weight.shape[0] // self.groups
        outs = []
        for g in range(self.groups):
            rows = slice(g * out_per_group, (g + 1) * out_per_group)
            patches = columns[:, g].transpose(1, 2).reshape(-1, columns.shape[2]).contiguous()
            w = self.weight[rows].reshape(out_per_group, -1)
            outs.append(quantized_matmul(patches, self.inp.zero_point, w.t().contiguous(),
                                         self.weight_zero_point[rows], None, "int_mm"))
        acc = torch.cat(outs, dim=1).reshape(n, -1, self.weight.shape[0])   # (N, L, C_out)
        return acc.transpose(1, 2).reshape(n, -1, *spatial).contiguous()

    # -- the fast route ---------------------------------------------------------------
    @property
    def fast_route(self) -> str:
        """How ``backend="fast"`` sums this layer: ``"int8 GEMM"`` (``torch._int_mm`` on the codes,
        for symmetric weights in linear, 1-d and 1x1 layers without groups) or ``"float32 kernels"``."""
        return "int8 GEMM" if self._int8_plan() is not None else "float32 kernels"

    def _fast_forward(self, x):
        plan = self._int8_plan()
        if plan is not None:
            weight, requantize = plan
            return requantize(self._int8_accumulator(x, weight))
        return self._requantize_fast(self._fast_accumulator(x))

    def _int8_plan(self):
        """For a layer with symmetric weights and no groups: the ``(K, C_out)`` int8 weight matrix for
        ``torch._int_mm`` and an epilogue with the input zero-point folded into the bias; else ``None``.

        The GEMM takes int8 on both sides, so uint8 codes are moved down by 128 (a flip of the top
        bit): ``q - Z_x = (q - 128) + (128 - Z_x)``, and the constant part of every output is
        ``(128 - Z_x) * sum(w)``, added to the bias once (at the accumulator's scale ``2^k``).
        """
        if getattr(self, "_plan", False) is not False:
            return self._plan
        self._plan = None
        k = int(np.prod(self.weight.shape[1:]))
        simple = self.kind == "linear" or (self.groups == 1 and _all_equal(self.dilation, 1))
        # A 2-d window larger than 1x1 is left to the float32 kernels, which need no copied windows
        # (measured on MnistCNN's stem: the copy cost more than the int8 GEMM saved)
        windows_2d = self.kind == "conv2d" and any(n != 1 for n in self.weight.shape[2:])
        if not (self.symmetric and simple and not windows_2d and k * 128 * 128 <= INT32_MAX):
            return None
        offset = 128 - self.inp.zero_point if self.inp.dtype == torch.uint8 else -self.inp.zero_point
        column_sums = self.centred_weight.to(torch.int64).reshape(len(self.bias), -1).sum(1)
        bias = self.bias.to(torch.int64) + ((offset * column_sums) << self.bias_shift)
        weight = self.centred_weight.to(torch.int8).reshape(len(self.bias), -1).t().contiguous()
        requantize = fused.FusedRequantizer(self.requant, bias, self.bias_shift, self.out.zero_point, self.lo,
                                            self.hi, self.out.dtype)
        self._plan = (weight, requantize)
        return self._plan

    def _int8_accumulator(self, x, weight):
        """``sum (q_x - 128) w`` (uint8 codes; ``sum q_x w`` for int8) by ``torch._int_mm``, channels-last.

        The codes go channels-last, padded with the zero-point code, and are unfolded into one row
        per output position (no copy for a 1x1 convolution): the GEMM's ``(rows, C_out)`` int32
        result is the channels-last memory of the ``(N, C_out, *spatial)`` accumulator.
        """
        codes = x.movedim(1, -1)
        codes = (codes if codes.is_contiguous() else codes.contiguous()).view(torch.int8)
        if self.inp.dtype == torch.uint8:
            codes = codes ^ -128
        if self.kind == "linear":
            return torch._int_mm(codes, weight)
        kernel, dims = self.weight.shape[2:], x.ndim - 2
        per_dim = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims  # noqa: E731
        padding, stride = per_dim(self.padding), per_dim(self.stride)
        if any(padding):
            pad_code = self.inp.zero_point - (128 if self.inp.dtype == torch.uint8 else 0)
            codes = F.pad(codes, [0, 0] + [p for p in reversed(padding) for _ in range(2)], value=pad_code)
        for d in range(dims):
            codes = codes.unfold(1 + d, kernel[d], stride[d])
        spatial = codes.shape[1:1 + dims]
        sums = torch._int_mm(codes.reshape(-1, weight.shape[0]), weight)
        return sums.view(x.shape[0], *spatial, -1).movedim(-1, 1)

    def _fast_accumulator(self, x):
        # The float32 route without its two extra passes: the centring is one compiled loop and
        # the float32 sums go to the epilogue as they are (exact integers; the epilogue converts).
        per_input = 255 * self._widest * (1 if self.kind == "linear" else int(np.prod(self.weight.shape[2:])))
        if self.weight.shape[1] > (FLOAT32_EXACT - 1) // per_input:
            return self.accumulate(x, "float32")   # split along the inputs: int32 partial sums
        centred = fused.centre(x, self.inp.zero_point)
        if self.kind == "linear":
            return centred @ self.weight_f32.t()
        if self.kind == "conv1d":
            return F.conv1d(centred, self.weight_f32, **self._conv_kwargs())
        # channels-last in and out: the layout of the fused epilogue's codes
        if getattr(self, "_weight_channels_last", None) is None:
            self._weight_channels_last = _channels_last(self.weight_f32)
        return F.conv2d(_channels_last(centred), self._weight_channels_last, **self._conv_kwargs())

    def forward(self, x, backend="float32"):
        if backend == "fast":
            return self._fast_forward(x)
        return self._requantize(self.accumulate(x, backend))

    # -- the same layer in exact real arithmetic (the fake-quant reference) ------------------
    def real_weight(self) -> torch.Tensor:
        """``S_w (q_w - Z_w)`` in float64."""
        return self.centred_weight.double() * self.w_scale.reshape(-1, *[1] * (self.weight.ndim - 1))

    def simulate(self, x):
        w, bias, x = self.real_weight(), self.bias.double() * self.bias_scale, x.double()
        if self.kind == "linear":
            y = F.linear(x, w, bias)
        else:
            conv = F.conv1d if self.kind == "conv1d" else F.conv2d
            y = conv(x, w, bias, **self._conv_kwargs())
        return self.out.fake_quantize(y, self.lo, self.hi).float()


class IntShiftAdd(_Requantizing):
    """A conv/linear layer with power-of-two (PoT/APoT) weight codes, multiplied by shifts and additions.

    With integer input codes ``x`` and weight codes whose magnitudes are sums of powers of two,
    ``sum (x - Z_x) q_w = sum_e S_e @ ((x - Z_x) << e)``, ``S_e`` the signs (-1, 0, 1) of the term
    ``2^e`` of each weight (chapter 8, :class:`qlib.shiftadd.ShiftAddWeights`): shifts, additions and
    subtractions, no multiplier. The int64 accumulator (bounded to fit int32) is then requantized
    like any layer. ``weight_scales``: one scale, or one per output channel (a folded batch norm);
    the weight zero-point is 0.
    """

    #: The bit width of the weight grid (set by :func:`qlib.engine.convert`).
    weight_bits: int = 8

    def __init__(self, name, inputs, weight_codes: torch.Tensor, weight_scales, bias, in_spec: ActSpec,
                 out_spec: ActSpec, activation: str | None, conv=None):
        self.name, self.inputs, self.inp, self.out, self.activation = name, list(inputs), in_spec, out_spec, activation
        codes = torch.as_tensor(weight_codes).to(torch.int64).cpu()
        self.kind = "linear" if conv is None else f"conv{codes.ndim - 2}d"
        self.conv = conv
        params = {} if conv is None else dict(zip(("stride", "padding", "dilation", "groups"), conv))
        self.weights = ShiftAddWeights(self.kind, codes, **params)
        self.weight_codes = self.weights.codes
        self.lo, self.hi = clamp_bounds(out_spec, activation)
        span = max(abs(in_spec.qmin - in_spec.zero_point), abs(in_spec.qmax - in_spec.zero_point))
        out_channels = codes.shape[0]
        shape = (-1,) if conv is None else (1, -1) + (1,) * (codes.ndim - 2)
        scales = np.broadcast_to(np.asarray(weight_scales, dtype=np.float64), (out_channels,)).copy()
        self._set_bias_and_multipliers(name, bias, in_spec, scales, out_spec, span * self.weights.row_l1, True,
                                       shape)

    def forward(self, x, backend="float32"):
        acc = self.weights.accumulate(x.to(torch.int64) - self.inp.zero_point)
        return self._requantize_fast(acc) if backend == "fast" else self._requantize(acc)

    def simulate(self, x):
        w = self.weight_codes.double() * self.w_scale.reshape(-1, *[1] * (self.weight_codes.ndim - 1))
        bias, x = self.bias.double() * self.bias_scale, x.double()
        if self.kind == "linear":
            y = F.linear(x, w, bias)
        else:
            conv = F.conv1d if self.kind == "conv1d" else F.conv2d
            y = conv(x, w, bias, *self.conv)
        return self.out.fake_quantize(y, self.lo, self.hi).float()


class IntAdd(IntOp):
    """Residual add of two coded tensors with different scales (TensorFlow Lite's scheme).

    Both inputs are centred, shifted left by 20 bits for headroom, rescaled to a common scale
    ``2 max(S_a, S_b)`` by fixed-point multipliers, added, and requantized to the output.
    """

    LEFT_SHIFT = 20

    def __init__(self, name, inputs, a: ActSpec, b: ActSpec, out: ActSpec, activation):
        self.name, self.inputs, self.a, self.b, self.out = name, list(inputs), a, b, out
        twice_max = 2 * max(a.scale, b.scale)
        self.ma = FixedPointMultiplier.from_reals(a.scale / twice_max)
        self.mb = FixedPointMultiplier.from_reals(b.scale / twice_max)
        self.mo = FixedPointMultiplier.from_reals(twice_max / ((1 << self.LEFT_SHIFT) * out.scale))
        self.lo, self.hi = clamp_bounds(out, activation)

    def forward(self, qa, qb, backend="float32"):
        if backend == "fast":
            return fused.add(qa, qb, self.a.zero_point, self.b.zero_point, self.LEFT_SHIFT, self.ma, self.mb, self.mo,
                             self.out.zero_point, self.lo, self.hi, self.out.dtype)
        xa = (qa.to(torch.int64) - self.a.zero_point) << self.LEFT_SHIFT  # |x| < 2^29: int32 range
        xb = (qb.to(torch.int64) - self.b.zero_point) << self.LEFT_SHIFT
        total = self.ma.apply_unchecked(xa) + self.mb.apply_unchecked(xb)  # each <= 2^28: no overflow
        out = self.mo.apply_unchecked(total) + self.out.zero_point
        return out.clamp(self.lo, self.hi).to(self.out.dtype)

    def simulate(self, a, b):
        return self.out.fake_quantize(a.double() + b.double(), self.lo, self.hi).float()


def average_codes(total: torch.Tensor, n: int) -> torch.Tensor:
    """``total / n`` rounded once to the nearest integer, halves away from zero (int64).

    Integer division with half the divisor added and the sign restored, as TensorFlow Lite's
    reference average pooling does: exact for every window size.
    """
    magnitude = (total.abs() + n // 2) // n
    return torch.where(total < 0, -magnitude, magnitude)


class IntAvgPool(IntOp):
    """Average pooling: the int64 sum of centred codes over each window, divided by its size with one
    rounding (:func:`average_codes`).

    The output keeps the input's scale and zero-point (an average never leaves the input's range),
    as in TensorFlow Lite and PyTorch.
    """

    def __init__(self, name, inputs, module, inp: ActSpec):
        from torch import nn

        self.name, self.inputs, self.inp, self.out = name, list(inputs), inp, inp
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

    def forward(self, x, backend="float32"):
        centred = x.to(torch.int64) - self.inp.zero_point
        dims = tuple(range(2, x.ndim)) if self.adaptive else tuple(range(-(x.ndim - 2), 0))
        windows = centred if self.adaptive else unfold_windows(centred, self.module.kernel_size,
                                                               self.module.stride)
        n = math.prod(windows.shape[d] for d in dims)
        mean = average_codes(windows.sum(dim=dims, keepdim=self.adaptive), n)
        return (mean + self.out.zero_point).clamp(self.out.qmin, self.out.qmax).to(self.out.dtype)

    def simulate(self, x):
        return self.out.fake_quantize(self.module(x.double())).float()


class IntMaxPool(IntOp):
    """Max pooling commutes with the increasing affine map: pool the codes directly."""

    def __init__(self, name, inputs, module, spec: ActSpec):
        self.name, self.inputs, self.module, self.out = name, list(inputs), module, spec
        if not _all_equal(module.padding, 0) or not _all_equal(module.dilation, 1) or module.ceil_mode:
            raise ValueError(f"layer {name!r}: max pooling with padding, dilation or ceil_mode is not supported")

    def forward(self, x, backend="float32"):
        # torch's pooling kernels take no integer tensors: take the maximum over unfolded windows
        windows = unfold_windows(x, self.module.kernel_size, self.module.stride)
        return windows.amax(dim=tuple(range(-(x.ndim - 2), 0))).to(self.out.dtype)

    def simulate(self, x):
        return self.module(x)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d tensor in channels-last memory. With one channel both layouts are the same memory,
    and PyTorch keeps the ``(N, C, H, W)`` strides, so its convolution would answer in that layout:
    the view with channels-last strides says which one is meant."""
    if t.shape[1] == 1 and t.is_contiguous():
        n, _, h, w = t.shape
        return t.as_strided(t.shape, (h * w, 1, w, 1))
    return t.contiguous(memory_format=torch.channels_last)


def _all_equal(value, expected) -> bool:
    """Whether an int-or-tuple pooling argument is ``expected`` in every dimension."""
    return all(v == expected for v in (value if isinstance(value, (tuple, list)) else (value,)))


class IntClamp(IntOp):
    """A ReLU or ReLU6 that could not be fused: a clamp of the codes (same scale in and out)."""

    def __init__(self, name, inputs, spec: ActSpec, activation):
        self.name, self.inputs, self.out = name, list(inputs), spec
        self.lo, self.hi = clamp_bounds(spec, activation)

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
        self.name, self.inputs, self.inp, self.out = name, list(inputs), inp, out
        self.requant = FixedPointMultiplier.from_reals(inp.scale / out.scale)

    def forward(self, x, backend="float32"):
        if backend == "fast":
            if getattr(self, "_fused", None) is None:
                self._fused = fused.FusedRequantizer(self.requant, [-self.inp.zero_point], 0, self.out.zero_point,
                                                     self.out.qmin, self.out.qmax, self.out.dtype)
            return self._fused(x)
        scaled = self.requant.apply_unchecked(x.to(torch.int64) - self.inp.zero_point)
        return (scaled + self.out.zero_point).clamp(self.out.qmin, self.out.qmax).to(self.out.dtype)

    def simulate(self, x):
        return self.out.fake_quantize(x.double()).float()


class IntFlatten(IntOp):
    """``torch.flatten`` of the codes (no arithmetic)."""

    def __init__(self, name, inputs, spec: ActSpec, start_dim=1):
        self.name, self.inputs, self.out, self.start_dim = name, list(inputs), spec, start_dim

    def forward(self, x, backend="float32"):
        return torch.flatten(x, self.start_dim)

    def simulate(self, x):
        return torch.flatten(x, self.start_dim)
