"""Summaries of repeated runs."""

import numpy as np
import pandas as pd
import pytest

from qlib.experiments import error_ratio, paired_difference, paired_t, summarise


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


def test_paired_t_interval_by_hand():
    c = paired_t([91, 92, 93, 94, 95], [90, 90, 90, 90, 90])
    assert c.difference == pytest.approx(3.0) and c.per_seed == (1, 2, 3, 4, 5)
    half = 2.7764451 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5)      # t(0.975, 4)
    assert (c.low, c.high) == pytest.approx((3 - half, 3 + half))
    assert c.verdict == "better" and paired_t([90, 90, 91], [91, 91, 92]).verdict == "worse"
    assert paired_t([90, 92, 91], [91, 91, 91]).verdict == "inconclusive"
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        paired_t([1.0], [2.0])


def test_paired_difference_adds_the_test_sets_own_noise():
    rng = np.random.default_rng(0)
    baseline = rng.random((5, 1000)) < 0.9
    same = paired_difference(baseline, baseline)
    assert same.difference == 0 and same.low == same.high == 0 and same.verdict == "inconclusive"
    # the method fixes the same 20 examples for every seed: no seed spread, only test-set noise
    method = baseline.copy()
    fixed = np.flatnonzero(~baseline.all(axis=0))[:20]
    method[:, fixed] = True
    c = paired_difference(method, baseline)
    d = 100 * (method.astype(float) - baseline).mean(axis=0)
    expected_se = np.sqrt(np.var(100 * (method.astype(float) - baseline).mean(axis=1), ddof=1) / 5
                          + d.var(ddof=1) / 1000)
    assert c.high - c.difference == pytest.approx(2.7764451 * expected_se)
    assert c.difference > 0 and c.verdict == "better"
    assert "points" in c.describe()


def test_paired_difference_covers_a_null_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    trials = 300
    for _ in range(trials):
        ability = rng.random(400)                         # how easy each example is
        seed_shift = rng.normal(0, 0.03, (2, 5, 1))       # each run is a little better or worse
        runs = rng.random((2, 5, 400)) < np.clip(0.8 * ability + 0.15 + seed_shift, 0, 1)
        c = paired_difference(runs[0], runs[1])
        covered += c.low <= 0 <= c.high
    assert 0.9 <= covered / trials <= 0.995
