"""A sweep's results: tidy CSV, 95 % t-intervals, paired differences, Markdown table, README.

Two layouts are read (:func:`load_runs`), and :func:`write_report` writes the report of either:

- a sweep folder (``--out``): every ``DIR/<run>/`` with ``config.json`` and ``metrics.csv``;
  the report goes to ``DIR/sweep.csv``, ``summary.csv``, ``paired.csv``, ``results.md`` and
  ``DIR/plots/``, its wall time and commands come from ``sweep-attempts.csv``;
- a record folder (``--record``, tracked in git, so that a sweep spans machines): one
  ``DIR/cells/<run>.csv`` per complete cell (every round row of its ``metrics.csv`` after the
  columns of RECORD_COLUMNS) and ``DIR/cells/<run>.json`` (its ``config.json``), plus
  ``DIR/commands.txt``; the report goes to ``DIR/sweep.csv``, ``summary.csv``, ``paired.csv``,
  ``table.md`` and ``DIR/*.png``, and its machine time is the sum of the last round's
  ``wall-seconds`` of every recorded cell.

Method, ε, α, seed and learning rate come from the run's config, never from its name; the runs
and records are left untouched.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from common import schema
from common.config import AppConfig
from common.methods import method_order

ATTEMPTS_FILE = "sweep-attempts.csv"  # one row per cell run: written by simulations.sweep_cells
CELLS_DIR = "cells"  # in a record folder: <run>.csv and <run>.json of every complete cell
COMMANDS_FILE = "commands.txt"  # in a record folder: the distinct sweep commands that wrote it
RECORD_COLUMNS = ("run", "method", "epsilon", "alpha", "seed", "learning_rate", "num_rounds",
                  "settings")  # a record CSV: these, then the run's metrics.csv columns
PAIRED_TARGET = 0.03  # the half-width that issue 15's experiment aims for (paired differences)
README_START, README_END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"
CONFIG_COLUMNS = {  # tidy column: config.json key
    "method": "strategy.name", "epsilon": "privacy.epsilon", "alpha": "data.dirichlet-alpha",
    "seed": "seed", "learning_rate": "train.learning-rate",
}
METRIC_COLUMNS = {  # tidy column: metrics.csv column (common.schema)
    column.replace("-", "_"): column for column in (
        schema.ROUND, schema.ACCURACY, schema.LOSS, schema.EVAL_EXAMPLES, schema.TRAIN_LOSS,
        schema.EPSILON_MEAN, schema.EPSILON_MAX, schema.BYTES_UP, schema.BYTES_DOWN,
        schema.WALL_SECONDS)
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


def is_record_folder(folder: Path) -> bool:
    """Whether ``folder`` is a record folder (it has ``cells/``) rather than a sweep folder."""
    return (Path(folder) / CELLS_DIR).is_dir()


def load_runs(folder: Path, also_varied: Collection[str] = (), *,
              records: bool | None = None) -> Runs:
    """Every complete run of a sweep folder, or every complete record of a record folder.

    ``records``: read ``folder/cells/<run>.csv`` and ``.json`` (True) or ``folder/<run>/
    metrics.csv`` and ``config.json`` (False); None: records if ``folder/cells/`` exists.
    Raise if the runs differ in a setting that is neither in VARIED nor in ``also_varied``.
    """
    if records is None:
        records = is_record_folder(folder)
    frames, incomplete, configs = [], [], {}
    for name, config, metrics in (_records if records else _run_folders)(Path(folder)):
        if config is None or metrics is None or \
                config["strategy.num-rounds"] not in set(metrics["round"]):
            incomplete.append(name)
            continue
        configs[name] = config
        frames.append(_tidy(name, config, metrics))
    _check_same_settings(configs, VARIED | set(also_varied))
    tidy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*CONFIG_COLUMNS, "eval_split", *METRIC_COLUMNS, "num_rounds", "settings", "run"])
    return Runs(tidy, tuple(incomplete))


Source = Iterator[tuple[str, dict | None, pd.DataFrame | None]]  # name, config, metrics


def _run_folders(folder: Path) -> Source:
    for run in sorted(p for p in folder.iterdir() if (p / schema.METRICS_FILE).is_file()):
        if not (run / schema.CONFIG_FILE).is_file():
            yield run.name, None, None
            continue
        yield (run.name, json.loads((run / schema.CONFIG_FILE).read_text()),
               pd.read_csv(run / schema.METRICS_FILE))


def _records(folder: Path) -> Source:
    for path in sorted((folder / CELLS_DIR).glob("*.csv")):
        config = path.with_suffix(".json")
        try:
            metrics = pd.read_csv(path).drop(columns=list(RECORD_COLUMNS), errors="ignore")
        except (ValueError, OSError):  # empty or torn: not a record
            metrics = None
        yield (path.stem, json.loads(config.read_text()) if config.is_file() else None,
               metrics if metrics is not None and "round" in metrics else None)


def settings_digest(config: Mapping[str, object], varied: Collection[str] = VARIED) -> str:
    """8 hex digits of a run's shared settings: its config minus ``output.*`` and ``varied``.

    The cells of one experiment share it (they differ only in VARIED); a key missing from an
    older config counts as its default. With the varied keys (their own columns) it identifies
    the whole config but ``output.*``.
    """
    defaults = json.loads(json.dumps(AppConfig().to_dict(), default=str))
    shared = {k: v for k, v in {**defaults, **config}.items()
              if k not in varied and not k.startswith("output.")}
    text = json.dumps(shared, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _tidy(name: str, config: dict, metrics: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({column: config[key] for column, key in CONFIG_COLUMNS.items()},
                         index=metrics.index)
    frame["eval_split"] = "validation" if config.get("data.validation-fraction") else "test"
    for column, source in METRIC_COLUMNS.items():
        frame[column] = metrics[source] if source in metrics else np.nan
    frame["num_rounds"] = config["strategy.num-rounds"]
    frame["settings"] = settings_digest(config)
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
        raise ValueError("the runs of this folder differ in settings that the table would "
                         "mix; give each setting its own --out (or --record):\n  "
                         + "\n  ".join(differing))


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


def machine_time(runs: Runs) -> tuple[float, str]:
    """The sum of the last round's ``wall-seconds`` of every complete run, and the source."""
    return float(runs.final["wall_seconds"].sum()), (
        f"sum of the last round's wall-seconds of the {len(runs.final)} recorded cells: "
        "ServerApp time, without SuperLink start-up")


