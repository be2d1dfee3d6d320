"""The tables of experiments/intruders/README.md, by its rules, from the record's spectra alone.

    python experiments/intruders/analyze.py            # Markdown to stdout
    python experiments/intruders/analyze.py --write    # also into results.md beside this file

Reads ``<task>/spectrum/spectrum.csv`` (one row per run × LoRA layer) and
``<task>/spectrum/forgetting.csv`` (one row per run) of each task (``encoder``, ``causal-lm``)
that ``fedsvd-spectrum`` wrote from the record's adapters. Per run: the intruder count (the sum
over its layers), the intruder score (the mean over layers of ``min_similarity``) and the
forgetting. Prints per task each method × ε's mean ± 95 % t half-width over the seeds, the paired
differences of questions 1, 2 and 4 (by seed), and question 3's Spearman ρ between forgetting and
the count (the score where every count is 0) with a 95 % percentile bootstrap interval over runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
from simulations.reports.statistics import t_interval  # noqa: E402

TASKS = {"encoder": "encoder (20 Newsgroups, MiniLM)", "causal-lm": "causal LM (SmolLM2-135M)"}
NAMES = {"fedsvd": "FedSVD", "ffa": "FFA-LoRA", "fedavg": "FedAvg-LoRA"}
MEASURES = {"intruders": "intruder count", "score": "intruder score (mean of min similarity)",
            "forgetting": "forgetting"}
DRAWS, BOOTSTRAP_SEED = 10_000, 0
RESULTS = ROOT / "results.md"


def runs(task: str) -> pd.DataFrame:
    """One row per run: method, epsilon, seed, intruders (sum), score (mean), forgetting."""
    folder = ROOT / task / "spectrum"
    layers = pd.read_csv(folder / "spectrum.csv")
    per_run = layers.groupby(["run", "method", "epsilon", "seed"], as_index=False).agg(
        intruders=("intruders", "sum"), score=("min_similarity", "mean"),
        layers=("layer", "count"))
    forgetting = pd.read_csv(folder / "forgetting.csv")[["run", "forgetting"]]
    return per_run.merge(forgetting, on="run", how="left", validate="one_to_one")


def eps_label(eps: float) -> str:
    """ε as the tables print it (∞ for no DP)."""
    return "∞" if math.isinf(eps) else f"{eps:g}"


def interval(values) -> str:
    """"mean ± 95 % t half-width" over ``values`` (the mean alone for one value)."""
    mean, half = t_interval(list(values))
    return f"{mean:.4g}" if math.isnan(half) else f"{mean:.4g} ± {half:.3g}"


def by_arm(frame: pd.DataFrame) -> str:
    """Mean ± t half-width over seeds of each measure, one row per method and ε."""
    lines = ["| method | ε | runs | " + " | ".join(MEASURES.values()) + " |",
             "|---" * (3 + len(MEASURES)) + "|"]
    for (method, eps), group in frame.groupby(["method", "epsilon"], sort=True):
        cells = [interval(group[m].dropna()) for m in MEASURES]
        lines.append(f"| {NAMES.get(method, method)} | {eps_label(eps)} | {len(group)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(frame: pd.DataFrame, left: dict, right: dict, keys: list[str]) -> pd.DataFrame:
    """Rows of ``left`` minus rows of ``right`` (each a column filter), matched on ``keys``."""
    def pick(where: dict) -> pd.DataFrame:
        mask = np.ones(len(frame), dtype=bool)
        for column, value in where.items():
            mask &= (frame[column] == value).to_numpy()
        return frame[mask]
    both = pick(left).merge(pick(right), on=keys, suffixes=("", "_other"))
    return pd.DataFrame({m: both[m] - both[f"{m}_other"] for m in MEASURES} | {
        k: both[k] for k in keys})


def differences(frame: pd.DataFrame) -> str:
    """Questions 1 and 4 (FedSVD − each method, per ε) and 2 (each ε − ∞, per method)."""
    lines = ["| difference | pairs | " + " | ".join(MEASURES.values()) + " |",
             "|---" * (2 + len(MEASURES)) + "|"]
    methods = sorted(set(frame["method"]))
    epsilons = sorted(set(frame["epsilon"]))
    for eps in epsilons:
        for other in (m for m in methods if m != "fedsvd"):
            d = paired(frame, {"method": "fedsvd", "epsilon": eps},
                       {"method": other, "epsilon": eps}, ["seed"])
            if len(d):
                name = f"FedSVD − {NAMES.get(other, other)}, ε {eps_label(eps)}"
                lines.append(f"| {name} | {len(d)} | "
                             + " | ".join(interval(d[m].dropna()) for m in MEASURES) + " |")
    for method in methods:
        for eps in (e for e in epsilons if math.isfinite(e)):
            d = paired(frame, {"method": method, "epsilon": eps},
                       {"method": method, "epsilon": math.inf}, ["seed"])
            if len(d):
                lines.append(f"| {NAMES.get(method, method)}: ε {eps:g} − ∞ | {len(d)} | "
                             + " | ".join(interval(d[m].dropna()) for m in MEASURES) + " |")
    return "\n".join(lines)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Spearman's ρ of x and y, and its 95 % percentile bootstrap interval over the pairs.

    ``DRAWS`` resamplings of the n pairs with replacement (seed ``BOOTSTRAP_SEED``); a draw in
    which x or y is constant has no ρ and is left out. nan where ρ itself is undefined.
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = []
    for _ in range(DRAWS):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(stats.spearmanr(x[i], y[i]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5])
    return rho, float(low), float(high)


def correlation(frame: pd.DataFrame) -> str:
    """Question 3: ρ(forgetting, count), or ρ(forgetting, score) if every count is 0."""
    frame = frame.dropna(subset=["forgetting"])
    column = "intruders" if frame["intruders"].any() else "score"
    rho, low, high = spearman(frame[column].to_numpy(float), frame["forgetting"].to_numpy(float))
    what = MEASURES[column] + ("" if column == "intruders" else " (every count is 0)")
    if math.isnan(rho):
        return f"Spearman ρ(forgetting, {what}) over {len(frame)} runs: undefined (a constant)."
    return (f"Spearman ρ(forgetting, {what}) over {len(frame)} runs: **{rho:+.2f}** "
            f"(95 % bootstrap interval {low:+.2f} to {high:+.2f}; runs of one seed share a "
            "partition, so the interval is optimistic).")


def report() -> str:
    """The Markdown of every task whose spectrum is there."""
    parts = []
    for task, title in TASKS.items():
        if not (ROOT / task / "spectrum" / "spectrum.csv").is_file():
            parts.append(f"### {title}\n\nNo spectrum yet.")
            continue
        frame = runs(task)
        parts.append(f"### {title}\n\n{by_arm(frame)}\n\nPaired by seed (mean ± 95 % t "
                     f"half-width):\n\n{differences(frame)}\n\n{correlation(frame)}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the report (and write it with ``--write``); 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    args = parser.parse_args(argv)
    text = report()
    print(text, end="")
    if args.write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
