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

:class:`ShiftAddLayer` runs a trained ``QuantConv1d``, ``QuantConv2d`` or ``QuantLinear`` this way,
with every integer in int64, next to :meth:`ShiftAddLayer.multiply_accumulate`, the same
accumulator from ordinary integer products.

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

from .quantizers import APoT, Quantizer
from .quantizers.apot import nearest_level

__all__ = ["power_of_two_terms", "term_counts", "max_terms", "ShiftAddLayer"]

_INT64_LIMIT = 2**63 - 1
_SUPPORTED_INPUTS = "an unsigned APoT (any grid) or a uniform quantizer with per-tensor qparams() and zero-point 0"


def _check_codes(codes, name: str = "codes") -> torch.Tensor:
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
    codes = _check_codes(codes)
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
    counts = torch.zeros(_check_codes(codes).shape, dtype=torch.int64)
    for _, signs in power_of_two_terms(codes):
        counts += signs.abs().to(counts.device)
    return counts.to(codes.device)


def max_terms(codes: torch.Tensor) -> int:
    """The largest number of nonzero power-of-two terms of any code (0 for no codes or all zeros).

    APoT codes (:func:`qlib.quantizers.grid_codes` for 3 and 4 magnitude bits) need 2, PoT codes 1.
    """
    counts = term_counts(codes)
    return int(counts.max()) if counts.numel() else 0


def _layer_types():
    from .qat import QuantConv1d, QuantConv2d, QuantLinear

    return {QuantLinear: "linear", QuantConv1d: "conv1d", QuantConv2d: "conv2d"}


def _pair_padding(padding, kernel, dilation) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per spatial dimension, for explicit sizes, ``"valid"`` or ``"same"``."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":  # as PyTorch: the odd one out goes after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in padding]


