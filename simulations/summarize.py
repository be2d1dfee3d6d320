"""Print a run's metrics.csv as a Markdown table: ``python -m simulations.summarize <run dir>``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

COLUMNS = [  # (csv column, header, format)
    ("round", "round", "{:.0f}"),
    ("accuracy", "test accuracy", "{:.4f}"),
    ("loss", "test loss", "{:.4f}"),
    ("eval-examples", "eval examples", "{:.0f}"),
    ("train-loss", "train loss", "{:.4f}"),
    ("epsilon-mean", "client ε mean", "{:.3f}"),
    ("epsilon-max", "client ε max", "{:.3f}"),
    ("bytes-up", "MB up", "{:.2f}"),
    ("bytes-down", "MB down", "{:.2f}"),
    ("wall-seconds", "wall s", "{:.0f}"),
]


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
            number = float(value) / (1e6 if key.startswith("bytes") else 1)
            cells.append(fmt.format(number))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(Path(sys.argv[1]) / "metrics.csv"))
