"""Recorded sweeps of the same cells under different settings, each paired with the first.

python -m simulations.compare_records experiments/speed-paired/after experiments/speed-paired/before
python -m simulations.compare_records experiments/head-pilot/* --markdown
python -m simulations.compare_records experiments/main experiments/head-trained --by-method
python -m simulations.compare_records experiments/sms-check/defaults-names \
    experiments/sms-check/defaults-names-prior --metric balanced_accuracy

Each argument is a record folder of ``python -m simulations.sweep --record DIR``. Cells with the
same name (method, ε, α, seed) in the first folder and another are paired: the same partitions,
evaluation subset, initial adapter and, with seeded client sampling, the same clients each
round; only the setting that tells the folders apart differs (and the clients' OS-random DP
noise). For every folder after the first it prints the final value of ``--metric`` (accuracy,
balanced_accuracy or auc; default accuracy) of each pair, the mean difference (that folder − the
first) with its 95 % t-interval, the wall time and the precision each computed in
(``compute_dtype`` of :mod:`simulations.reports.records`); ``--by-method`` adds the paired
difference of each method's cells alone; ``--markdown`` then prints one table row per folder,
with the first folder's mean over the same cells beside it. A cell recorded without the metric
(before it was logged) pairs with nothing.
Exit 2 if an argument is not a record folder (no ``cells/``), 1 if some folder shares no cell
with the first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from common import schema
from simulations.reports.records import CELLS_DIR, is_record_folder, load_runs
from simulations.reports.statistics import t_interval

# the final-round columns it can pair (tidy names), the first by default
METRICS = tuple(map(schema.tidy_name, (schema.ACCURACY, schema.BALANCED_ACCURACY, schema.AUC)))
_WALL = schema.tidy_name(schema.WALL_SECONDS)  # tidy column


def paired_rows(first: Path, second: Path, metric: str = METRICS[0]) -> pd.DataFrame:
    """Final rows of the cells recorded in both folders with ``metric``, merged on the name.

    The merged frame has ``<metric>_first`` and ``<metric>_second`` (and the same for
    ``wall_seconds`` and ``compute_dtype``).
    """
    columns = [schema.RUN, schema.METHOD, metric, _WALL, schema.COMPUTE_DTYPE]
    a, b = (load_runs(folder, records=True).final[columns].dropna(subset=[metric])
            for folder in (first, second))
    return a.merge(b.drop(columns=schema.METHOD), on=schema.RUN, suffixes=("_first", "_second"))


def print_pairs(pairs: pd.DataFrame, first: Path, other: Path, metric: str = METRICS[0]
                ) -> None:
    """Each pair's final ``metric`` and wall seconds, then ``other`` − ``first``, its interval."""
    this, ref = pairs[f"{metric}_second"], pairs[f"{metric}_first"]
    print(f"{other} against {first}: final {metric}")
    print(f"{'cell':<32}{'this':>9}{'first':>9}{'diff':>9}{'s this':>9}{'s first':>10}"
          "  computed in (this / first)")
    wall, wall_ref = pairs[f"{_WALL}_second"], pairs[f"{_WALL}_first"]
    dtype, dtype_ref = (pairs[f"{schema.COMPUTE_DTYPE}_{s}"] for s in ("second", "first"))
    for run, a, b, s, s_ref, d, d_ref in zip(pairs[schema.RUN], this, ref, wall, wall_ref,
                                             dtype, dtype_ref, strict=True):
        print(f"{run:<32}{a:>9.4f}{b:>9.4f}{a - b:>+9.4f}{s:>9.0f}{s_ref:>10.0f}  {d} / {d_ref}")
    mean, half = t_interval(this - ref)
    print(f"this − first: {mean:+.4f} ± {half:.4f} (95 % t-interval, n = {len(pairs)}); "
          f"wall time {wall.mean():.0f} s against {wall_ref.mean():.0f} s per cell "
          f"({wall_ref.mean() / wall.mean():.2f}× the first's speed)\n")


def _paired_difference(pairs: pd.DataFrame, metric: str) -> str:
    """Mean ``this − first`` of ``pairs``, signed, with "± half-width" (95 % t) when n > 1."""
    mean, half = t_interval(pairs[f"{metric}_second"] - pairs[f"{metric}_first"])
    return f"{mean:+.4f}" + (f" ± {half:.4f}" if len(pairs) > 1 else "")


def print_by_method(pairs: pd.DataFrame, metric: str = METRICS[0]) -> None:
    """Each method's pairs alone: ``this − first`` with its 95 % t-interval."""
    for method, group in pairs.groupby(schema.METHOD, sort=False):
        print(f"  {method:<10} this {group[f'{metric}_second'].mean():.4f}, first "
              f"{group[f'{metric}_first'].mean():.4f}: this − first "
              f"{_paired_difference(group, metric)} (n = {len(group)})")
    print()


def markdown_rows(first: Path, paired: dict[Path, pd.DataFrame], metric: str = METRICS[0]
                  ) -> list[str]:
    """One table row per folder: cells, mean final ``metric``, paired difference to the first.

    ``paired``: each other folder's :func:`paired_rows` with ``first``. A row's "first, same
    cells" is the first folder's mean over that row's paired cells only (the first row's mean is
    over all of its cells), so a row compares like with like when the folders hold different
    seeds.
    """
    reference = load_runs(first, records=True).final.dropna(subset=[metric])
    label = metric.replace("_", " ")
    rows = [f"| record folder | cells | final {label} (mean) | first, same cells | "
            "− first (95 % t) | s per cell |",
            "|---|---|---|---|---|---|",
            f"| `{first}` | {len(reference)} | {reference[metric].mean():.4f} | | "
            f"(reference) | {reference[_WALL].mean():.0f} |"]
    for other, pairs in paired.items():
        interval = _paired_difference(pairs, metric) + ("" if len(pairs) > 1 else " (n = 1)")
        rows.append(f"| `{other}` | {len(pairs)} | {pairs[f'{metric}_second'].mean():.4f} | "
                    f"{pairs[f'{metric}_first'].mean():.4f} | {interval} | "
                    f"{pairs[f'{_WALL}_second'].mean():.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the comparisons; 2 if a folder is not a record folder, 1 if one shares no cell."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="the reference record folder")
    parser.add_argument("others", type=Path, nargs="+", help="record folders paired with it")
    parser.add_argument("--markdown", action="store_true",
                        help="also one markdown table row per folder")
    parser.add_argument("--by-method", action="store_true",
                        help="also the paired difference of each method's cells alone")
    parser.add_argument("--metric", choices=METRICS, default=METRICS[0],
                        help=f"the final-round column to pair (default {METRICS[0]})")
    args = parser.parse_args(argv)
    for folder in (args.first, *args.others):
        if not is_record_folder(folder):
            print(f"[compare] {folder} is not a record folder (no {folder / CELLS_DIR}/): give "
                  "the --record DIR of a sweep", file=sys.stderr)
            return 2
    paired = {other: paired_rows(args.first, other, args.metric) for other in args.others}
    unpaired = [other for other, pairs in paired.items() if pairs.empty]
    for other, pairs in paired.items():
        if not pairs.empty:
            print_pairs(pairs, args.first, other, args.metric)
            if args.by_method:
                print_by_method(pairs, args.metric)
    if unpaired:
        print(f"[compare] no cell is recorded in both {args.first} and "
              f"{', '.join(map(str, unpaired))}")
        return 1
    if args.markdown:
        print("\n".join(markdown_rows(args.first, paired, args.metric)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