class ShiftAddLayer:
    """A quantized conv/linear layer run in integers, each weight product as shifts and additions.

    Build it with :meth:`from_module` from a ``QuantConv1d``, ``QuantConv2d`` or ``QuantLinear``
    (:mod:`qlib.qat`) whose weight quantizer is an :class:`~qlib.quantizers.APoT` with
    ``grid="apot"`` or ``"pot"``. Calling it on a float input quantizes the input to codes
    (:meth:`quantize_input`), accumulates with shifts and additions (:meth:`accumulate`) and
    rescales: ``acc * (s_w s_a) + bias``. No autograd; the integer work runs on the CPU (PyTorch has
    no int64 matrix product on GPUs), and :meth:`forward` returns its output on the input's device.

    Parameters
    ----------
    kind : str
        ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
    weight_codes : torch.Tensor
        Integer weight codes, shaped like the layer's weight.
    weight_scale : float
        The real value of weight code 1.
    input_quantizer : qlib.quantizers.Quantizer
        An unsigned :class:`~qlib.quantizers.APoT` (any grid) or a uniform quantizer whose
        ``qparams()`` is per-tensor with zero-point 0; it is copied.
    bias : torch.Tensor, optional
        Float bias, one per output channel.
    stride, padding, dilation, groups
        As the convolution's (ignored for ``"linear"``); ``padding`` may be ``"valid"`` or ``"same"``.
    """

    KINDS = ("linear", "conv1d", "conv2d")

    def __init__(self, kind: str, weight_codes: torch.Tensor, weight_scale: float, input_quantizer: Quantizer,
                 bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.dims = 0 if kind == "linear" else int(kind[4])
        weight_codes = _check_codes(weight_codes, "weight_codes").detach().cpu()
        if weight_codes.ndim != self.dims + 2:
            raise ValueError(f"weight_codes of a {kind} layer must have {self.dims + 2} dimensions, "
                             f"got shape {tuple(weight_codes.shape)}")
        self.weight_codes = weight_codes
        self.weight_scale = float(weight_scale)
        if not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise ValueError(f"weight_scale must be finite and > 0, got {weight_scale}")
        self._set_input_quantizer(input_quantizer)
        out_channels = weight_codes.shape[0]
        if bias is not None:
            bias = bias.detach().cpu().double().reshape(-1)
            if bias.numel() != out_channels:
                raise ValueError(f"bias must have {out_channels} entries (one per output channel), got {bias.numel()}")
        self.bias = bias
        self.groups = 1
        if self.dims:
            self.stride, self.dilation = self._per_dim(stride, "stride"), self._per_dim(dilation, "dilation")
            self.groups = int(groups)
            if out_channels % self.groups:
                raise ValueError(f"groups ({groups}) must divide the {out_channels} output channels")
            kernel = tuple(weight_codes.shape[2:])
            self.padding = padding if isinstance(padding, str) else self._per_dim(padding, "padding", 0)
            if isinstance(padding, str) and padding not in ("valid", "same"):
                raise ValueError(f"padding must be sizes, 'valid' or 'same', got {padding!r}")
            self._pads = _pair_padding(self.padding, kernel, self.dilation)
        # The terms, and their sign matrices laid out for the product with the patches:
        # (groups, out / groups, in / groups * kernel) for a convolution, (out, in) for a linear layer.
        self.terms = power_of_two_terms(weight_codes)
        rows = (self.groups, out_channels // self.groups, -1) if self.dims else (out_channels, -1)
        self._signs = [(e, s.reshape(rows)) for e, s in self.terms]
        self._weight_matrix_l1 = int(weight_codes.reshape(out_channels, -1).abs().sum(1).max()) \
            if weight_codes.numel() else 0

    def _per_dim(self, value, name: str, low: int = 1) -> tuple[int, ...]:
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * self.dims
        if len(values) != self.dims or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"{name} must be an integer >= {low} or {self.dims} of them, got {value!r}")
        return values

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_module(cls, layer) -> ShiftAddLayer:
        """The shift-add form of a trained ``QuantConv1d``, ``QuantConv2d`` or ``QuantLinear``.

        The weight quantizer must be an :class:`~qlib.quantizers.APoT` with ``grid="apot"`` or
        ``"pot"`` (its codes are exported with ``codes(layer.weight)``); the input quantizer an
        unsigned ``APoT`` (any grid) or a uniform quantizer with per-tensor ``qparams()`` and
        zero-point 0 (such as unsigned LSQ or PACT). Both must be enabled and initialised (call the
        layer once on data). The layer's parameters are read now: later training does not change
        the returned object.
        """
        types = _layer_types()
        kind = types.get(type(layer))
        if kind is None:
            hint = " (convert a QuantConvBn with to_quantized_conv() first)" if hasattr(layer, "folded") else ""
            raise TypeError("layer must be a qlib.qat QuantConv1d, QuantConv2d or QuantLinear (see qlib.qat.prepare)"
                            f"{hint}, got {type(layer).__name__}")
        wq = layer.weight_quantizer
        if not isinstance(wq, APoT):
            raise TypeError("ShiftAddLayer needs an APoT weight quantizer with grid 'apot' or 'pot', got "
                            f"{type(wq).__name__}; uniform weights run in qlib.engine")
        if wq.grid not in ("apot", "pot"):
            raise ValueError(f"ShiftAddLayer needs an APoT weight quantizer with grid 'apot' or 'pot', got "
                             f"grid={wq.grid!r}; uniform weights run in qlib.engine")
        if not wq.enabled:
            raise ValueError("the layer's weight quantizer is disabled: its float weights have no integer codes")
        weight_codes, weight_scale = wq.codes(layer.weight.detach())
        kwargs = {}
        if kind != "linear":
            if layer.padding_mode != "zeros":
                raise ValueError(f"ShiftAddLayer supports zero padding only, got padding_mode={layer.padding_mode!r}")
            kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return cls(kind, weight_codes, weight_scale, layer.input_quantizer, layer.bias, **kwargs)

    def _set_input_quantizer(self, q):
        if q is None or not isinstance(q, Quantizer):
            raise TypeError("ShiftAddLayer needs an input quantizer (a qlib.quantizers.Quantizer) to turn inputs "
                            f"into integer codes, got {type(q).__name__}")
        if not q.enabled:
            raise ValueError("the input quantizer is disabled: its float inputs have no integer codes")
        if isinstance(q, APoT):
            if q.signed:
                raise ValueError(f"the input quantizer must be {_SUPPORTED_INPUTS}; got a signed APoT")
            q._check_initialized()
            self._input_mode = "apot-uniform" if q.grid == "uniform" else "apot"
        else:
            self._uniform_qparams(q)
            self._input_mode = "uniform"
        self.input_quantizer = copy.deepcopy(q).cpu().eval()

    @staticmethod
    def _uniform_qparams(q):
        qp = q.qparams()  # raises for quantizers without a uniform grid, or not yet initialised
        if qp.axis is not None or int(qp.zero_point) != 0:
            raise ValueError(f"the input quantizer must be {_SUPPORTED_INPUTS}; got {type(q).__name__} with "
                             f"axis={qp.axis}, zero_point={qp.zero_point.tolist()}")
        return qp

    # -- the integer path --------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(codes, scale)``: int64 input codes (on the CPU) with ``x ~ scale * codes``, the values
        the layer's input quantizer outputs."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        x = x.detach().cpu()
        q = self.input_quantizer
        if self._input_mode == "apot":
            return q.codes(x)
        if self._input_mode == "apot-uniform":
            # Levels k / (2^b - 1): the index of the nearest level is the code, chosen exactly as forward does.
            std = q._statistics(x)[1]
            u = torch.clamp(q.normalize_input(x) / q.positive_alpha(), 0.0, 1.0)
            index, _ = nearest_level(u, q.level_set)
            return index.to(torch.int64), float(q.positive_alpha() * std) / (2**q.bits - 1)
        # Read the codes off the quantizer's own output, k * s (its arithmetic may differ from x / s by an ulp:
        # LSQ divides by s * g + (s - s * g), PyTorch's kernels multiply by 1 / s), so they are the codes it used.
        y = q(x)
        qp = self._uniform_qparams(q)  # after the call: a range taken from the current input is now set
        scale = float(qp.scale)
        codes = torch.round(y.double() / scale).clamp(qp.qmin, qp.qmax)
        return codes.to(torch.int64), scale

    def _check_input_codes(self, codes) -> tuple[torch.Tensor, bool]:
        """The codes as batched int64 on the CPU, and whether a batch dimension was added."""
        codes = _check_codes(codes).cpu()
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
        if top * self._weight_matrix_l1 > _INT64_LIMIT:
            raise ValueError("input codes this large could overflow the int64 accumulator")

    def _patches(self, codes: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """im2col of batched codes: ``(N, groups, in / groups * kernel, L)`` and the output's spatial shape.

        Padding with code 0 is exact: code 0 is the real value 0 (zero-point 0).
        """
        pad = [p for before_after in reversed(self._pads) for p in before_after]
        patches = F.pad(codes, pad) if any(pad) else codes
        kernel = self.weight_codes.shape[2:]
        for d in range(self.dims):  # Tensor.unfold works on integers (F.unfold does not)
            span = (kernel[d] - 1) * self.dilation[d] + 1
            patches = patches.unfold(2 + d, span, self.stride[d])
            if self.dilation[d] > 1:
                patches = patches[..., ::self.dilation[d]]
        # (N, C, *out, *kernel) -> (N, C, *kernel, *out) -> (N, groups, C / groups * kernel, L)
        n, dims = codes.shape[0], self.dims
        spatial = tuple(patches.shape[2:2 + dims])
        patches = patches.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
        return patches.reshape(n, self.groups, -1, math.prod(spatial)), spatial

    @torch.no_grad()
    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """The int64 accumulator ``sum_e S_e @ (patches << e)``, shaped like the layer's output.

        Only shifts and additions: each input code is shifted by every exponent a weight uses, and
        the product with the sign matrix ``S_e`` (entries -1, 0, 1) adds, subtracts or skips it.
        """
        codes, unbatched = self._check_input_codes(codes)
        self._check_range(codes)
        if self.dims == 0:
            acc = torch.zeros((*codes.shape[:-1], self.weight_codes.shape[0]), dtype=torch.int64)
            for e, signs in self._signs:
                # (x << e) @ S_e^T: a matmul with a {-1, 0, 1} matrix, i.e. additions and subtractions
                acc += torch.bitwise_left_shift(codes, e) @ signs.t()
            return acc
        patches, spatial = self._patches(codes)
        out_per_group = self.weight_codes.shape[0] // self.groups
        acc = torch.zeros((codes.shape[0], self.groups, out_per_group, patches.shape[-1]), dtype=torch.int64)
        for e, signs in self._signs:
            # S_e @ (patches << e), per group: a matmul with a {-1, 0, 1} matrix, i.e. additions and subtractions
            acc += signs @ torch.bitwise_left_shift(patches, e)
        acc = acc.reshape(codes.shape[0], -1, *spatial)
        return acc[0] if unbatched else acc

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
