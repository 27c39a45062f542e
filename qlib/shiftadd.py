"""Integer inference of (A)PoT weights by shifts and additions, chapter 8.

An :class:`~qlib.quantizers.APoT` weight quantizer with ``grid="apot"`` or ``"pot"`` outputs
``w = s_w * c_w``: a float scale times an integer code whose magnitude is a sum of at most ``n``
powers of two (``n = 2`` for APoT, ``1`` for PoT, see :func:`qlib.quantizers.grid_codes`). With an
input quantized to integer codes ``a = s_a * c_a``, a product is ``n`` shifts and ``n - 1``
additions::

    w * a = s_w s_a * c_w * c_a = s_w s_a * sum_e (+-1) (c_a << e)        (e: the set bits of |c_w|)

and a whole layer is ``y = s_w s_a * sum_e S_e @ (patches << e) + bias``, with ``S_e`` the matrix
of signs in ``{-1, 0, 1}`` of the term ``2^e`` of each weight and ``patches`` the unfolded input
codes (im2col). A product with a sign matrix needs no multiplier: it adds, subtracts or skips.

:class:`ShiftAddWeights` holds those sign matrices and accumulates by shifts and additions. Two
things use it: :class:`ShiftAddLayer` runs one trained ``QuantConv1d``, ``QuantConv2d`` or
``QuantLinear`` this way (float in, float out, every integer in int64, next to
:meth:`ShiftAddLayer.multiply_accumulate`, the same accumulator from ordinary integer products), and
the integer engine's :class:`qlib.engine.IntShiftAdd` runs such layers inside a converted network,
code to code.

Where it can differ from the fake-quant float layer:

* The integer accumulator is exact (int64; a bound is checked before it could overflow), and it
  equals the integer-product accumulator bit for bit.
* The input and weight codes are exact as well: they are the levels the fake-quant forward
  picks, found by the same nearest-level search on the same level set (APoT quantizers), or read
  off a uniform quantizer's own output ``k * s`` as ``round(y / s)``.
* What is *not* exact is the fake-quant layer. Its quantized values are ``level * alpha`` (times
  the weights' ``std``) in the layer's dtype, with ``level = code / code_max`` stored as a float32
  buffer: 1/10, 1/48 or 1/(2^b - 1) are not dyadic, so even a layer cast to float64 carries levels
  rounded to float32 (relative error up to 2^-24) unless its level sets are rebuilt in float64.
  Its convolution then sums the products in float (float32: relative error of order
  ``K * 2^-24`` for ``K`` terms per output).
* The rescale ``acc * (s_w s_a) + bias`` here is done in float64 and rounded once to the input's
  dtype. The scale of a uniform input quantizer comes from its ``qparams()``, which stores it in
  float32: exact for LSQ (its step is a float32 parameter), rounded (relative error up to 2^-24)
  for a step computed in float64, such as PACT's ``alpha / (2^b - 1)`` in a float64 layer.

So in float32 the two outputs agree to float32 rounding of the fake-quant layer; with the layer in
float64 (its level sets rebuilt in float64, its input scale a float32 number) they agree to about
1e-12 relative.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .gemm import im2col
from .quantizers import Quantizer

__all__ = ["power_of_two_terms", "term_counts", "max_terms", "ShiftAddWeights", "ShiftAddLayer"]

_INT64_LIMIT = 2**63 - 1


def _as_int64_codes(codes, name: str = "codes") -> torch.Tensor:
    """An integer tensor as int64; refuses floats, bools and the one int64 value without a magnitude."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {codes.dtype}")
    codes = codes.to(torch.int64)
    if codes.numel() and int(codes.min()) == -_INT64_LIMIT - 1:
        raise ValueError(f"{name} holds -2^63, whose magnitude does not fit int64")
    return codes


