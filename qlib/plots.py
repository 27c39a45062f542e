"""Figures and interactive explorers used by the chapters.

Every drawing function takes data and returns the matplotlib figure plus the numbers it
shows, so a test can check the numbers and a notebook can show the picture. The
explorers wrap a drawing function in ipywidgets sliders; in the static book they show
their initial state.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch

from ._checks import check_bits, check_choice, check_float, check_float_array, check_int
from .affine import SCHEMES, as_float64_numpy, fake_quantize, qparams_from_range, qparams_from_tensor, sqnr_db
from .fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier

__all__ = ["publish", "use_book_style", "draw_quantization", "quantization_explorer", "draw_channel_ranges",
           "granularity_explorer", "draw_multiplier", "multiplier_explorer", "draw_lsb_histogram",
           "draw_rounding_objective", "rounding_explorer", "draw_allocation", "allocation_explorer", "BOOK_STYLE"]

BOOK_STYLE = {
    # Opaque white backgrounds, so figures stay readable on the book's dark theme.
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "figure.dpi": 100,
    "figure.figsize": (7.0, 3.2),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}


def publish(key: str, value) -> None:
    """Make a value computed in a chapter available to its prose as ``{glue:text}`key```.

    numpy scalars become plain Python numbers, so that format specs such as ``:.1f`` apply.
    """
    from myst_nb import glue

    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    glue(key, value, display=False)


def use_book_style() -> None:
    """Apply the book's matplotlib style (opaque backgrounds, light grid)."""
    mpl.rcParams.update(BOOK_STYLE)


def draw_quantization(x, bits: int = 4, clip: float | None = None, scheme: str = "symmetric",
                      signed: bool = True, ax=None, bins: int = 120):
    """Histogram of ``x`` with the quantization grid for a clipping range ``[-clip, clip]``.

    ``clip=None`` uses the min-max range of ``x``. Returns ``(figure, stats)`` where
    ``stats`` holds the scale, the clipping range, the MSE, the SQNR in dB and the share
    of values that fall outside the grid (clipped).
    """
    check_float_array(x, "x", allow_empty=False)
    bits = check_bits(bits)
    check_choice(scheme, "scheme", SCHEMES)
    values = as_float64_numpy(x).ravel()
    if clip is None:
        qp = qparams_from_tensor(values, bits, scheme, signed)
    else:
        clip = check_float(clip, "clip", 0.0, low_open=True)
        qp = qparams_from_range(-clip, clip, bits, scheme, signed)
    lo, hi = (float(v) for v in qp.real_range)
    xq = fake_quantize(values, qp)
    stats = {"scale": float(qp.scale), "lo": lo, "hi": hi, "mse": float(np.mean((xq - values) ** 2)),
             "sqnr_db": sqnr_db(values, xq), "clipped": float(np.mean((values < lo) | (values > hi)))}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3))
    ax.hist(values, bins=bins, color="#4c72b0", alpha=0.75, label="values")
    levels = qp.levels()
    for level in levels if len(levels) <= 64 else levels[:: len(levels) // 32]:
        ax.axvline(level, color="#dd8452", lw=0.8, alpha=0.8)
    if values.min() < lo:  # shade what the grid clips
        ax.axvspan(values.min(), lo, color="#c44e52", alpha=0.12)
    if values.max() > hi:
        ax.axvspan(hi, values.max(), color="#c44e52", alpha=0.12)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{bits}-bit {scheme} grid, S = {stats['scale']:.3g}: MSE {stats['mse']:.2e}, "
                 f"SQNR {stats['sqnr_db']:.1f} dB, clipped {100 * stats['clipped']:.2f} %", fontsize=9)
    return fig, stats


def quantization_explorer(x, bits: int = 4, scheme: str = "symmetric"):
    """Sliders for the bit width and the clipping range over :func:`draw_quantization`."""
    import ipywidgets as widgets

    values = as_float64_numpy(check_float_array(x, "x", allow_empty=False)).ravel()
    amax = float(np.abs(values).max()) or 1.0

    def show(bits, clip_fraction, scheme):
        fig, _ = draw_quantization(values, bits, clip_fraction * amax, scheme, signed=True)
        plt.show()

    return widgets.interactive(
        show,
        bits=widgets.IntSlider(value=check_bits(bits), min=2, max=8, description="bits"),
        clip_fraction=widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="clip / max|x|",
                                          style={"description_width": "initial"}),
        scheme=widgets.Dropdown(options=list(SCHEMES), value=check_choice(scheme, "scheme", SCHEMES),
                                description="scheme"),
    )


