"""Intervals over seeds: mean ± 95 % Student t half-width, and paired differences by seed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from common import schema
from simulations.reports.records import epsilon_label

PAIRED_TARGET = 0.03  # the half-width that issue 15's experiment aims for (paired differences)

# the tidy table's columns of the final accuracy and loss
_ACCURACY, _LOSS = schema.tidy_name(schema.ACCURACY), schema.tidy_name(schema.LOSS)


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student t interval: t_{(1+c)/2, n−1} · s / √n; nan if n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    quantile = stats.t.ppf((1 + confidence) / 2, len(x) - 1)
    return float(x.mean()), float(quantile * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(final: pd.DataFrame,
              by: tuple[str, ...] = (schema.METHOD, schema.EPSILON_BUDGET, schema.ALPHA)
              ) -> pd.DataFrame:
    """Mean ± 95 % t-interval of the final accuracy over seeds, one row per ``by`` group."""
    rows = []
    for key, group in final.groupby(list(by), sort=False):
        mean, half = t_interval(group[_ACCURACY])
        rows.append({**dict(zip(by, key, strict=True)), schema.N_RUNS: len(group),
                     schema.MEAN: mean,
                     schema.SD: group[_ACCURACY].std(ddof=1) if len(group) > 1 else math.nan,
                     schema.CI95: half, _LOSS: group[_LOSS].mean()})
    return pd.DataFrame(rows, columns=[*by, schema.N_RUNS, schema.MEAN, schema.SD, schema.CI95,
                                       _LOSS])


def paired_differences(final: pd.DataFrame, reference: str = "fedsvd") -> pd.DataFrame:
    """``reference`` minus every other method, paired by (ε, α, seed): mean ± 95 % t-interval.

    Runs with the same seed share the data partition and the server's client sampling, so the
    per-seed difference removes that part of the run-to-run spread. One row per method, ε, α
    with the columns of :func:`summarize` (``mean`` is the mean difference; positive:
    ``reference`` ahead); empty if ``reference`` has no run.
    """
    keys = [schema.EPSILON_BUDGET, schema.ALPHA, schema.SEED]
    ref = final[final[schema.METHOD] == reference][[*keys, _ACCURACY, _LOSS]]
    others = final[final[schema.METHOD] != reference]
    paired = others.merge(ref, on=keys, suffixes=("", "_ref"))
    paired[_ACCURACY] = paired[f"{_ACCURACY}_ref"] - paired[_ACCURACY]
    return summarize(paired)


def target_line(paired: pd.DataFrame, target: float = PAIRED_TARGET) -> str:
    """How many paired differences (n ≥ 2 seeds) have a 95 % half-width ≤ ``target``."""
    rated = paired[paired[schema.N_RUNS] >= 2]
    if rated.empty:
        return f"Target: a paired half-width ≤ {target:g}; no comparison has two seeds yet."
    met = int((rated[schema.CI95] <= target).sum())
    widest = rated.loc[rated[schema.CI95].idxmax()]
    return (f"Target: a paired half-width ≤ {target:g}; met by {met} of {len(rated)} "
            f"comparisons with n ≥ 2 (widest: {widest[schema.METHOD]} at ε = "
            f"{epsilon_label(widest[schema.EPSILON_BUDGET])}, ± {widest[schema.CI95]:.4f} with "
            f"n = {int(widest[schema.N_RUNS])}).")
