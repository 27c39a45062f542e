"""Experiments over seeds: summaries of repeated runs (chapters 4 to 11).

:func:`summarise` turns a tidy table of runs (one row per run, one column per measurement) into the
table a chapter shows: mean ± standard deviation per group, and the error ratio (quantized error /
float error) that makes accuracies at different baselines comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ._checks import check_float, check_int
from .train import mean_std

__all__ = ["summarise", "error_ratio", "Comparison", "paired_t", "paired_difference", "VERDICTS"]


def error_ratio(accuracy, reference) -> np.ndarray:
    """``(100 - accuracy) / (100 - reference)``: how many times the float network's error rate (both in %)."""
    accuracy, reference = np.asarray(accuracy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if (reference >= 100).any():
        raise ValueError("reference accuracy must be below 100 % (an error ratio divides by its error)")
    return (100 - accuracy) / (100 - reference)


def summarise(results: pd.DataFrame, by, columns: dict[str, str], ratio: str | dict[str, str] | None = None,
              reference: str = "float", digits: int = 2) -> pd.DataFrame:
    """Mean ± std of ``columns`` per group of ``by``, in the groups' order of appearance.

    ``columns`` maps a column of ``results`` to its heading in the summary; ``ratio``, if given, adds
    the error ratio of that column against ``reference`` (per run, then mean ± std), headed "error
    ratio" (or several: ``{column: heading}``). Missing values (a measurement some rows do not have)
    show as "–".
    """
    if not isinstance(results, pd.DataFrame) or results.empty:
        raise ValueError("results must be a non-empty pandas DataFrame")
    by = [by] if isinstance(by, str) else list(by)
    ratios = {} if ratio is None else {ratio: "error ratio"} if isinstance(ratio, str) else dict(ratio)
    measured = list(dict.fromkeys(list(columns) + list(ratios) + ([reference] if ratios else [])))
    missing = [c for c in measured + by if c not in results.columns]
    if missing:
        raise ValueError(f"results has no column {missing}; it has {list(results.columns)}")
    digits = check_int(digits, "digits", 0)

    def one(group):
        row = {heading: mean_std(group[column], digits) if group[column].notna().all() else "–"
               for column, heading in columns.items()}
        for column, heading in ratios.items():
            row[heading] = mean_std(error_ratio(group[column], group[reference]), digits)
        return pd.Series(row)

    return results.groupby(by, sort=False)[measured].apply(one)


# ---------------------------------------------------------------- paired comparisons -----

VERDICTS = ("better", "worse", "inconclusive")


@dataclass(frozen=True)
class Comparison:
    """A method against a baseline over the same seeds and test examples.

    ``difference``: the mean over seeds of (method - baseline) accuracy, in points; ``low`` and
    ``high``: its confidence interval; ``per_seed``: the paired differences; ``verdict``: "better"
    when the whole interval is above 0, "worse" when it is below, "inconclusive" otherwise.
    """

    difference: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    verdict: str
    method: str = "paired t"
    confidence: float = 0.95

    def describe(self, digits: int = 2) -> str:
        """``"+1.23 points [0.45, 2.01]"``: the difference with its interval."""
        return f"{self.difference:+.{digits}f} points [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "inconclusive"


def paired_t(method, baseline, confidence: float = 0.95) -> Comparison:
    """Paired per-seed differences with Student's t-interval (seeds are the only source of noise)."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"method and baseline need the same >= 2 seeds, got shapes {a.shape} and {b.shape}")
    confidence = check_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    d = a - b
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    mean = float(d.mean())
    return Comparison(mean, mean - half, mean + half, tuple(d.tolist()), _verdict(mean - half, mean + half),
                      "paired t, seeds", confidence)


def paired_difference(method_correct, baseline_correct, confidence: float = 0.95) -> Comparison:
    """Paired difference of two methods' accuracies over the same seeds and test examples.

    ``method_correct`` and ``baseline_correct`` are boolean arrays ``(seeds, examples)``: whether
    each seed's network got each test example right. The difference is the mean of the per-seed
    differences ``d_s``; its standard error adds the two sources of noise a reader should see:
    the training runs (the spread of ``d_s`` over seeds, ``var(d_s) / S``) and the finite test set
    (the variance over examples of the seed-averaged per-example difference, divided by their
    number ``N``; on 1,000 test images this alone is about 0.5-1 point). The interval is
    ``mean +- t_{S-1} SE`` (Student's t with the seeds' degrees of freedom, the conservative choice).
    """
    a = np.asarray(method_correct, dtype=bool)
    b = np.asarray(baseline_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError("method_correct and baseline_correct must be boolean (seeds >= 2, examples >= 2) arrays "
                         f"of one shape, got {a.shape} and {b.shape}")
    confidence = check_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    seeds, examples = a.shape
    diff = 100 * (a.astype(np.float64) - b.astype(np.float64))     # (seeds, examples), points
    per_seed = diff.mean(axis=1)
    se = np.sqrt(per_seed.var(ddof=1) / seeds + diff.mean(axis=0).var(ddof=1) / examples)
    half = stats.t.ppf(0.5 + confidence / 2, seeds - 1) * se
    mean = float(per_seed.mean())
    return Comparison(mean, mean - half, mean + half, tuple(per_seed.tolist()), _verdict(mean - half, mean + half),
                      "paired t, seeds and test examples", confidence)