def draw_channel_ranges(weight, bits: int = 4, name: str = "", ax=None):
    """Per-output-channel weight ranges and the SQNR of per-tensor vs per-channel quantization.

    Returns ``(figure, stats)`` with both SQNRs (dB) and the ratio of the largest to the
    smallest channel range.
    """
    check_float_array(weight, "weight", allow_empty=False)
    bits = check_bits(bits)
    w = as_float64_numpy(weight)
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    amax = np.maximum(-lo, hi)
    per_tensor = fake_quantize(w, qparams_from_tensor(w, bits, "symmetric", True))
    per_channel = fake_quantize(w, qparams_from_tensor(w, bits, "symmetric", True, axis=0))
    stats = {"sqnr_per_tensor_db": sqnr_db(w, per_tensor), "sqnr_per_channel_db": sqnr_db(w, per_channel),
             "range_ratio": float(amax.max() / max(amax.min(), 1e-12))}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3))
    order = np.argsort(amax)
    channels = np.arange(len(amax))
    ax.vlines(channels, lo[order], hi[order], color="#4c72b0", lw=2, label="channel range")
    tensor_step = float(qparams_from_tensor(w, bits, "symmetric", True).scale)
    ax.axhline(tensor_step / 2, color="#c44e52", ls="--", lw=1,
               label=f"half a per-tensor step ({bits} bits)")
    ax.axhline(-tensor_step / 2, color="#c44e52", ls="--", lw=1)
    ax.set_xlabel("output channel (sorted by range)")
    ax.set_ylabel("weight value")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{name} {bits}-bit: SQNR per-tensor {stats['sqnr_per_tensor_db']:.1f} dB, "
                 f"per-channel {stats['sqnr_per_channel_db']:.1f} dB; max/min range "
                 f"{stats['range_ratio']:.0f}x", fontsize=9)
    return fig, stats


def granularity_explorer(weights: dict, bits: int = 4):
    """A layer menu and a bit-width slider over :func:`draw_channel_ranges`."""
    import ipywidgets as widgets

    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict of layer name -> weight tensor")

    def show(layer, bits):
        draw_channel_ranges(weights[layer], bits, layer)
        plt.show()

    return widgets.interactive(
        show,
        layer=widgets.Dropdown(options=list(weights), description="layer"),
        bits=widgets.IntSlider(value=check_bits(bits), min=2, max=8, description="bits"),
    )


def _round_product_half_away(acc: np.ndarray, m: float) -> np.ndarray:
    """``round(acc * m)`` for int64 ``acc`` and a float ``m``, in exact integer arithmetic (half away from 0).

    A float64 product would misplace the exact ties (e.g. ``5 * 0.7``) by one unit.
    """
    num, den = float(m).as_integer_ratio()
    magnitude = (np.abs(acc).astype(object) * (2 * num) + den) // (2 * den)
    return (np.sign(acc) * magnitude).astype(np.int64)


def draw_multiplier(s1: float = 0.1, s2: float = 0.2, s3: float = 0.05, acc_range: int = 20000, ax=None):
    """The fixed-point multiplier for ``M = S1 S2 / S3`` and its error on accumulators ``-acc_range..acc_range``.

    Returns ``(figure, stats)``: ``M``, ``M0``, ``shift``, the relative error of ``M0 2^(shift-31)``
    against ``M``, and the share of accumulators whose fixed-point result differs from
    ``round(acc * M)`` computed exactly (round half away from zero).
    """
    for name, value in (("s1", s1), ("s2", s2), ("s3", s3)):
        check_float(value, name, 0.0, low_open=True)
    check_int(acc_range, "acc_range", 1, 2**31 - 1)
    m = s1 * s2 / s3
    m0, shift = quantize_multiplier(m)
    acc = np.arange(-acc_range, acc_range + 1, dtype=np.int64)
    fixed = multiply_by_quantized_multiplier(acc, m0, shift).astype(np.int64)
    exact = acc * m
    single = _round_product_half_away(acc, m)
    stats = {"M": m, "M0": m0, "shift": shift, "rel_error": abs(m0 * 2.0 ** (shift - 31) - m) / m,
             "differs": float(np.mean(fixed != single)), "max_diff": int(np.max(np.abs(fixed - single)))}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3))
    err = fixed - exact
    ax.plot(acc, err, ".", ms=1, color="#4c72b0", label="fixed point - exact")
    ax.plot(acc, single - exact, ".", ms=1, color="#dd8452", alpha=0.4, label="one rounding - exact")
    ax.set(xlabel="int32 accumulator", ylabel="error (output LSB)")
    ax.legend(fontsize=8, markerscale=8, loc="upper right")
    ax.set_title(f"M = {m:.6g} = {m0} * 2^({shift} - 31); fixed point != one rounding for "
                 f"{100 * stats['differs']:.3f} % of accumulators", fontsize=9)
    return fig, stats


