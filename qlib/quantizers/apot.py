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
from .base import Exported, Quantizer, Rounding, enclosing_levels, nearest_level
from .clip import least_squares_fraction

__all__ = ["APoT", "apot_levels", "pot_levels", "uniform_levels", "zero_free_levels", "grid_codes", "local_gap",
           "APOT_BITS", "GRIDS"]

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


def zero_free_levels(bits: int, signed: bool = True) -> torch.Tensor:
    """APoT's signed levels without 0 (``2^bits - 2`` levels): a control for chapter 8's question whether
    EWGS's trouble on APoT comes from the zero level. Unsigned level sets keep 0 (ReLU outputs need it)."""
    levels = apot_levels(bits, signed)
    return levels[levels != 0] if check_bool(signed, "signed") else levels


GRIDS = ("apot", "pot", "uniform", "apot-nozero")
_LEVEL_SETS = {"apot": apot_levels, "pot": pot_levels, "uniform": uniform_levels, "apot-nozero": zero_free_levels}


def local_gap(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The distance between the two levels that enclose each element of ``u`` (clamped to the grid)."""
    lower, upper = enclosing_levels(u, levels)
    return upper - lower


class APoT(Quantizer):
    """A quantizer onto a fixed level set scaled by a learned clip ``alpha`` (Li, Dong and Wang 2020).

    Forward: ``alpha * P(clamp(x / alpha))``, ``P`` the projection to the nearest of the levels
    (``grid="apot"``, ``"pot"`` or ``"uniform"``, see :func:`apot_levels`), on ``[-1, 1]`` for weights
    (``signed``) and ``[0, 1]`` for activations; the rounding (``rounding``: the straight-through
    estimator by default, or e.g. :class:`qlib.quantizers.EWGS`) gives ``P`` its backward pass.
    Weights are standardised first, ``(w - mean) / std`` with the statistics detached, as in the
    paper's CIFAR code, so ``alpha`` is in units of the weights' spread; the output is multiplied
    back by ``std`` so that the quantized weights keep the scale of the float ones (the paper,
    training from scratch with a batch norm after every convolution, leaves them in units of
    ``std``; a trained network's batch-norm statistics would no longer fit). ``alpha`` starts at the
    given value (the paper trains from a higher bit width with 3 for weights and 8 for activations)
    or, with ``alpha=None``, at the least-squared-error clip of the first batch, which suits
    fine-tuning a trained network.

    Backward, with the straight-through rounding and ``u = x / alpha``:
    ``d out / d alpha = sign(u)`` where ``|u| > 1`` and ``P(u) - u`` inside (the paper's gradient,
    what autograd gives here); ``d out / dx = 1`` inside, and outside 1 for weights (the paper's
    code does not mask clipped weights) and 0 for activations.
    """

    def __init__(self, bits: int = 2, signed: bool = True, alpha: float | None = None, grid: str = "apot",
                 standardize: bool | None = None, rounding: Rounding | None = None):
        super().__init__(bits, signed, rounding)
        self.grid = check_choice(grid, "grid", GRIDS)
        self.register_buffer("level_set", _LEVEL_SETS[self.grid](self.bits, self.signed).float())
        start = 1.0 if alpha is None else check_float(alpha, "alpha", 0.0, low_open=True)
        self.alpha = nn.Parameter(torch.tensor(start))
        if alpha is not None:
            self.initialized.fill_(True)
        self.standardize = self.signed if standardize is None else check_bool(standardize, "standardize")

    def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` used to standardise ``x`` (detached); ``(0, 1)`` without standardisation."""
        if not self.standardize:
            return torch.zeros((), dtype=x.dtype, device=x.device), torch.ones((), dtype=x.dtype, device=x.device)
        return x.detach().mean(), x.detach().std() + 1e-8

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised (weights) or unchanged (activations)."""
        mean, std = self._statistics(x)
        return (x - mean) / std

    def positive_alpha(self) -> torch.Tensor:
        return self.alpha.abs().clamp(min=1e-6)

    def initialize(self, x, candidates: int = 100):
        """``alpha``: the clip whose levels quantize ``x`` (normalised) with the least squared error."""
        x = self.normalize_input(x)
        top = float(x.abs().max()) if self.signed else float(x.clamp(min=0).max())
        if top <= 0:
            self.alpha.fill_(1.0)
            return
        low = -1.0 if self.signed else 0.0

        def project(values, f):
            alpha = f * top
            return nearest_level(torch.clamp(values / alpha, low, 1.0), self.level_set)[1] * alpha

        self.alpha.fill_(least_squares_fraction(x, project, candidates) * top)

    def _clamped(self, x: torch.Tensor) -> torch.Tensor:
        """``u = clamp(x_norm / alpha)``, with the straight-through gradient for clipped weights."""
        x = self.normalize_input(x)
        alpha = self.positive_alpha()
        u = torch.clamp(x / alpha, -1.0 if self.signed else 0.0, 1.0)
        if self.signed:  # clipped weights keep the straight-through gradient (the paper's choice)
            outside = ((x / alpha).detach().abs() > 1).to(x.dtype)
            u = u + (x - x.detach()) / alpha.detach() * outside
        return u

    def fake_quantize(self, x):
        _, std = self._statistics(x)
        return self.rounding(self._clamped(x), self.level_set) * self.positive_alpha() * std

    def code_table(self) -> torch.Tensor:
        """The integer code of every level, ascending: ``level_set * code_max`` (:func:`grid_codes`)."""
        magnitude_bits = self.bits - 1 if self.signed else self.bits
        if self.grid in ("apot", "apot-nozero"):
            table = grid_codes(magnitude_bits)[0]
            if self.grid == "apot-nozero" and self.signed:
                table = table[1:]
                return torch.cat([-table.flip(0), table])
        elif self.grid == "pot":
            table = torch.tensor([0] + [2**k for k in range(2**magnitude_bits - 1)], dtype=torch.int64)
        else:  # uniform: 0, 1, ..., the largest magnitude (2^b - 1 unsigned, 2^(b-1) - 1 signed)
            table = torch.arange((2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1) + 1)
        return torch.cat([-table.flip(0)[:-1], table]) if self.signed else table

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> Exported:
        """Integer codes of ``x`` (``level * code_max``) with ``scale = alpha std / code_max``, zero-point 0.

        For the power-of-two grids each code's magnitude is a sum of at most one (PoT) or two (APoT)
        powers of two (:func:`grid_codes`): the shift-and-add form of chapter 8.
        """
        self._require_initialized()
        table = self.code_table()
        index, _ = nearest_level(self._clamped(x.detach()), self.level_set)
        code_max = int(table.max())
        scale = self.positive_alpha().detach().double().cpu() * self._statistics(x)[1].double().cpu() / code_max
        return Exported(table[index.cpu()], scale, torch.zeros((), dtype=torch.int64), int(table.min()), code_max,
                        None, "apot" if self.grid == "apot-nozero" else self.grid)

    def qparams(self):
        self._require_initialized()
        if self.grid == "uniform" and not self.signed:
            step = float(self.positive_alpha()) / (2**self.bits - 1)
            return QuantParams(step, 0, self.bits, False, False, None)
        raise ValueError(f"APoT with grid={self.grid!r} (signed={self.signed}) has no uniform integer grid: "
                         "use export() (and qlib.shiftadd for the power-of-two grids)")

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """``alpha`` times the level set (for standardised weights: in units of their standard deviation,
        the output is this times ``std`` of the weights at hand)."""
        self._require_initialized()
        return self.positive_alpha() * self.level_set

    def extra_repr(self):
        return f"{super().extra_repr()}, grid={self.grid}"
