"""Target 2 of issue 39 from the record's cells alone: whether ε = ∞ is clearly above ε = 3.

    python experiments/new-task-defaults/analyze.py

Per task (``sms``: balanced accuracy, the mean of the two recalls, since 86.6 % of the messages
are ham; ``topics``: accuracy), the final round's value of each cell, then ε = ∞ minus ε = 3
paired by seed: mean ± 95 % t half-width. The rule (README): met on a task when that interval
lies above 0. Also each task's ε = 3 cells against the same cells under the previous defaults
where a record of them exists (SMS: experiments/sms-check/defaults-names, plain averaging at
client rate 1, no update bounds), paired by seed.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
from simulations.reports.records import load_runs  # noqa: E402
from simulations.reports.statistics import t_interval  # noqa: E402

TASKS = {"sms": "balanced_accuracy", "topics": "accuracy"}  # the tidy columns of load_runs
# the same cells (FedSVD, ε = 3, seeds 0-2) under the defaults before FedAdam, where recorded
PREVIOUS = {"sms": ROOT.parent / "sms-check" / "defaults-names"}


def finals(folder: Path, metric: str) -> pd.DataFrame:
    """epsilon, seed and the final round's ``metric`` (as "value") of every complete cell."""
    final = load_runs(folder, records=True).final
    return final[["epsilon", "seed", metric]].rename(columns={metric: "value"})


def paired(left: pd.DataFrame, right: pd.DataFrame) -> tuple[float, float, int]:
    """Mean ± half-width of left − right, matched on seed; and the number of pairs."""
    both = left.merge(right, on="seed", suffixes=("", "_right"))
    mean, half = t_interval(both["value"] - both["value_right"])
    return mean, half, len(both)


def main() -> int:
    """Print the table and the rule's verdict per task; 0."""
    print("| task | metric | ε = 3 | ε = ∞ | ∞ − 3, paired | target 2 "
          "| ε = 3: new − previous defaults |")
    print("|---|---|---|---|---|---|---|")
    for task, metric in TASKS.items():
        frame = finals(ROOT / task, metric)
        if frame.empty:
            print(f"| {task} | {metric} | | | | no cells yet | |")
            continue
        three, free = frame[frame["epsilon"] == 3.0], frame[frame["epsilon"] == math.inf]
        diff, half, n = paired(free, three)
        verdict = ("met" if half - diff < 0 else "not met") if n >= 2 else "too few pairs"
        before = ""
        if task in PREVIOUS and (PREVIOUS[task] / "cells").is_dir():
            old = finals(PREVIOUS[task], metric)
            d, h, k = paired(three, old[old["epsilon"] == 3.0])
            before = f"{d:+.4f} ± {h:.4f} (n = {k})"
        print(f"| {task} | {metric} | {t_interval(three['value'])[0]:.4f} ± "
              f"{t_interval(three['value'])[1]:.4f} | {t_interval(free['value'])[0]:.4f} ± "
              f"{t_interval(free['value'])[1]:.4f} | {diff:+.4f} ± {half:.4f} (n = {n}) | "
              f"{verdict} | {before} |")
    print("\nAUC (one-vs-rest; what the model ranks, whatever argmax decides), reported beside the "
          "rule:\n")
    print("| task | ε = 3 | ε = ∞ | ∞ − 3, paired |")
    print("|---|---|---|---|")
    for task in TASKS:
        frame = finals(ROOT / task, "auc")
        three, free = frame[frame["epsilon"] == 3.0], frame[frame["epsilon"] == math.inf]
        diff, half, n = paired(free, three)
        print(f"| {task} | {t_interval(three['value'])[0]:.4f} | {t_interval(free['value'])[0]:.4f}"
              f" | {diff:+.4f} ± {half:.4f} (n = {n}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
