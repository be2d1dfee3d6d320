"""Intervals over seeds: mean ± 95 % Student t half-width, and paired differences by seed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from simulations.reports.records import epsilon_label

PAIRED_TARGET = 0.03  # the half-width that issue 15's experiment aims for (paired differences)


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student t interval: t_{(1+c)/2, n−1} · s / √n; nan if n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    quantile = stats.t.ppf((1 + confidence) / 2, len(x) - 1)
    return float(x.mean()), float(quantile * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(final: pd.DataFrame, by: tuple[str, ...] = ("method", "epsilon", "alpha")
              ) -> pd.DataFrame:
    """Mean ± 95 % t-interval of the final accuracy over seeds, one row per ``by`` group."""
    rows = []
    for key, group in final.groupby(list(by), sort=False):
        mean, half = t_interval(group["accuracy"])
        rows.append({**dict(zip(by, key, strict=True)), "n": len(group), "mean": mean,
                     "sd": group["accuracy"].std(ddof=1) if len(group) > 1 else math.nan,
                     "ci95": half, "loss": group["loss"].mean()})
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "sd", "ci95", "loss"])


def paired_differences(final: pd.DataFrame, reference: str = "fedsvd") -> pd.DataFrame:
    """``reference`` minus every other method, paired by (ε, α, seed): mean ± 95 % t-interval.

    Runs with the same seed share the data partition and the server's client sampling, so the
    per-seed difference removes that part of the run-to-run spread. One row per method, ε, α
    with the columns of :func:`summarize` (``mean`` is the mean difference; positive:
    ``reference`` ahead); empty if ``reference`` has no run.
    """
    keys = ["epsilon", "alpha", "seed"]
    ref = final[final["method"] == reference][[*keys, "accuracy", "loss"]]
    others = final[final["method"] != reference]
    paired = others.merge(ref, on=keys, suffixes=("", "_ref"))
    paired = paired.assign(accuracy=paired["accuracy_ref"] - paired["accuracy"])
    return summarize(paired)


def target_line(paired: pd.DataFrame, target: float = PAIRED_TARGET) -> str:
    """How many paired differences (n ≥ 2 seeds) have a 95 % half-width ≤ ``target``."""
    rated = paired[paired["n"] >= 2]
    if rated.empty:
        return f"Target: a paired half-width ≤ {target:g}; no comparison has two seeds yet."
    met = int((rated["ci95"] <= target).sum())
    widest = rated.loc[rated["ci95"].idxmax()]
    return (f"Target: a paired half-width ≤ {target:g}; met by {met} of {len(rated)} "
            f"comparisons with n ≥ 2 (widest: {widest['method']} at ε = "
            f"{epsilon_label(widest['epsilon'])}, ± {widest['ci95']:.4f} with n = "
            f"{int(widest['n'])}).")
