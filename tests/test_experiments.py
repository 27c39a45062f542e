"""Summaries of repeated runs."""

import numpy as np
import pandas as pd
import pytest

from qlib.experiments import error_ratio, summarise


def test_error_ratio():
    assert error_ratio(96.0, 98.0) == pytest.approx(2.0)
    assert np.allclose(error_ratio([90, 99], [99, 99.5]), [10.0, 2.0])
    with pytest.raises(ValueError, match="below 100"):
        error_ratio(90, 100)


def test_summarise_gives_mean_std_per_group_in_order_and_the_error_ratio():
    results = pd.DataFrame({"method": ["b", "b", "a", "a"], "seed": [0, 1, 0, 1], "float": [98.0, 98.0, 98.0, 96.0],
                            "QAT": [96.0, 94.0, 97.0, 92.0], "extra": [1.0, None, 2.0, 3.0]})
    table = summarise(results, "method", {"QAT": "after QAT (%)", "extra": "extra"}, ratio="QAT")
    assert list(table.index) == ["b", "a"]                        # the order of appearance
    assert table.loc["b", "after QAT (%)"] == "95.00 ± 1.41"
    assert table.loc["a", "error ratio"] == "1.75 ± 0.35"         # (1.5, 2.0)
    assert table.loc["b", "extra"] == "–" and table.loc["a", "extra"] == "2.50 ± 0.71"
    two = summarise(results, ["method"], {}, ratio={"QAT": "QAT ratio", "float": "float ratio"})
    assert list(two.columns) == ["QAT ratio", "float ratio"] and two.loc["b", "float ratio"] == "1.00 ± 0.00"
    with pytest.raises(ValueError, match="no column"):
        summarise(results, "method", {"nope": "x"})
    with pytest.raises(ValueError, match="non-empty"):
        summarise(pd.DataFrame(), "method", {})
