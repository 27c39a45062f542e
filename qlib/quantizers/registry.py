"""Quantization methods by name: a grid, optionally ``+`` a rounding gradient.

``make_quantizer("apot+ewgs", bits=2, role="weight")`` is APoT's grid with EWGS's backward pass;
``"lsq"`` is LSQ's grid with the straight-through estimator; ``"lsq++daq"`` is LSQ+'s grid with
DAQ's. :func:`qlib.qat.prepare` takes these names. A new grid or rounding is one entry here.

Grids (``GRIDS``), for weights (signed) and activations:

* ``"minmax"``: observed ranges with the straight-through estimator: weights per channel,
  symmetric, narrow range (the min and max of the current weights); activations asymmetric,
  moving-average min and max;
* ``"jacob"``: Jacob et al. (2018)'s own scheme: weights per tensor, asymmetric min/max, narrow
  range only at 8 bits; activations as ``"minmax"``;
* ``"pact"``: activations only, a learned clip (signed inputs, such as standardised images, get
  ``"minmax"``'s moving-average range instead, since PACT's range is ``[0, alpha]``);
* ``"lsq"``: a learned step (weights per channel); ``"lsq+"``: activations with a learned step
  and offset (weights get LSQ);
* ``"apot"``, ``"pot"``, ``"apot-uniform"``: the level sets of chapter 8 with a learned clip
  (weights per tensor); bit widths or signed inputs a level set does not cover get LSQ;
  ``"apot-nozero"``: APoT with the zero level removed from the weights (a control).

Roundings (``ROUNDINGS``): ``"ste"`` (the default), ``"ste-half"`` (the STE's gradient halved:
a control), ``"dsq"``, ``"daq"`` (``sigma`` 1 for weights and 2 for activations, as in the paper's
code), ``"ewgs"``, ``"ewgs-gap"`` and ``"ewgs-bound"`` (EWGS with chapter 8's two fixes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._checks import check_bits, check_bool, check_choice
from .apot import APOT_BITS, APoT
from .approx import DAQ, DSQ
from .base import STE, Quantizer, Rounding
from .ewgs import EWGS
from .uniform import PACT, LSQ, LSQPlus, RangeFakeQuantizer

__all__ = ["GRIDS", "ROUNDINGS", "ROLES", "Grid", "make_quantizer", "parse_method", "method_names"]

ROLES = ("weight", "act")


@dataclass(frozen=True)
class Grid:
    """How a grid is built for weights ``(bits, per_channel, rounding)`` and for activations
    ``(bits, signed, rounding)``; ``None`` where the grid has no such use."""

    weight: Callable[[int, bool, Rounding], Quantizer] | None
    act: Callable[[int, bool, Rounding], Quantizer] | None


def _axis(per_channel):
    return 0 if per_channel else None


def _ema(bits, signed, rounding):
    return RangeFakeQuantizer(bits, signed=signed, scheme="asymmetric", range="ema", rounding=rounding)


def _lsq_weight(bits, per_channel, rounding):
    return LSQ(bits, signed=True, axis=_axis(per_channel), rounding=rounding)


def _apot(grid, act_grid=None):
    def weight(bits, per_channel, rounding):
        if bits - 1 not in APOT_BITS:
            return _lsq_weight(bits, per_channel, rounding)
        return APoT(bits, signed=True, grid=grid, rounding=rounding)

    def act(bits, signed, rounding):
        if signed or bits not in APOT_BITS:
            return LSQ(bits, signed=signed, rounding=rounding)
        return APoT(bits, signed=False, grid=act_grid or grid, rounding=rounding)

    return Grid(weight, act)


#: The grids by name (see the module docstring).
GRIDS: dict[str, Grid] = {
    "minmax": Grid(lambda b, pc, r: RangeFakeQuantizer(b, signed=True, scheme="symmetric", narrow_range=True,
                                                       axis=_axis(pc), range="current", rounding=r), _ema),
    "jacob": Grid(lambda b, pc, r: RangeFakeQuantizer(b, signed=True, scheme="asymmetric", narrow_range=b == 8,
                                                      axis=None, range="current", rounding=r), _ema),
    "pact": Grid(None, lambda b, s, r: _ema(b, s, r) if s else PACT(b, alpha=None, rounding=r)),
    "lsq": Grid(_lsq_weight, lambda b, s, r: LSQ(b, signed=s, rounding=r)),
    "lsq+": Grid(_lsq_weight, lambda b, s, r: LSQPlus(b, signed=s, rounding=r)),
    "apot": _apot("apot"),
    "pot": _apot("pot"),
    "apot-uniform": _apot("uniform"),
    "apot-nozero": _apot("apot-nozero", act_grid="apot"),
}

#: The rounding gradients by name: ``(role) -> Rounding``.
ROUNDINGS: dict[str, Callable[[str], Rounding]] = {
    "ste": lambda role: STE(),
    "ste-half": lambda role: STE(0.5),
    "dsq": lambda role: DSQ(),
    "daq": lambda role: DAQ(sigma=1.0 if role == "weight" else 2.0),
    "ewgs": lambda role: EWGS(),
    "ewgs-gap": lambda role: EWGS(fix="gap"),
    "ewgs-bound": lambda role: EWGS(fix="bound"),
}


def parse_method(method: str) -> tuple[str, str]:
    """``(grid, rounding)`` of a method name: ``"grid"`` or ``"grid+rounding"``."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'lsq' or 'apot+ewgs', got {type(method).__name__}")
    name = method.replace(" ", "")
    for grid in sorted(GRIDS, key=len, reverse=True):
        if name == grid:
            return grid, "ste"
        rest = name[len(grid) + 1:]
        if name.startswith(grid + "+") and rest in ROUNDINGS:
            return grid, rest
    raise ValueError(f"method must be a grid ({', '.join(GRIDS)}) optionally followed by '+' and a rounding "
                     f"({', '.join(ROUNDINGS)}), e.g. 'lsq' or 'apot+ewgs'; got {method!r}")


def method_names(role: str) -> list[str]:
    """Every method name valid for ``role`` (``"weight"`` or ``"act"``)."""
    check_choice(role, "role", ROLES)
    grids = [g for g, spec in GRIDS.items() if getattr(spec, role) is not None]
    return grids + [f"{g}+{r}" for g in grids for r in ROUNDINGS if r != "ste"]


def make_quantizer(method: str, bits: int, role: str, signed: bool = False, per_channel: bool = True) -> Quantizer:
    """The quantizer a method name describes, for weights (always signed) or activations.

    ``signed`` applies to activations (inputs that can be negative); ``per_channel`` to weight
    grids that have both forms.
    """
    grid, rounding = parse_method(method)
    check_choice(role, "role", ROLES)
    bits = check_bits(bits)
    build = getattr(GRIDS[grid], role)
    if build is None:
        raise ValueError(f"the {grid!r} grid has no {role} quantizer; choose one of {method_names(role)[:8]}")
    second = check_bool(per_channel, "per_channel") if role == "weight" else check_bool(signed, "signed")
    return build(bits, second, ROUNDINGS[rounding](role))
