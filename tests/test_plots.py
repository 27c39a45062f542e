"""Figures and explorers: the numbers they show, and that they render."""

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
