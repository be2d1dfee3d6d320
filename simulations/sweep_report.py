"""A sweep's results from its run folders: tidy CSV, 95 % t-intervals, Markdown table, README.

``python -m simulations.sweep --report-only --out DIR`` calls :func:`write_report`; it reads
every ``DIR/<run>/`` with ``config.json`` and ``metrics.csv`` (method, ε, α, seed and learning
rate come from ``config.json``, never from the folder name) and leaves the runs untouched.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from common.config import STRATEGIES, AppConfig

ATTEMPTS_FILE = "sweep-attempts.csv"  # one row per cell run: written by simulations.sweep_cells
README_START, README_END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"
CONFIG_COLUMNS = {  # tidy column: config.json key
    "method": "strategy.name", "epsilon": "privacy.epsilon", "alpha": "data.dirichlet-alpha",
    "seed": "seed", "learning_rate": "train.learning-rate",
}
METRIC_COLUMNS = {  # tidy column: metrics.csv column
    "round": "round", "accuracy": "accuracy", "loss": "loss", "eval_examples": "eval-examples",
    "train_loss": "train-loss", "epsilon_mean": "epsilon-mean", "epsilon_max": "epsilon-max",
    "bytes_up": "bytes-up", "bytes_down": "bytes-down", "wall_seconds": "wall-seconds",
}
VARIED = {*CONFIG_COLUMNS.values(), "data.validation-fraction"}  # may differ between runs


@dataclass(frozen=True)
class Runs:
    """Every complete run of a sweep folder, one tidy row per run per round."""

    tidy: pd.DataFrame
    incomplete: tuple[str, ...]  # run folders without their final round (failed or running)

    @property
    def final(self) -> pd.DataFrame:
        """One row per run: its last round (round = strategy.num-rounds, the full eval split)."""
        return self.tidy[self.tidy["round"] == self.tidy["num_rounds"]].reset_index(drop=True)


def load_runs(folder: Path, also_varied: Collection[str] = ()) -> Runs:
    """Read ``folder/*/config.json`` and ``metrics.csv`` of every complete run.

    Raise if the runs differ in a setting that is neither in VARIED nor in ``also_varied``.
    """
    frames, incomplete, configs = [], [], {}
    for run in sorted(p for p in Path(folder).iterdir() if (p / "metrics.csv").is_file()):
        if not (run / "config.json").is_file():
            incomplete.append(run.name)
            continue
        config = json.loads((run / "config.json").read_text())
        metrics = pd.read_csv(run / "metrics.csv")
        if config["strategy.num-rounds"] not in set(metrics["round"]):
            incomplete.append(run.name)
            continue
        configs[run.name] = config
        frames.append(_tidy(run.name, config, metrics))
    _check_same_settings(configs, VARIED | set(also_varied))
    tidy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*CONFIG_COLUMNS, "eval_split", *METRIC_COLUMNS, "num_rounds", "run"])
    return Runs(tidy, tuple(incomplete))


def _tidy(name: str, config: dict, metrics: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({column: config[key] for column, key in CONFIG_COLUMNS.items()},
                         index=metrics.index)
    frame["eval_split"] = "validation" if config.get("data.validation-fraction") else "test"
    for column, source in METRIC_COLUMNS.items():
        frame[column] = metrics[source] if source in metrics else np.nan
    frame["num_rounds"] = config["strategy.num-rounds"]
    frame["run"] = name
    return frame


def _check_same_settings(configs: dict[str, dict], varied: Collection[str]) -> None:
    """A table must not mix scales or models: only VARIED keys (and output.*) may differ.

    A key missing from a run's config.json (written before the setting existed) counts as its
    default.
    """
    differing = []
    defaults = json.loads(json.dumps(AppConfig().to_dict()))
    keys = {k for c in configs.values() for k in c if k not in varied and
            not k.startswith("output.")}
    for key in sorted(keys):
        values = {json.dumps(c.get(key, defaults.get(key))) for c in configs.values()}
        if len(values) > 1:
            differing.append(f"{key}: {', '.join(sorted(values))}")
    if differing:
        raise ValueError("the runs of this sweep folder differ in settings that the table "
                         "would mix; give each setting its own --out:\n  " + "\n  ".join(differing))


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


def method_order(methods) -> list[str]:
    """The methods in the README's order (STRATEGIES), unknown names last."""
    return sorted(set(methods), key=lambda m: (STRATEGIES.index(m) if m in STRATEGIES
                                               else len(STRATEGIES), m))


def epsilon_label(epsilon: float) -> str:
    """``∞`` or the number as written in run names."""
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def markdown_table(summary: pd.DataFrame, column: str = "epsilon") -> str:
    """Rows: method (and α when there are several); columns: ``column`` (ε: ∞ first, then down).

    A cell is ``mean ± half-width`` with 4 decimals, ``(n = k)`` added when it has fewer runs
    than the largest cell, ``–`` when no run of it is complete.
    """
    alphas = sorted(summary["alpha"].unique()) if "alpha" in summary else [None]
    values = sorted(summary[column].unique(), key=lambda v: -v if column == "epsilon" else v)
    label = (lambda v: f"ε = {epsilon_label(v)}") if column == "epsilon" else (
        lambda v: f"{column.replace('_', ' ')} {v:g}")
    head = ["method", *(["α"] if len(alphas) > 1 else []), *map(label, values)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_max = summary["n"].max() if len(summary) else 0
    for alpha in alphas:
        for method in method_order(summary["method"]):
            cells = [method, *([f"{alpha:g}"] if len(alphas) > 1 else [])]
            for value in values:
                match = summary[(summary["method"] == method) & (summary[column] == value)
                                & ((summary["alpha"] == alpha) if alpha is not None else True)]
                cells.append(_cell(match.iloc[0], n_max) if len(match) else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: pd.Series, n_max: int) -> str:
    text = f"{row['mean']:.4f}" + ("" if math.isnan(row["ci95"]) else f" ± {row['ci95']:.4f}")
    return text + (f" (n = {row['n']})" if row["n"] < n_max else "")


def sweep_wall_time(folder: Path, runs: Runs) -> tuple[float, str]:
    """Seconds of every recorded cell run (failed and resumed attempts too), and the source.

    Without an attempts file (runs made elsewhere): the sum of each run's last ``wall-seconds``
    (ServerApp time only, without SuperLink start-up).
    """
    attempts = Path(folder) / ATTEMPTS_FILE
    if attempts.is_file():
        rows = list(csv.DictReader(attempts.open()))
        return sum(float(r["seconds"]) for r in rows), f"{len(rows)} cell runs"
    return float(runs.final["wall_seconds"].sum()), "sum of the runs' ServerApp wall time"


def sweep_commands(folder: Path) -> list[str]:
    """The distinct sweep commands recorded in the attempts file, first use first."""
    attempts = Path(folder) / ATTEMPTS_FILE
    if not attempts.is_file():
        return []
    return list(dict.fromkeys(r["command"] for r in csv.DictReader(attempts.open())))


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``9 min 12 s`` or ``41 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def report_block(summary: pd.DataFrame, runs: Runs, *, commands: list[str], wall: float,
                 wall_source: str, images: list[str] = ()) -> str:
    """The Markdown that goes between the README markers (and into ``results.md``)."""
    split = "/".join(sorted(runs.final["eval_split"].unique())) or "test"
    seeds = sorted(runs.final["seed"].unique())
    produced = ["Produced by:", "", "```bash", *commands, "```"] if commands else [
        f"(The sweep command was not recorded: no {ATTEMPTS_FILE} in the folder.)"]
    lines = [
        f"Final {split} accuracy (round {int(runs.final['num_rounds'].max())}, whole {split} "
        f"split), mean ± 95 % confidence interval (Student t, n − 1 degrees of freedom) over "
        f"seeds {', '.join(map(str, seeds))}; one Flower simulation per cell.", "",
        *produced, "", markdown_table(summary), "",
    ]
    paired = paired_differences(runs.final)
    if not paired.empty:
        lines += ["FedSVD minus each method, paired by seed (same data partition and client "
                  "sampling): mean difference ± 95 % t-interval; positive: FedSVD ahead.", "",
                  markdown_table(paired), ""]
    lines.append(f"Total wall time of the sweep: **{duration(wall)}** ({wall_source}).")
    if runs.incomplete:
        lines.append(f"Left out, incomplete: {', '.join(runs.incomplete)}.")
    lines += ["", *(f"![{Path(i).stem}]({i})" for i in images)]
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, block: str,
                            markers: tuple[str, str] = (README_START, README_END)) -> str:
    """``text`` with everything between the two ``markers`` replaced by ``block``.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    start, end = markers
    starts, ends = text.count(start), text.count(end)
    if starts != 1 or ends != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README needs exactly one {start} followed by one {end} (found "
                         f"{starts} and {ends}); add them where the table should go")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: f"{start}\n{block.strip()}\n{end}", text)


def write_report(folder: Path, *, readme: Path | None = None) -> dict[str, Path]:
    """Write ``sweep.csv``, ``summary.csv``, ``results.md`` and ``plots/`` into ``folder``.

    With ``readme``, also the table between its markers (checked first, so a README without
    them changes nothing), and the plots (linked from there) and the two CSVs into
    ``_static/sweep/`` beside it.
    """
    from simulations import plots  # matplotlib only when plotting

    folder = Path(folder)
    runs = load_runs(folder)
    if runs.final.empty:
        raise ValueError(f"no complete run in {folder} (incomplete: {list(runs.incomplete)})")
    if readme:
        replace_between_markers(readme.read_text(), "")  # no markers: fail before writing
    written = {"tidy": folder / "sweep.csv", "summary": folder / "summary.csv",
               "table": folder / "results.md"}
    runs.tidy.to_csv(written["tidy"], index=False)
    summary = summarize(runs.final)
    summary.to_csv(written["summary"], index=False)
    images = plots.write_all(runs.tidy, summary, folder / "plots")
    wall, source = sweep_wall_time(folder, runs)
    block = dict(commands=sweep_commands(folder), wall=wall, wall_source=source)
    written["table"].write_text(report_block(
        summary, runs, images=[f"plots/{p.name}" for p in images], **block))
    if readme:
        static = readme.parent / "_static" / "sweep"
        static.mkdir(parents=True, exist_ok=True)
        for file in [*images, written["tidy"], written["summary"]]:
            (static / file.name).write_bytes(file.read_bytes())
        links = [f"_static/sweep/{p.name}" for p in images]
        readme.write_text(replace_between_markers(
            readme.read_text(), report_block(summary, runs, images=links, **block)))
        written["readme"] = readme
    return written