def multiplier_explorer(s1: float = 0.1, s2: float = 0.2, s3: float = 0.05):
    """Sliders for S1, S2, S3 (log scale) over :func:`draw_multiplier`."""
    import ipywidgets as widgets

    def show(s1, s2, s3):
        draw_multiplier(s1, s2, s3)
        plt.show()

    def slider(value, description):
        return widgets.FloatLogSlider(value=value, base=10, min=-4, max=0, step=0.05, description=description,
                                      readout_format=".4f")

    return widgets.interactive(show, s1=slider(s1, "S1"), s2=slider(s2, "S2"), s3=slider(s3, "S3"))


def draw_rounding_objective(lam: float = 0.01, beta: float = 20.0, targets=(0.3, 0.45), ax=None):
    """AdaRound's regulariser on one rounding decision ``h``, and what it does to a toy objective.

    Left: ``lam * (1 - |2h - 1|^beta)`` against ``h`` (AdaRound's regulariser for one weight), with
    ``beta`` = 20, 8 and 2 for reference. Right: ``(h - t)^2 + lam * (1 - |2h - 1|^beta)`` for each
    ``t`` of ``targets``: the squared error pulls ``h`` to the value ``t`` the reconstruction wants,
    the regulariser towards 0 or 1. Returns ``(figure, minima)``: per target the ``h`` in
    ``[0, 1]`` (a grid of 2,001 points) that minimises the objective. With ``lam = 0`` that is ``t``
    itself; for ``beta = 2`` and ``lam > 1/4`` the objective is concave, and the minimum is 0 or 1.
    """
    from .ptq.adaround import rounding_regularizer

    lam = check_float(lam, "lam", 0.0)
    beta = check_float(beta, "beta", 0.0, low_open=True)
    if isinstance(targets, (int, float)):
        targets = (targets,)
    if not isinstance(targets, (tuple, list)) or not targets or not all(isinstance(t, (int, float)) for t in targets):
        raise TypeError(f"targets must be a non-empty tuple of numbers in [0, 1], got {targets!r}")
    targets = np.asarray(targets, dtype=np.float64)
    if not ((targets >= 0) & (targets <= 1)).all():  # NaN fails both comparisons
        raise ValueError(f"targets must lie in [0, 1], got {targets.tolist()}")
    h = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)

    def regulariser(b):  # per element: rounding_regularizer sums, so apply it one h at a time
        return torch.stack([rounding_regularizer(v.reshape(1), b) for v in h]).numpy()

    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0))
    else:
        axes = np.atleast_1d(ax)
        if len(axes) != 2:
            raise ValueError("ax must be two axes (left and right panel)")
        fig = axes[0].figure
    mine = lam * regulariser(beta)
    for b in (20.0, 8.0, 2.0):
        if b != beta:
            axes[0].plot(h, lam * regulariser(b), lw=1, ls=":", label=f"β = {b:g}")
    axes[0].plot(h, mine, lw=2, color="black", label=f"β = {beta:g}")
    axes[0].set(xlabel="h", ylabel="λ (1 − |2h − 1|^β)", title=f"regulariser, λ = {lam:g}")
    axes[0].legend(fontsize=8)
    minima = {}
    for t in targets:
        total = (h.numpy() - t) ** 2 + mine
        best = float(h[int(np.argmin(total))])
        minima[float(t)] = best
        line, = axes[1].plot(h, total, label=f"t = {t:g}")
        axes[1].plot([best], [total.min()], "o", color=line.get_color())
    axes[1].set(xlabel="h", ylabel="(h − t)² + regulariser", title="toy objective (dots: minima)")
    axes[1].legend(fontsize=8)
    return fig, minima


def rounding_explorer(lam: float = 0.01, beta: float = 20.0):
    """Sliders for ``lambda`` (log scale) and ``beta`` over :func:`draw_rounding_objective`."""
    import ipywidgets as widgets

    def show(lam, beta):
        draw_rounding_objective(lam, beta)
        plt.show()

    return widgets.interactive(
        show,
        lam=widgets.FloatLogSlider(value=check_float(lam, "lam", 0.0, low_open=True), base=10, min=-3, max=0,
                                   step=0.1, description="λ"),
        beta=widgets.FloatSlider(value=check_float(beta, "beta", 0.0, low_open=True), min=1.0, max=20.0,
                                 step=0.5, description="β"))


