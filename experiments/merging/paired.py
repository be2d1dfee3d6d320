"""The merging record's paired result, recomputed from its per-run, per-round table.

Each target folder's ``merge.csv`` holds one row per run per round (``method``, ``epsilon``,
``seed``, ``round``, ``accuracy``, ...), as ``python -m simulations.merge_experiment`` wrote it.
This script takes every run's final round and prints, per ε, each method minus a reference
method, paired by seed: mean ± 95 % Student-t half-width
(:func:`simulations.reports.statistics.t_interval`), n and the per-seed differences.

    python experiments/merging/paired.py                       # target-sci, − scratch
    python experiments/merging/paired.py --reference merge-sv-axis-random
    python experiments/merging/paired.py --target rec

The script of the record ``experiments/merging`` (run by its path: it is not installed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from simulations.reports.statistics import t_interval

HERE = Path(__file__).resolve().parent


def final_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's last-round accuracy: rows (epsilon, seed), one column per method."""
    last = table[table["round"] == table["num_rounds"]]
    return last.pivot_table(index=["epsilon", "seed"], columns="method", values="accuracy")


def paired_rows(finals: pd.DataFrame, reference: str) -> list[str]:
    """``method − reference`` per ε, paired by seed, for every method with a seed in common."""
    lines = []
    for epsilon, by_seed in finals.groupby(level="epsilon"):
        if reference not in by_seed:
            continue
        for method in by_seed.columns.drop(reference):
            diff = (by_seed[method] - by_seed[reference]).dropna()
            if diff.empty:
                continue
            mean, half = t_interval(diff.to_numpy())
            spread = "" if len(diff) < 2 else f" ± {half:.4f}"
            seeds = ", ".join(f"{d:+.4f}" for d in diff)
            lines.append(f"ε = {epsilon:g}  {method} − {reference}: {mean:+.4f}{spread} "
                         f"(n = {len(diff)}; per seed {seeds})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the paired differences of one target; 2 if its table is missing, 1 if no reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sci", help="held-out group: sci (default) or rec")
    parser.add_argument("--reference", default="scratch", help="the method subtracted")
    args = parser.parse_args(argv)
    path = HERE / f"target-{args.target}" / "merge.csv"
    if not path.is_file():
        print(f"error: {path} not found (targets: sci, rec)", file=sys.stderr)
        return 2
    lines = paired_rows(final_accuracy(pd.read_csv(path)), args.reference)
    if not lines:
        print(f"error: no run of {args.reference!r} in {path}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