def sweep_commands(folder: Path) -> list[str]:
    """The distinct sweep commands of a folder, first use first.

    A record folder's ``commands.txt``; a sweep folder's attempts file.
    """
    folder = Path(folder)
    if is_record_folder(folder):
        path = folder / COMMANDS_FILE
        return [c for c in path.read_text().splitlines() if c.strip()] if path.is_file() else []
    attempts = folder / ATTEMPTS_FILE
    if not attempts.is_file():
        return []
    return list(dict.fromkeys(r["command"] for r in csv.DictReader(attempts.open())))


def record_command(folder: Path, command: str) -> Path:
    """Append ``command`` to ``folder/commands.txt`` unless it is there already; the path."""
    path = Path(folder) / COMMANDS_FILE
    known = path.read_text().splitlines() if path.is_file() else []
    if command not in known:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c}\n" for c in [*known, command]))
    return path


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``9 min 12 s`` or ``41 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def target_line(paired: pd.DataFrame, target: float = PAIRED_TARGET) -> str:
    """How many paired differences (n ≥ 2 seeds) have a 95 % half-width ≤ ``target``."""
    rated = paired[paired["n"] >= 2]
    if rated.empty:
        return f"Target: a paired half-width ≤ {target:g}; no comparison has two seeds yet."
    met = int((rated["ci95"] <= target).sum())
    widest = rated.loc[rated["ci95"].idxmax()]
    return (f"Target: a paired half-width ≤ {target:g}; met by {met} of {len(rated)} "
            f"comparisons with n ≥ 2 (widest: {widest['method']} at ε = "
            f"{epsilon_label(widest['epsilon'])}, ± {widest['ci95']:.4f} with n = "
            f"{int(widest['n'])}).")


