"""The tables and the rules of experiments/lr-transfer/README.md, recomputed from the cells alone.

    python experiments/lr-transfer/analyze.py            # Markdown to stdout
    python experiments/lr-transfer/analyze.py --write    # also rule 3's choice -> defaults.toml

Reads every ``<step>/cells/*.csv`` (the final round's validation accuracy of each cell), prints
per task and arm each method's mean ± 95 % t half-width over the seeds at each client rate, the
paired differences of the adam arm against plain averaging (by method, rate and seed), then
applies rules 2-5 of the README as written there. Steps with missing cells are reported as
incomplete and no rule that needs them is applied. With ``--write``, rule 3's choice for each
method (server optimizer, its rate, client rate) is written to ``defaults.toml`` beside this file:
the shipped run configs are tested against it (tests/test_run_config_files.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
from simulations.reports.statistics import t_interval  # noqa: E402

METHODS = ("fedsvd", "ffa", "fedavg")
RATES = (0.125, 0.5, 2.0)
SEEDS = (0, 1)
TASKS = {"20ng": "20 Newsgroups", "topics": "topic groups"}
ARMS = ("plain", "adam", "deltaw")
ETAS = ("0.003", "0.01", "0.03", "0.1", "0.3")
TARGET, TIE = 0.03, 0.005
DEFAULTS = ROOT / "defaults.toml"


def finals(step: str) -> pd.DataFrame:
    """One row per cell of ``step``: method, learning_rate, seed, accuracy (the last round's)."""
    rows = []
    for path in sorted((ROOT / step / "cells").glob("*.csv")):
        cell = pd.read_csv(path)
        last = cell[cell["round"] == cell["num_rounds"]]
        if len(last) == 1:
            rows.append(last.iloc[0][["method", "learning_rate", "seed", "accuracy"]])
    return pd.DataFrame(rows, columns=["method", "learning_rate", "seed", "accuracy"])


def complete(frame: pd.DataFrame, methods=METHODS, rates=RATES, seeds=SEEDS) -> bool:
    """Whether every (method, rate, seed) cell is there."""
    have = {(m, float(r), int(s)) for m, r, s in
            frame[["method", "learning_rate", "seed"]].itertuples(index=False)}
    return all((m, r, s) in have for m in methods for r in rates for s in seeds)


def means(frame: pd.DataFrame) -> dict[tuple[str, float], float]:
    """(method, rate) -> mean final accuracy over the seeds."""
    return {(m, float(r)): float(g["accuracy"].mean())
            for (m, r), g in frame.groupby(["method", "learning_rate"])}


def fmt(values) -> str:
    """Mean ± 95 % t half-width (the mean alone for one value)."""
    mean, half = t_interval(list(values))
    return f"{mean:.4f}" if half != half else f"{mean:.4f} ± {half:.4f}"


def pilot() -> str | None:
    """Rule 2: the η with the best mean over FedSVD and FedAvg-LoRA (a tie: the smaller)."""
    lines, best = ["| FedAdam η | FedSVD | FedAvg-LoRA | mean |", "|---|---|---|---|"], None
    for eta in ETAS:
        f = finals(f"pilot-adam-eta{eta}")
        if not complete(f, ("fedsvd", "fedavg"), (0.5,), (0,)):
            return None
        acc = {m: float(f[f["method"] == m]["accuracy"].iloc[0]) for m in ("fedsvd", "fedavg")}
        mean = (acc["fedsvd"] + acc["fedavg"]) / 2
        lines.append(f"| {eta} | {acc['fedsvd']:.4f} | {acc['fedavg']:.4f} | {mean:.4f} |")
        if best is None or mean > best[0]:
            best = (mean, eta)
    print("### Pilot (20 Newsgroups, client rate 0.5, seed 0)\n\n" + "\n".join(lines)
          + f"\n\nChosen: η = {best[1]}.\n")
    return best[1]


def arm_table(task: str, arm: str) -> pd.DataFrame | None:
    """Print one arm's table (method × client rate); its finals, or None without cells."""
    f = finals(f"{task}-{arm}")
    if f.empty:
        return None
    print(f"### {TASKS[task]}, {arm}{'' if complete(f) else ' (incomplete)'}\n")
    print("| method | " + " | ".join(f"lr {r:g}" for r in RATES) + " | spread |")
    print("|---|" + "---|" * (len(RATES) + 1))
    for m in METHODS:
        cells = [f[(f["method"] == m) & (f["learning_rate"] == r)]["accuracy"] for r in RATES]
        ms = [c.mean() for c in cells if len(c)]
        spread = f"{max(ms) - min(ms):.4f}" if len(ms) == len(RATES) else "–"
        print(f"| {m} | " + " | ".join(fmt(c) if len(c) else "–" for c in cells)
              + f" | {spread} |")
    print()
    return f


def paired(task: str, arm: str, base: pd.DataFrame, other: pd.DataFrame) -> None:
    """``arm`` minus plain averaging, paired by method, rate and seed."""
    merged = other.merge(base, on=["method", "learning_rate", "seed"], suffixes=("", "_plain"))
    if merged.empty:
        return
    print(f"{arm} minus plain, paired by seed ({TASKS[task]}): mean ± 95 % t half-width\n")
    print("| method | " + " | ".join(f"lr {r:g}" for r in RATES) + " |")
    print("|---|" + "---|" * len(RATES))
    for m in METHODS:
        row = []
        for r in RATES:
            d = merged[(merged["method"] == m) & (merged["learning_rate"] == r)]
            row.append(fmt(d["accuracy"] - d["accuracy_plain"]) if len(d) else "–")
        print(f"| {m} | " + " | ".join(row) + " |")
    print()


def write_defaults(choices: dict[str, tuple[str, float]], eta: str) -> None:
    """Rule 3's choice per method as TOML: server-optimizer, server-learning-rate, learning-rate."""
    lines = ["# Rule 3 of experiments/lr-transfer/README.md, applied by analyze.py --write.", ""]
    for method, (arm, rate) in choices.items():
        lines += [f"[{method}]", f'server-optimizer = "{"adam" if arm == "adam" else "none"}"',
                  f"server-learning-rate = {eta if arm == 'adam' else '1.0'}",
                  f"learning-rate = {rate}", ""]
    DEFAULTS.write_text("\n".join(lines))
    print(f"Rule 3's choice written to {DEFAULTS.relative_to(ROOT.parents[1])}\n")


def rules(tables: dict[tuple[str, str], pd.DataFrame], eta: str | None,
          write: bool = False) -> None:
    """Rules 3-5 of the README, where their cells are complete (``write``: rule 3 to a file)."""
    need = [(t, a) for t in TASKS for a in ("plain", "adam")]
    if not all(k in tables and complete(tables[k]) for k in need):
        print("Rules 3 and 5: not applied yet (the plain and adam arms are incomplete).\n")
    else:
        print("### Rule 3: each method's defaults\n")
        choices = {}
        for m in METHODS:
            worst = {a: sum(min(means(tables[(t, a)])[(m, r)] for r in RATES) for t in TASKS) / 2
                     for a in ("plain", "adam")}
            arm = "adam" if worst["adam"] > worst["plain"] else "plain"
            overall = {r: sum(means(tables[(t, arm)])[(m, r)] for t in TASKS) / 2 for r in RATES}
            top = max(overall.values())
            near = [r for r in RATES if overall[r] >= top - TIE]
            rate = 0.5 if 0.5 in near else min(near)
            choices[m] = (arm, rate)
            met = all(min(means(tables[(t, arm)])[(m, r)] for r in RATES)
                      >= max(means(tables[(t, arm)])[(m, r)] for r in RATES) - TARGET
                      for t in TASKS)
            print(f"- {m}: worst-rate mean plain {worst['plain']:.4f}, adam {worst['adam']:.4f}"
                  f" → {arm}; rate {rate:g} (means over tasks: "
                  + ", ".join(f"{r:g}: {v:.4f}" for r, v in overall.items())
                  + f"); rule 5 (every rate within {TARGET} of the best, each task): "
                  + ("met" if met else "not met"))
        print()
        if write:
            write_defaults(choices, eta)
    if all((t, "deltaw") in tables and complete(tables[(t, "deltaw")]) for t in TASKS):
        print("### Rule 4: one normalised rate for every method\n")
        carried = []
        for r in RATES:
            ok = all(means(tables[(t, "deltaw")])[(m, r)]
                     >= max(means(tables[(t, "deltaw")])[(m, q)] for q in RATES) - TARGET
                     for t in TASKS for m in METHODS)
            carried += [r] if ok else []
        print(f"Rates within {TARGET} of every method's best on both tasks: "
              + (", ".join(f"{r:g}" for r in carried) or "none") + "\n")


def main() -> None:
    """Print every table and rule to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="write rule 3's choice to defaults.toml beside this script")
    args = parser.parse_args()
    eta = pilot()
    tables = {}
    for task in TASKS:
        for arm in ARMS:
            table = arm_table(task, arm)
            if table is not None:
                tables[(task, arm)] = table
        for arm in ("adam", "deltaw"):
            if (task, "plain") in tables and (task, arm) in tables:
                paired(task, arm, tables[(task, "plain")], tables[(task, arm)])
    rules(tables, eta, write=args.write)


if __name__ == "__main__":
    main()
