"""Figures and explorers: the numbers they show, and that they render."""

from fractions import Fraction

import ipywidgets
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from qlib import plots  # noqa: E402
from qlib.affine import qparams_from_range, quantization_mse  # noqa: E402


def test_book_style_is_opaque():
    plots.use_book_style()
    assert matplotlib.rcParams["savefig.transparent"] is False
    assert matplotlib.colors.to_rgba(matplotlib.rcParams["figure.facecolor"])[3] == 1.0


def test_draw_quantization_stats():
    x = np.random.default_rng(0).normal(size=5000)
    fig, stats = plots.draw_quantization(x, bits=3, clip=1.0)
    qp = qparams_from_range(-1.0, 1.0, 3, "symmetric", True)
    assert stats["mse"] == pytest.approx(quantization_mse(x, qp))
    assert stats["clipped"] == pytest.approx(np.mean((x < qp.real_range[0]) | (x > qp.real_range[1])))
    assert len(fig.axes) == 1
    _, minmax = plots.draw_quantization(x, bits=3)
    assert minmax["clipped"] == 0.0


def test_draw_channel_ranges_stats():
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 0, 8).reshape(8, 1, 1, 1)
    _, stats = plots.draw_channel_ranges(w, bits=4)
    assert stats["sqnr_per_channel_db"] > stats["sqnr_per_tensor_db"]
    amax = w.reshape(8, -1).abs().amax(1)
    assert stats["range_ratio"] == pytest.approx((amax.max() / amax.min()).item(), rel=1e-5)


def test_explorers_build_and_update():
    x = np.random.default_rng(0).normal(size=1000)
    explorer = plots.quantization_explorer(x, bits=4)
    assert isinstance(explorer, ipywidgets.interactive)
    sliders = {c.description: c for c in explorer.children if hasattr(c, "description")}
    sliders["bits"].value = 2  # moving a slider re-draws without error
    sliders["clip / max|x|"].value = 0.5
    layers = {"a": torch.randn(4, 3), "b": torch.randn(5, 2)}
    gran = plots.granularity_explorer(layers, bits=3)
    menu = next(c for c in gran.children if isinstance(c, ipywidgets.Dropdown))
    menu.value = "b"


def test_bad_input():
    with pytest.raises(ValueError, match="clip must be > 0.0"):
        plots.draw_quantization(np.ones(3), clip=0.0)
    with pytest.raises(ValueError, match="bits must be in"):
        plots.draw_channel_ranges(np.ones((2, 2)), bits=1)
    with pytest.raises(ValueError, match="weights must be a non-empty dict"):
        plots.granularity_explorer({})


def test_publish_turns_numpy_scalars_into_python_numbers(monkeypatch):
    import myst_nb

    published = {}
    monkeypatch.setattr(myst_nb, "glue", lambda key, value, display: published.update({key: (value, display)}))
    plots.publish("acc", np.float64(96.5))
    plots.publish("n", np.int64(3))
    assert published == {"acc": (96.5, False), "n": (3, False)}
    assert type(published["acc"][0]) is float and type(published["n"][0]) is int


def _round_half_away(f: Fraction) -> int:
    return int(f.numerator * 2 + f.denominator) // (2 * f.denominator) if f >= 0 else -_round_half_away(-f)


def _pipeline_vs_single_rounding(m0: int, shift: int, m: float, accs) -> float:
    """Share of accumulators where SRDHM then a rounding right shift (Python integers) differs from
    rounding ``acc * m`` once, both half away from zero (no ties of SRDHM occur for these inputs)."""
    twice = [_round_half_away(Fraction(_round_half_away(Fraction(a * int(m0), 2**31)), 2**-int(shift))) for a in accs]
    once = [_round_half_away(a * Fraction(m)) for a in accs]
    return float(np.mean([t != o for t, o in zip(twice, once)]))


@pytest.mark.parametrize("scales", [(0.1, 0.2, 0.05), (0.02, 0.004, 0.08), (0.7, 1.0, 1.0)])
def test_draw_multiplier_stats_match_exact_references(scales):
    fig, stats = plots.draw_multiplier(*scales, acc_range=3000)
    m = scales[0] * scales[1] / scales[2]
    assert stats["M"] == m and 2**30 <= stats["M0"] < 2**31  # M0 is a Q31 number in [0.5, 1)
    assert stats["rel_error"] == pytest.approx(float(
        abs(Fraction(int(stats["M0"]), 2**31) * Fraction(2) ** int(stats["shift"]) - Fraction(m)) / Fraction(m)))
    assert stats["rel_error"] < 2**-30
    assert stats["differs"] == pytest.approx(_pipeline_vs_single_rounding(
        stats["M0"], stats["shift"], m, range(-3000, 3001)))
    assert stats["max_diff"] <= 1
    assert len(fig.axes) == 1


def test_draw_multiplier_two_roundings_differ_only_after_a_shift():
    assert plots.draw_multiplier(0.1, 0.2, 0.05)[1]["differs"] > 0.1  # M = 0.4: n = 1
    # M in [0.5, 1): no shift, so only ties of acc * M can differ (M0 != M below 2^-31): 1 in 10 here
    one = plots.draw_multiplier(0.7, 1.0, 1.0, acc_range=3000)[1]
    assert one["shift"] == 0 and one["differs"] <= 0.1 + 1e-9