def _allocation_choices(costs) -> list[int]:
    """The candidate widths of a ``{layer: {bits: cost}}`` mapping (the first layer's, sorted)."""
    choices = sorted(next(iter(costs.values()))) if isinstance(costs, dict) and costs else []
    if not choices:
        raise ValueError("costs must be a non-empty dict of layer name -> {bits: cost}")
    return choices


def draw_allocation(costs: dict, sizes: dict, average_bits: float, ax=None):
    """The optimal bit width per layer (:func:`qlib.sensitivity.allocate_bits`) at a size budget of
    ``average_bits`` per weight, as bars whose width is the layer's share of the weights.

    Returns ``(figure, allocation)``.
    """
    from .sensitivity import allocate_bits

    if not isinstance(sizes, dict) or not sizes:
        raise ValueError("sizes must be a non-empty dict of layer name -> number of weights")
    choices = _allocation_choices(costs)
    average_bits = check_float(average_bits, "average_bits", choices[0], choices[-1])
    total = sum(sizes.values())
    allocation = allocate_bits(costs, sizes, average_bits * total)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 3.0))
    else:
        fig = ax.figure
    left, centres = 0.0, []
    for name, n in sizes.items():
        share = n / total
        ax.bar(left, allocation.bits[name], width=share, align="edge", edgecolor="white",
               color=plt.cm.viridis((allocation.bits[name] - choices[0]) / max(1, choices[-1] - choices[0])))
        centres.append(left + share / 2)
        left += share
    ax.axhline(allocation.size / total, color="black", ls="--", lw=1,
               label=f"average {allocation.size / total:.2f} bits")
    ax.set(xlim=(0, 1), ylim=(0, choices[-1] + 0.5), yticks=choices, ylabel="weight bits",
           xlabel="layer (bar width: its share of the weights)",
           title=f"budget {average_bits:.2f} bits per weight")
    ax.set_xticks(centres)
    ax.set_xticklabels(list(sizes), rotation=60, ha="right", fontsize=8)
    ax.grid(False, axis="x")
    ax.legend(fontsize=8, loc="upper right")
    return fig, allocation


def allocation_explorer(costs: dict, sizes: dict, average_bits: float = 3.0):
    """A slider for the size budget (bits per weight) over :func:`draw_allocation`."""
    import ipywidgets as widgets

    choices = _allocation_choices(costs)

    def show(average_bits):
        draw_allocation(costs, sizes, average_bits)
        plt.show()

    return widgets.interactive(show, average_bits=widgets.FloatSlider(
        value=check_float(average_bits, "average_bits", choices[0], choices[-1]), min=choices[0],
        max=choices[-1], step=0.125, description="bits/weight"))


def _lsb_differences(d, name: str) -> np.ndarray:
    """Absolute code differences as int64; refuses empty, negative or fractional values."""
    if not isinstance(d, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(d).__name__}")
    d = as_float64_numpy(d)
    if d.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(d).all() or (d < 0).any() or (d != np.round(d)).any():
        raise ValueError(f"{name} must hold non-negative whole numbers (absolute code differences)")
    return d.astype(np.int64)


def draw_lsb_histogram(diffs: dict, ax=None, title: str = ""):
    """Bar chart of how many outputs differ by 0, 1, 2, ... LSB, for each named comparison.

    ``diffs`` maps a label to an integer tensor/array of absolute code differences.
    Returns ``(figure, stats)`` with the share of exact outputs and the maximum per label.
    """
    if not isinstance(diffs, dict) or not diffs:
        raise ValueError("diffs must be a non-empty dict mapping a label to code differences")
    arrays = {label: _lsb_differences(d, f"diffs[{label!r}]") for label, d in diffs.items()}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3))
    stats, width = {}, 0.8 / len(arrays)
    for i, (label, d) in enumerate(arrays.items()):
        counts = np.bincount(d.ravel())
        stats[label] = {"exact": float(counts[0] / d.size), "max": int(d.max()),
                        "within_1": float(counts[:2].sum() / d.size)}
        ax.bar(np.arange(len(counts)) + i * width, counts / d.size, width=width, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="|difference| in output codes (LSB)", ylabel="share of outputs", title=title)
    ax.legend(fontsize=8)
    return fig, stats
