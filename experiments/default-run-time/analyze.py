"""Target 3 of issue 39 from the record alone: each candidate's time and accuracy, and the rule.

    python experiments/default-run-time/analyze.py

Per sub-record (``baseline`` and each candidate): the final test accuracy of seeds 0-2, the
whole ``flwr run`` of each cell in seconds (``attempts.csv``: the sweep's own clock, SuperLink
start-up included, the last "done" attempt of each cell) and the ServerApp's (the last round's
``wall-seconds``); the candidate minus the baseline paired by seed (mean ± 95 % t half-width).
The rule of the README marks the candidates that qualify.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
from simulations.reports.records import load_runs  # noqa: E402
from simulations.reports.statistics import t_interval  # noqa: E402

CANDIDATES = ("baseline", "eval-every-5", "max-length-48", "max-length-32", "rounds-4")
FLOOR = 0.44  # issue 39: no lower than today's 0.44-0.46


def cells(name: str) -> pd.DataFrame:
    """seed, accuracy, server_seconds and run_seconds of each complete cell of ``name``."""
    final = load_runs(ROOT / name, records=True).final
    frame = final[["run", "seed", "accuracy", "wall_seconds"]].rename(
        columns={"wall_seconds": "server_seconds"})
    attempts = ROOT / name / "attempts.csv"
    if attempts.is_file():
        done = pd.read_csv(attempts).query("status == 'done'").groupby("run").last()
        frame["run_seconds"] = frame["run"].map(done["seconds"])
    else:
        frame["run_seconds"] = float("nan")
    return frame


def main() -> int:
    """Print one row per sub-record; 0."""
    base = cells("baseline")
    print("| setting | seeds | accuracy | − baseline, paired | whole run, s (median) "
          "| ServerApp, s (median) | qualifies |")
    print("|---|---|---|---|---|---|---|")
    for name in CANDIDATES:
        frame = cells(name)
        if frame.empty:
            print(f"| {name} | 0 | | | | | not run |")
            continue
        mean, half = t_interval(frame["accuracy"])
        both = frame.merge(base, on="seed", suffixes=("", "_base"))
        diff, dhalf = t_interval(both["accuracy"] - both["accuracy_base"])
        ok = name != "baseline" and len(both) >= 2 and mean >= FLOOR and diff + dhalf >= 0
        print(f"| {name} | {len(frame)} | {mean:.4f} ± {half:.4f} | "
              + ("" if name == "baseline" else f"{diff:+.4f} ± {dhalf:.4f}") + " | "
              f"{frame['run_seconds'].median():.0f} | {frame['server_seconds'].median():.0f} | "
              + ("" if name == "baseline" else ("yes" if ok else "no")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
