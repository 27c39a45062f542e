"""Non-uniform levels: powers of two (PoT) and additive powers of two (APoT), chapter 8.

A uniform grid spends its levels evenly; weights and activations are bell-shaped, dense near zero
and sparse in the tails. Powers of two put the levels where the values are, and a product with a
power of two is a shift, but PoT levels are *too* dense near zero and too sparse near the clip
(the "rigid resolution" problem: more bits only add levels ever closer to zero). APoT (Li, Dong and
Wang 2020) takes each level as a sum of ``n`` powers of two drawn from ``n`` interleaved sets, so the
levels spread more evenly while every product stays ``n`` shifts and ``n - 1`` additions.

Level sets follow the paper's released code: activations use ``grid(b)`` on ``[0, 1]``; weights
use ``sign x grid(b - 1)`` on ``[-1, 1]`` (so 2-bit weights are ternary), and every level set is
normalised by its largest element.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .._checks import check_bits, check_bool, check_choice, check_float
from ..affine import QuantParams
from .base import Quantizer
from .ewgs import EWGS_FIXES, EWGSMixin

#: Bit widths with an APoT construction (``grid(B)`` for ``B`` = 1 to 4).
APOT_BITS = (1, 2, 3, 4)


def _additive_bases(magnitude_bits: int) -> list[list[int]]:
    """The sets of exponents ``k`` (terms ``2^-k``) whose sums form ``grid(B)``; 0 stands for "no term"."""
    if magnitude_bits == 1:
        return [[1]]
    if magnitude_bits == 2:   # one term: 0, 2^-1, 2^-2, 2^-3 (plain powers of two)
        return [[1, 2, 3]]
    if magnitude_bits == 3:   # two terms: {2^-1, 2^-2, 2^-4} + {2^-3}
        return [[1, 2, 4], [3]]
    if magnitude_bits == 4:   # two interleaved terms: {2^-1, 2^-3, 2^-5} + {2^-2, 2^-4, 2^-6}
        return [[1, 3, 5], [2, 4, 6]]
    raise ValueError(f"APoT levels need 1 to 4 magnitude bits, got {magnitude_bits}")


def grid_codes(magnitude_bits: int) -> tuple[torch.Tensor, int]:
    """``grid(B)`` as integers: ``(codes, denominator)`` with levels ``codes / codes.max()``.

    Every code is a sum of at most one power of two from each base set, scaled by ``2^K`` (``K``
    the largest exponent), so ``codes`` are exact integers and each has at most ``n`` set bits
    drawn from disjoint exponent sets: the shift-and-add form of a product.
    """
    bases = _additive_bases(magnitude_bits)
    top = max(max(b) for b in bases)
    options = [[0] + [2 ** (top - k) for k in base] for base in bases]
    codes = sorted({sum(combo) for combo in itertools.product(*options)})
    if len(codes) != 2**magnitude_bits:
        raise AssertionError(f"grid({magnitude_bits}) has {len(codes)} levels")  # the construction guarantees it
    return torch.tensor(codes, dtype=torch.int64), 2**top


def apot_levels(bits: int, signed: bool = False) -> torch.Tensor:
    """The normalised APoT levels of a ``bits``-bit quantizer, ascending.

    Unsigned (activations): ``grid(bits)`` on ``[0, 1]``, ``2^bits`` levels. Signed (weights):
    ``{-1, 1} x grid(bits - 1)``, ``2^bits - 1`` levels (zero is shared by both signs).
    """
    bits = check_bits(bits)
    signed = check_bool(signed, "signed")
    magnitude = bits - 1 if signed else bits
    if magnitude not in APOT_BITS:
        kind = "signed (weights)" if signed else "unsigned (activations)"
        raise ValueError(f"APoT supports {kind} bits in [{min(APOT_BITS) + signed}, {max(APOT_BITS) + signed}], "
                         f"got {bits}")
    codes, _ = grid_codes(magnitude)
    levels = codes.double() / codes.max()
    if signed:
        levels = torch.cat([-levels.flip(0)[:-1], levels])
    return levels


def pot_levels(bits: int, signed: bool = False) -> torch.Tensor:
    """Powers-of-two levels: ``{0} U {2^-k}`` on ``[0, 1]`` (``2^bits`` levels), or signed on ``[-1, 1]``
    with ``bits - 1`` magnitude bits."""
    bits = check_bits(bits)
    signed = check_bool(signed, "signed")
    magnitude = bits - 1 if signed else bits
    if magnitude < 1:
        raise ValueError(f"signed PoT levels need at least 2 bits, got {bits}")
    levels = torch.tensor([0.0] + [2.0 ** -k for k in range(2**magnitude - 2, -1, -1)], dtype=torch.float64)
    if signed:
        levels = torch.cat([-levels.flip(0)[:-1], levels])
    return levels


def uniform_levels(bits: int, signed: bool = False) -> torch.Tensor:
    """Uniform levels with the same conventions (signed: symmetric, ``2^bits - 1`` levels)."""
    bits = check_bits(bits)
    signed = check_bool(signed, "signed")
    if signed:
        half = 2 ** (bits - 1) - 1
        return torch.arange(-half, half + 1, dtype=torch.float64) / half
    return torch.arange(2**bits, dtype=torch.float64) / (2**bits - 1)


GRIDS = ("apot", "pot", "uniform")
_LEVEL_SETS = {"apot": apot_levels, "pot": pot_levels, "uniform": uniform_levels}


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, value)`` of the level nearest to each element of ``u``; ``levels`` ascending.

    A value exactly halfway between two levels goes to the lower one.
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = torch.bucketize(u, midpoints)
    return index, levels[index]


def local_gap(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The distance between the two levels that enclose each element of ``u`` (clamped to the grid)."""
    lower = (torch.bucketize(u, levels, right=True) - 1).clamp(0, len(levels) - 2)
    return levels[lower + 1] - levels[lower]


