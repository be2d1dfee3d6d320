"""Print a run's metrics.csv as a Markdown table: ``fedsvd-summarize <run dir>``.

Also ``python -m simulations.summarize <run dir>``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from common import schema

COLUMNS = [  # (metrics.csv column of common.schema, header, format)
    (schema.ROUND, "round", "{:.0f}"),
    (schema.ACCURACY, "test accuracy", "{:.4f}"),
    (schema.BALANCED_ACCURACY, "balanced accuracy", "{:.4f}"),
    (schema.AUC, "AUC", "{:.4f}"),
    (schema.LOSS, "test loss", "{:.4f}"),
    (schema.EVAL_EXAMPLES, "eval examples", "{:.0f}"),
    (schema.TRAIN_LOSS, "train loss", "{:.4f}"),
    (schema.EPSILON_MEAN, "client ε mean", "{:.3f}"),
    (schema.EPSILON_MAX, "client ε max", "{:.3f}"),
    (schema.BYTES_UP, "MB up", "{:.2f}"),
    (schema.BYTES_DOWN, "MB down", "{:.2f}"),
    (schema.WALL_SECONDS, "wall s", "{:.0f}"),
]
MEGABYTES = {schema.BYTES_UP, schema.BYTES_DOWN}


def markdown_table(metrics_csv: Path) -> str:
    """One Markdown row per round; bytes shown in MB, missing values as '-'."""
    rows = list(csv.DictReader(metrics_csv.open()))
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key, "")
            if value == "":
                cells.append("-")
                continue
            number = float(value) / (1e6 if key in MEGABYTES else 1)
            cells.append(fmt.format(number))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of one run folder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run's results folder (with metrics.csv)")
    args = parser.parse_args(argv)
    path = args.run_dir / schema.METRICS_FILE
    if not path.is_file():
        parser.error(f"{path}: no such file (is {args.run_dir} a finished run's folder?)")
    print(markdown_table(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