def power_of_two_terms(codes: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Decompose integer codes into signed powers of two: ``codes == sum_e signs_e * 2^e``.

    Parameters
    ----------
    codes : torch.Tensor
        Integer codes of any sign and shape.

    Returns
    -------
    list
        Pairs ``(e, signs)``, one per exponent ``e`` that some code uses, ascending: ``signs`` is an
        int64 tensor of the codes' shape in ``{-1, 0, 1}``, the sign of the code where bit ``e`` of
        ``|code|`` is set and 0 elsewhere. Codes that are all zero give an empty list.
    """
    codes = _as_int64_codes(codes)
    if codes.numel() == 0:
        return []
    magnitude, sign = codes.abs(), codes.sign()
    terms = []
    for e in range(int(magnitude.max()).bit_length()):
        digit = torch.bitwise_right_shift(magnitude, e) & 1
        if bool(digit.any()):
            terms.append((e, digit * sign))
    return terms


def term_counts(codes: torch.Tensor) -> torch.Tensor:
    """The number of nonzero power-of-two terms (set bits of ``|code|``) of each code, int64."""
    counts = torch.zeros(_as_int64_codes(codes).shape, dtype=torch.int64)
    for _, signs in power_of_two_terms(codes):
        counts += signs.abs().to(counts.device)
    return counts.to(codes.device)


def max_terms(codes: torch.Tensor) -> int:
    """The largest number of nonzero power-of-two terms of any code (0 for no codes or all zeros).

    APoT codes (:func:`qlib.quantizers.grid_codes` for 3 and 4 magnitude bits) need 2, PoT codes 1.
    """
    counts = term_counts(codes)
    return int(counts.max()) if counts.numel() else 0


def _pair_padding(padding, kernel, dilation) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per spatial dimension, for explicit sizes, ``"valid"`` or ``"same"``."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":  # as PyTorch: the odd one out goes after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in padding]


class ShiftAddWeights:
    """Integer weight codes as sign matrices per power of two, multiplied by shifts and additions.

    ``kind`` is ``"linear"``, ``"conv1d"`` or ``"conv2d"``; a convolution also takes ``stride``,
    ``padding`` (sizes, or ``(before, after)`` pairs per dimension), ``dilation`` and ``groups``.
    :meth:`accumulate` takes integer input codes whose real value 0 is code 0 (centre them first).
    """

    KINDS = ("linear", "conv1d", "conv2d")

    def __init__(self, kind: str, codes: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.dims = kind, 0 if kind == "linear" else int(kind[4])
        codes = _as_int64_codes(codes, "weight_codes").detach().cpu()
        if codes.ndim != self.dims + 2:
            raise ValueError(f"weight_codes of a {kind} layer must have {self.dims + 2} dimensions, "
                             f"got shape {tuple(codes.shape)}")
        self.codes = codes
        out_channels = codes.shape[0]
        self.groups = int(groups) if self.dims else 1
        if out_channels % self.groups:
            raise ValueError(f"groups ({groups}) must divide the {out_channels} output channels")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # the sign matrix of each term, laid out for the product with the patches:
        # (groups, out / groups, in / groups * kernel) for a convolution, (out, in) for a linear layer
        self.terms = power_of_two_terms(codes)
        rows = (self.groups, out_channels // self.groups, -1) if self.dims else (out_channels, -1)
        self._signs = [(e, signs.reshape(rows)) for e, signs in self.terms]
        self.row_l1 = int(codes.reshape(out_channels, -1).abs().sum(1).max()) if codes.numel() else 0

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """``sum_e S_e @ (patches << e)`` in int64 for batched codes, shaped like the layer's output.

        Only shifts and additions: each input code is shifted by every exponent a weight uses, and
        the product with the sign matrix ``S_e`` (entries -1, 0, 1) adds, subtracts or skips it.
        """
        if self.dims == 0:
            acc = torch.zeros((*codes.shape[:-1], self.codes.shape[0]), dtype=torch.int64)
            for e, signs in self._signs:
                acc += torch.bitwise_left_shift(codes, e) @ signs.t()
            return acc
        columns, spatial = im2col(codes, tuple(self.codes.shape[2:]), self.stride, self.padding, self.dilation,
                                  self.groups)
        n, out_per_group = codes.shape[0], self.codes.shape[0] // self.groups
        acc = torch.zeros((n, self.groups, out_per_group, columns.shape[-1]), dtype=torch.int64)
        for e, signs in self._signs:
            acc += signs @ torch.bitwise_left_shift(columns, e)
        return acc.reshape(n, -1, *spatial)


def _layer_types():
    from .qat import QuantConv1d, QuantConv2d, QuantLinear

    return {QuantLinear: "linear", QuantConv1d: "conv1d", QuantConv2d: "conv2d"}


class ShiftAddLayer:
    """A quantized conv/linear layer run in integers, each weight product as shifts and additions.

    Build it with :meth:`from_module` from a ``QuantConv1d``, ``QuantConv2d`` or ``QuantLinear``
    (:mod:`qlib.qat`) whose weight quantizer exports power-of-two codes (an
    :class:`~qlib.quantizers.APoT` with ``grid="apot"`` or ``"pot"``). Calling it on a float input
    quantizes the input to codes (:meth:`quantize_input`), accumulates with shifts and additions
    (:meth:`accumulate`) and rescales: ``acc * (s_w s_a) + bias``. No autograd; the integer work
    runs on the CPU (PyTorch has no int64 matrix product on GPUs), and :meth:`forward` returns its
    output on the input's device.

    Parameters
    ----------
    kind : str
        ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
    weight_codes : torch.Tensor
        Integer weight codes, shaped like the layer's weight.
    weight_scale : float
        The real value of weight code 1.
    input_quantizer : qlib.quantizers.Quantizer
        A quantizer whose :meth:`~qlib.quantizers.Quantizer.export` gives per-tensor codes with
        zero-point 0 (an unsigned APoT of any grid, LSQ, PACT, ...); it is copied.
    bias : torch.Tensor, optional
        Float bias, one per output channel.
    stride, padding, dilation, groups
        As the convolution's (ignored for ``"linear"``); ``padding`` may be ``"valid"`` or ``"same"``.
    """

    KINDS = ShiftAddWeights.KINDS

    def __init__(self, kind: str, weight_codes: torch.Tensor, weight_scale: float, input_quantizer: Quantizer,
                 bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        dims = 0 if kind == "linear" else int(kind[4])
        codes = _as_int64_codes(weight_codes, "weight_codes")
        conv = {}
        if dims:
            if codes.ndim != dims + 2:
                raise ValueError(f"weight_codes of a {kind} layer must have {dims + 2} dimensions, "
                                 f"got shape {tuple(codes.shape)}")
            if isinstance(padding, str) and padding not in ("valid", "same"):
                raise ValueError(f"padding must be sizes, 'valid' or 'same', got {padding!r}")
            stride, dilation = self._per_dim(stride, "stride", dims), self._per_dim(dilation, "dilation", dims)
            padding = padding if isinstance(padding, str) else self._per_dim(padding, "padding", dims, 0)
            conv = dict(stride=stride, padding=_pair_padding(padding, codes.shape[2:], dilation), dilation=dilation,
                        groups=int(groups))
            self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weights = ShiftAddWeights(kind, codes, **conv)
        self.kind, self.dims, self.groups = kind, dims, self.weights.groups
        self.weight_codes, self.terms = self.weights.codes, self.weights.terms
        self.weight_scale = float(weight_scale)
        if not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise ValueError(f"weight_scale must be finite and > 0, got {weight_scale}")
        self._set_input_quantizer(input_quantizer)
        out_channels = codes.shape[0]
        if bias is not None:
            bias = bias.detach().cpu().double().reshape(-1)
            if bias.numel() != out_channels:
                raise ValueError(f"bias must have {out_channels} entries (one per output channel), got {bias.numel()}")
        self.bias = bias

    @staticmethod
    def _per_dim(value, name: str, dims: int, low: int = 1) -> tuple[int, ...]:
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
        if len(values) != dims or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"{name} must be an integer >= {low} or {dims} of them, got {value!r}")
        return values

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_module(cls, layer) -> ShiftAddLayer:
        """The shift-add form of a trained ``QuantConv1d``, ``QuantConv2d`` or ``QuantLinear``.

        The weight quantizer must export power-of-two codes (an :class:`~qlib.quantizers.APoT` with
        ``grid="apot"`` or ``"pot"``); the input quantizer must export per-tensor codes with zero-point 0.
        Both must be enabled and initialised (call the layer once on data). The layer's parameters
        are read now: later training does not change the returned object.
        """
        kind = _layer_types().get(type(layer))
        if kind is None:
            hint = " (convert a QuantConvBn with to_quantized_conv() first)" if hasattr(layer, "folded") else ""
            raise TypeError("layer must be a qlib.qat QuantConv1d, QuantConv2d or QuantLinear (see qlib.qat.prepare)"
                            f"{hint}, got {type(layer).__name__}")
        wq = layer.weight_quantizer
        if not wq.enabled:
            raise ValueError("the layer's weight quantizer is disabled: its float weights have no integer codes")
        export = wq.export(layer.weight.detach())
        if export.grid not in ("apot", "pot"):
            raise ValueError(f"ShiftAddLayer needs power-of-two weight codes (APoT with grid 'apot' or 'pot'), got "
                             f"{type(wq).__name__} with a {export.grid} grid; uniform weights run in qlib.engine")
        kwargs = {}
        if kind != "linear":
            if layer.padding_mode != "zeros":
                raise ValueError(f"ShiftAddLayer supports zero padding only, got padding_mode={layer.padding_mode!r}")
            kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return cls(kind, export.codes, float(export.scale), layer.input_quantizer, layer.bias, **kwargs)

    def _set_input_quantizer(self, q):
        if q is None or not isinstance(q, Quantizer):
            raise TypeError("ShiftAddLayer needs an input quantizer (a qlib.quantizers.Quantizer) to turn inputs "
                            f"into integer codes, got {type(q).__name__}")
        if not q.enabled:
            raise ValueError("the input quantizer is disabled: its float inputs have no integer codes")
        self.input_quantizer = copy.deepcopy(q).cpu().eval()
        if not bool(self.input_quantizer.initialized):
            raise ValueError(f"the input quantizer ({type(q).__name__}) has not been initialised: call the layer "
                             "on data first")

    # -- the integer path --------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(codes, scale)``: int64 input codes (on the CPU) with ``x ~ scale * codes``, the values
        the layer's input quantizer outputs (its :meth:`~qlib.quantizers.Quantizer.export`)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        export = self.input_quantizer.export(x.detach().cpu())
        if export.axis is not None or bool((export.zero_point != 0).any()):
            raise ValueError("the input quantizer must export per-tensor codes with zero-point 0, got "
                             f"axis={export.axis}, zero_point={export.zero_point.tolist()}")
        return export.codes, float(export.scale)

    def _check_input_codes(self, codes) -> tuple[torch.Tensor, bool]:
        """The codes as batched int64 on the CPU, and whether a batch dimension was added."""
        codes = _as_int64_codes(codes).cpu()
        in_features = self.weight_codes.shape[1] * self.groups
        if self.dims == 0:
            if codes.ndim == 0 or codes.shape[-1] != in_features:
                raise ValueError(f"codes must end with {in_features} input features, got shape {tuple(codes.shape)}")
            return codes, False
        if codes.ndim not in (self.dims + 1, self.dims + 2) or codes.shape[-self.dims - 1] != in_features:
            raise ValueError(f"codes must be (N, {in_features}, ...) or ({in_features}, ...) with {self.dims} spatial "
                             f"dimension(s), got shape {tuple(codes.shape)}")
        unbatched = codes.ndim == self.dims + 1
        return (codes.unsqueeze(0) if unbatched else codes), unbatched

    def _check_range(self, codes):
        # |acc| <= max|code| * (largest row sum of |weight codes|): refuse what int64 could not hold
        top = int(codes.abs().max()) if codes.numel() else 0
        if top * self.weights.row_l1 > _INT64_LIMIT:
            raise ValueError("input codes this large could overflow the int64 accumulator")

    @torch.no_grad()
    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """The int64 accumulator ``sum_e S_e @ (patches << e)``, shaped like the layer's output
        (:meth:`ShiftAddWeights.accumulate`). Padding with code 0 is exact: code 0 is the real value 0."""
        codes, unbatched = self._check_input_codes(codes)
        self._check_range(codes)
        acc = self.weights.accumulate(codes)
        return acc[0] if unbatched and self.dims else acc

    @torch.no_grad()
    def multiply_accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """The reference int64 accumulator from ordinary integer products (PyTorch's integer conv/linear)."""
        codes, unbatched = self._check_input_codes(codes)
        self._check_range(codes)
        if self.dims == 0:
            return F.linear(codes, self.weight_codes)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        acc = conv(codes, self.weight_codes, None, self.stride, self.padding, self.dilation, self.groups)
        return acc[0] if unbatched else acc

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for a float input: ``accumulate(codes) * (s_w s_a) + bias``, rescaled in
        float64 and returned in ``x``'s dtype and on its device."""
        codes, input_scale = self.quantize_input(x)
        y = self.accumulate(codes).double() * (self.weight_scale * input_scale)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *[1] * self.dims)
        return y.to(dtype=x.dtype, device=x.device)

    __call__ = forward

    # -- reporting ---------------------------------------------------------------------------------
    def term_stats(self) -> dict[str, float]:
        """Shift-add terms per weight: ``mean`` and ``max`` nonzero terms, and the fraction of zero weights
        (``zeros``, no work at all). A product costs ``terms`` shifts and ``terms - 1`` additions."""
        counts = term_counts(self.weight_codes)
        if counts.numel() == 0:
            return {"mean": 0.0, "max": 0, "zeros": 0.0}
        return {"mean": float(counts.double().mean()), "max": int(counts.max()),
                "zeros": float((counts == 0).double().mean())}

    def __repr__(self):
        stats = self.term_stats()
        return (f"ShiftAddLayer({self.kind}, weight={tuple(self.weight_codes.shape)}, "
                f"exponents={[e for e, _ in self.terms]}, terms/weight mean={stats['mean']:.2f} max={stats['max']}, "
                f"input={type(self.input_quantizer).__name__})")