class APoT(EWGSMixin, Quantizer):
    """A quantizer onto a fixed level set scaled by a learned clip ``alpha`` (Li, Dong and Wang 2020).

    Forward: ``alpha * P(clamp(x / alpha))``, ``P`` the projection to the nearest of the levels
    (``grid="apot"``, ``"pot"`` or ``"uniform"``, see :func:`apot_levels`), on ``[-1, 1]`` for weights
    (``signed``) and ``[0, 1]`` for activations. Weights are standardised first,
    ``(w - mean) / std`` with the statistics detached, as in the paper's CIFAR code, so ``alpha`` is in
    units of the weights' spread; the output is multiplied back by ``std`` so that the quantized
    weights keep the scale of the float ones (the paper, training from scratch with a batch norm
    after every convolution, leaves them in units of ``std``; a trained network's batch-norm
    statistics would no longer fit). ``alpha`` starts at the given value (the paper trains from a
    higher bit width with 3 for weights and 8 for activations) or, with ``alpha=None``, at the
    least-squared-error clip of the first batch, which suits fine-tuning a trained network.

    Backward, with the straight-through estimator through ``P`` and ``u = x / alpha``:
    ``d out / d alpha = sign(u)`` where ``|u| > 1`` and ``P(u) - u`` inside (the paper's
    gradient, what autograd gives here); ``d out / dx = 1`` inside, and outside 1 for weights
    (the paper's code does not mask clipped weights) and 0 for activations.

    ``ewgs=True`` gives ``P`` EWGS's backward pass instead of the STE (see :class:`EWGS`),
    with the error ``u - P(u)`` in the normalised domain. ``ewgs_fix`` changes what EWGS sees on an
    uneven grid: ``"gap"`` measures the error in units of the local gap between levels, times the
    uniform step over the same range (so that ``|error|`` is at most half a uniform step, as EWGS
    assumes); ``"bound"`` caps ``delta`` at ``1 / max|u - P(u)|`` so that no factor turns negative.
    """

    def __init__(self, bits: int = 2, signed: bool = True, alpha: float | None = None, grid: str = "apot",
                 standardize: bool | None = None, ewgs: bool = False, ewgs_fix: str | None = None):
        super().__init__(bits, signed)
        self.grid = check_choice(grid, "grid", GRIDS)
        self.register_buffer("level_set", _LEVEL_SETS[self.grid](self.bits, self.signed).float())
        start = 1.0 if alpha is None else check_float(alpha, "alpha", 0.0, low_open=True)
        self.alpha = nn.Parameter(torch.tensor(start))
        self.register_buffer("initialized", torch.tensor(alpha is not None))
        self.standardize = self.signed if standardize is None else check_bool(standardize, "standardize")
        self.ewgs = check_bool(ewgs, "ewgs")
        if ewgs_fix not in EWGS_FIXES:
            raise ValueError(f"ewgs_fix must be one of {EWGS_FIXES}, got {ewgs_fix!r}")
        self.ewgs_fix = ewgs_fix
        self._init_ewgs()

    @property
    def uses_ewgs(self) -> bool:
        return self.ewgs

    def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` used to standardise ``x`` (detached); ``(0, 1)`` without standardisation."""
        if not self.standardize:
            return torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        return x.detach().mean(), x.detach().std() + 1e-8

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised (weights) or unchanged (activations)."""
        mean, std = self._statistics(x)
        return (x - mean) / std

    def positive_alpha(self) -> torch.Tensor:
        return self.alpha.abs().clamp(min=1e-6)

    @torch.no_grad()
    def _initialize(self, x, candidates: int = 100):
        """Set ``alpha`` to the clip whose levels quantize ``x`` (normalised) with the least squared error."""
        flat = x.detach().reshape(-1).float()
        flat = flat[:: max(1, flat.numel() // 2**16)]
        top = float(flat.abs().max()) if self.signed else float(flat.clamp(min=0).max())
        if top <= 0:
            self.alpha.fill_(1.0)
        else:
            alphas = torch.linspace(top / candidates, top, candidates)
            low = -1.0 if self.signed else 0.0
            u = torch.clamp(flat[None, :] / alphas[:, None], low, 1.0)
            errors = (nearest_level(u, self.level_set)[1] * alphas[:, None] - flat[None, :]).pow(2).mean(1)
            self.alpha.fill_(float(alphas[int(torch.argmin(errors))]))
        self.initialized.fill_(True)

    def quantize(self, x):
        _, std = self._statistics(x)
        x = self.normalize_input(x)
        if not bool(self.initialized):
            self._initialize(x)
        alpha = self.positive_alpha()
        low = -1.0 if self.signed else 0.0
        u = torch.clamp(x / alpha, low, 1.0)
        if self.signed:  # clipped weights keep the straight-through gradient (the paper's choice)
            outside = ((x / alpha).detach().abs() > 1).to(x.dtype)
            u = u + (x - x.detach()) / alpha.detach() * outside
        _, u_q = nearest_level(u.detach(), self.level_set)
        if self.ewgs:
            out = self._ewgs(u, u_q, self._ewgs_error(u.detach(), u_q))
        else:
            out = u + (u_q - u).detach()
        return out * alpha * std

    def _ewgs_error(self, u, u_q):
        if self.ewgs_fix != "gap":
            return u - u_q
        levels = self.level_set
        uniform_step = (levels[-1] - levels[0]) / (len(levels) - 1)
        return (u - u_q) / local_gap(u, levels) * uniform_step

    def effective_delta(self, error):
        if self.ewgs_fix == "bound" and error.numel():
            return torch.minimum(self.ewgs_delta, 1 / error.abs().max().clamp(min=1e-12))
        return self.ewgs_delta

    def _check_initialized(self):
        if not bool(self.initialized):
            raise ValueError("APoT has not been initialised: call it on a tensor first, or give alpha")

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Integer codes and their scale for ``x``: the forward output equals ``scale * codes`` (up to
        rounding of the float product). Each code's magnitude is an APoT/PoT integer (:func:`grid_codes`): a sum of
        at most two powers of two."""
        if self.grid == "uniform":
            raise ValueError("codes() is for the power-of-two grids; a uniform grid exports with qparams()")
        self._check_initialized()
        magnitude_bits = self.bits - 1 if self.signed else self.bits
        if self.grid == "apot":
            table = grid_codes(magnitude_bits)[0]
        else:
            table = torch.tensor([0] + [2**k for k in range(2**magnitude_bits - 1)], dtype=torch.int64)
        with torch.no_grad():
            alpha = self.positive_alpha()
            u = torch.clamp(self.normalize_input(x) / alpha, -1.0 if self.signed else 0.0, 1.0)
            index, _ = nearest_level(u, self.level_set)
            scale = float(alpha * self._statistics(x)[1])
        magnitudes = torch.cat([-table.flip(0)[:-1], table]) if self.signed else table
        return magnitudes[index], scale / int(table.max())

    def qparams(self):
        self._check_initialized()
        if self.grid == "uniform" and not self.signed:
            step = float(self.positive_alpha()) / (2**self.bits - 1)
            return QuantParams(step, 0, self.bits, False, False, None)
        raise ValueError(f"APoT with grid={self.grid!r} (signed={self.signed}) has no uniform integer grid: "
                         "use codes() and qlib.shiftadd.ShiftAddLayer")

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """``alpha`` times the level set (for standardised weights: in units of their standard deviation,
        the output is this times ``std`` of the weights at hand)."""
        self._check_initialized()
        return self.positive_alpha() * self.level_set

    def extra_repr(self):
        return f"{super().extra_repr()}, grid={self.grid}, ewgs={self.ewgs}, ewgs_fix={self.ewgs_fix}"
