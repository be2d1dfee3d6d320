"""Two recorded sweeps of the same cells under two settings, paired cell by cell.

python -m simulations.compare_records experiments/speed-paired/after experiments/speed-paired/before

Each argument is a record folder of ``python -m simulations.sweep --record DIR``. Cells with the
same name (method, ε, α, seed) in both are paired: the same partitions, evaluation subset,
initial adapter and, with seeded client sampling, the same clients each round; only the
setting that tells the folders apart differs (and the clients' OS-random DP noise). Prints the
final accuracy of each pair, the mean difference (first − second) with its 95 % t-interval,
and the wall time of each. Exit 2 if an argument is not a record folder (no ``cells/``),
1 if no cell is in both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.sweep_report import CELLS_DIR, is_record_folder, load_runs, t_interval


def paired_rows(first: Path, second: Path):
    """Final rows of the cells recorded in both folders, merged on the cell name."""
    a = load_runs(first, records=True).final
    b = load_runs(second, records=True).final
    columns = ["run", "accuracy", "wall_seconds"]
    return a[columns].merge(b[columns], on="run", suffixes=("_first", "_second"))


def main(argv: list[str] | None = None) -> int:
    """Print the paired comparison; 2 if a folder is not a record folder, 1 if no cell is shared."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not is_record_folder(folder):
            print(f"[compare] {folder} is not a record folder (no {folder / CELLS_DIR}/): give "
                  "the --record DIR of a sweep", file=sys.stderr)
            return 2
    pairs = paired_rows(args.first, args.second)
    if pairs.empty:
        print(f"[compare] no cell is recorded in both {args.first} and {args.second}")
        return 1
    print(f"{'cell':<32}{'first':>9}{'second':>9}{'diff':>9}{'s first':>9}{'s second':>10}")
    for row in pairs.itertuples():
        print(f"{row.run:<32}{row.accuracy_first:>9.4f}{row.accuracy_second:>9.4f}"
              f"{row.accuracy_first - row.accuracy_second:>+9.4f}{row.wall_seconds_first:>9.0f}"
              f"{row.wall_seconds_second:>10.0f}")
    mean, half = t_interval(pairs["accuracy_first"] - pairs["accuracy_second"])
    print(f"first − second: {mean:+.4f} ± {half:.4f} (95 % t-interval, n = {len(pairs)}); "
          f"wall time {pairs['wall_seconds_first'].mean():.0f} s against "
          f"{pairs['wall_seconds_second'].mean():.0f} s per cell "
          f"({pairs['wall_seconds_second'].mean() / pairs['wall_seconds_first'].mean():.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