def report_block(summary: pd.DataFrame, runs: Runs, *, commands: list[str], wall: float,
                 wall_source: str, images: list[str] = (),
                 wall_label: str = "Total wall time of the sweep",
                 commands_file: str = ATTEMPTS_FILE) -> str:
    """The Markdown that goes between the README markers (and into the folder's table).

    ``wall_label``, ``wall_source``: how ``wall`` is named and where it comes from;
    ``commands_file``: where the commands would have been recorded (named when none were).
    """
    split = "/".join(sorted(runs.final["eval_split"].unique())) or "test"
    seeds = sorted(runs.final["seed"].unique())
    produced = ["Produced by:", "", "```bash", *commands, "```"] if commands else [
        f"(The sweep command was not recorded: no {commands_file} in the folder.)"]
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
                  markdown_table(paired), "", target_line(paired), ""]
    lines.append(f"{wall_label}: **{duration(wall)}** ({wall_source}).")
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
    """Write the report of a sweep folder or a record folder into it; return the paths.

    A sweep folder gets ``sweep.csv``, ``summary.csv``, ``paired.csv``, ``results.md`` and
    ``plots/``; a record folder (:func:`is_record_folder`) ``sweep.csv``, ``summary.csv``,
    ``paired.csv``, ``table.md`` and its plots beside them. With ``readme``, also the table
    between its markers (checked first, so a README without them changes nothing), linking the
    plots: those of a record folder inside the README's folder where they are, the others
    copied, with the two CSVs, into ``_static/sweep/`` beside the README.
    """
    from simulations import plots  # matplotlib only when plotting

    folder = Path(folder)
    records = is_record_folder(folder)
    runs = load_runs(folder, records=records)
    if runs.final.empty:
        raise ValueError(f"no complete run in {folder} (incomplete: {list(runs.incomplete)})")
    splits = sorted(runs.final["eval_split"].unique())
    if len(splits) > 1:
        raise ValueError(f"{folder} mixes {' and '.join(splits)} runs (learning-rate tuning "
                         "evaluates on validation data): give each its own folder")
    if readme:
        replace_between_markers(readme.read_text(), "")  # no markers: fail before writing
    written = {"tidy": folder / "sweep.csv", "summary": folder / "summary.csv",
               "table": folder / ("table.md" if records else "results.md")}
    runs.tidy.to_csv(written["tidy"], index=False)
    summary = summarize(runs.final)
    summary.to_csv(written["summary"], index=False)
    paired = paired_differences(runs.final)
    if not paired.empty:
        written["paired"] = folder / "paired.csv"
        paired.to_csv(written["paired"], index=False)
    images = plots.write_all(runs.tidy, summary, folder if records else folder / "plots")
    if records:
        wall, source = machine_time(runs)
        block = dict(commands=sweep_commands(folder), wall=wall, wall_source=source,
                     wall_label="Total machine time", commands_file=COMMANDS_FILE)
    else:
        wall, source = sweep_wall_time(folder, runs)
        block = dict(commands=sweep_commands(folder), wall=wall, wall_source=source)
    written["table"].write_text(report_block(
        summary, runs, images=[p.relative_to(folder).as_posix() for p in images], **block))
    if readme:
        readme_dir = readme.parent.resolve()
        if records and folder.resolve().is_relative_to(readme_dir):
            links = [p.resolve().relative_to(readme_dir).as_posix() for p in images]
        else:
            static = readme.parent / "_static" / "sweep"
            static.mkdir(parents=True, exist_ok=True)
            for file in [*images, written["tidy"], written["summary"]]:
                (static / file.name).write_bytes(file.read_bytes())
            links = [f"_static/sweep/{p.name}" for p in images]
        readme.write_text(replace_between_markers(
            readme.read_text(), report_block(summary, runs, images=links, **block)))
        written["readme"] = readme
    return written