def test_multiplier_explorer_builds_and_updates():
    explorer = plots.multiplier_explorer()
    assert isinstance(explorer, ipywidgets.interactive)
    sliders = {c.description: c for c in explorer.children if hasattr(c, "description")}
    assert set(sliders) >= {"S1", "S2", "S3"}
    sliders["S3"].value = 0.001  # M = 20 > 1: a left shift, re-drawn without error


def test_draw_lsb_histogram_stats():
    d = {"engine": torch.tensor([0, 0, 0, 1, 2, 0, 1, 0]), "torch": np.array([0.0, 3.0])}
    fig, stats = plots.draw_lsb_histogram(d, title="t")
    assert stats["engine"] == {"exact": 5 / 8, "max": 2, "within_1": 7 / 8}
    assert stats["torch"] == {"exact": 0.5, "max": 3, "within_1": 0.5}
    assert fig.axes[0].get_title() == "t"


@pytest.mark.parametrize("diffs, error, match", [
    ({}, ValueError, "non-empty dict"),
    ([np.zeros(3)], ValueError, "non-empty dict"),
    ({"a": [0, 1]}, TypeError, r"diffs\['a'\] must be a numpy array"),
    ({"a": torch.zeros(0)}, ValueError, "is empty"),
    ({"a": torch.tensor([0, -1])}, ValueError, "non-negative whole numbers"),
    ({"a": np.array([0.5])}, ValueError, "non-negative whole numbers"),
    ({"a": np.array([np.nan])}, ValueError, "non-negative whole numbers"),
])
def test_draw_lsb_histogram_bad_input(diffs, error, match):
    with pytest.raises(error, match=match):
        plots.draw_lsb_histogram(diffs)


def test_draw_multiplier_bad_input():
    with pytest.raises(ValueError, match="s2 must be > 0.0"):
        plots.draw_multiplier(0.1, 0.0, 0.1)
    with pytest.raises(ValueError, match="acc_range must be"):
        plots.draw_multiplier(acc_range=0)


def test_rounding_objective_minima_follow_the_algebra():
    # no regulariser: the minimum is the target itself
    _, minima = plots.draw_rounding_objective(0.0, 20.0, targets=(0.3, 0.45))
    assert minima == pytest.approx({0.3: 0.3, 0.45: 0.45}, abs=1e-3)
    # beta = 2: (h - t)^2 + 4 lam h (1 - h) is concave for lam > 1/4, so the nearer end wins
    _, minima = plots.draw_rounding_objective(0.5, 2.0, targets=(0.45, 0.55))
    assert minima == {0.45: 0.0, 0.55: 1.0}
    # beta = 2 and lam < 1/4: the interior minimum t (1 - 4 lam) ... solves 2(h - t) + 4 lam (1 - 2h) = 0
    lam, t = 0.1, 0.3
    _, minima = plots.draw_rounding_objective(lam, 2.0, targets=(t,))
    assert minima[t] == pytest.approx((t - 2 * lam) / (1 - 4 * lam), abs=1e-3)
    plt_close()


def test_rounding_objective_and_explorer_refuse_bad_arguments():
    with pytest.raises(ValueError, match="targets"):
        plots.draw_rounding_objective(targets=(1.5,))
    with pytest.raises(ValueError, match="beta"):
        plots.draw_rounding_objective(beta=0.0)
    with pytest.raises(ValueError, match="lam"):
        plots.draw_rounding_objective(lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        plots.rounding_explorer(lam=0.0)  # a log slider cannot start at 0
    explorer = plots.rounding_explorer(0.05, 4.0)
    assert isinstance(explorer, ipywidgets.interactive)
    explorer.children[1].value = 2.0  # moving beta redraws without error
    plt_close()


def plt_close():
    import matplotlib.pyplot as plt

    plt.close("all")


def test_draw_allocation_shows_the_optimum_and_the_explorer_moves_it():
    costs = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 0.3, 4: 0.2, 8: 0.0}}
    sizes = {"a": 10, "b": 100}
    fig, allocation = plots.draw_allocation(costs, sizes, 280 / 110)
    assert allocation.bits == {"a": 8, "b": 2}  # the hand-solved case of tests/test_sensitivity.py
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == [2, 8]
    widths = sorted(round(p.get_width(), 6) for p in fig.axes[0].patches)
    assert widths == [round(10 / 110, 6), round(100 / 110, 6)]  # bar width: the layer's share of weights
    matplotlib.pyplot.close(fig)
    explorer = plots.allocation_explorer(costs, sizes, 3.0)
    slider = next(c for c in explorer.children if isinstance(c, ipywidgets.FloatSlider))
    slider.value = 8.0
    with pytest.raises(ValueError, match="average_bits"):
        plots.draw_allocation(costs, sizes, 1.0)
    with pytest.raises(ValueError, match="costs must be"):
        plots.allocation_explorer({}, sizes)
