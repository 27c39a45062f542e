"""Experiments over seeds: summaries of repeated runs (chapters 4 to 11).

:func:`summarise` turns a tidy table of runs (one row per run, one column per measurement) into the
table a chapter shows: mean ± standard deviation per group, and the error ratio (quantized error /
float error) that makes accuracies at different baselines comparable.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._checks import check_int
from .train import mean_std

__all__ = ["summarise", "error_ratio"]


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
