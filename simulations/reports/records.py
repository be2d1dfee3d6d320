"""A sweep's runs as one tidy table: read from a sweep folder or from a record folder.

Two layouts are read (:func:`load_runs`):

- a sweep folder (``--out``): every ``DIR/<run>/`` with ``config.json`` and ``metrics.csv``,
  plus ``sweep-attempts.csv`` (one row per cell run: its wall time and command);
- a record folder (``--record``, tracked in git, so that a sweep spans machines): one
  ``DIR/cells/<run>.csv`` per complete cell (every round row of its ``metrics.csv`` after the
  columns of RECORD_COLUMNS) and ``DIR/cells/<run>.json`` (its ``config.json``), plus
  ``DIR/commands.txt``.

Each run's ``compute_dtype`` is the precision its frozen encoder computed in: from its
``environment.json`` (``DIR/cells/<run>.environment.json`` in a record), else from a pinned
``model.compute-dtype``, else ``"unrecorded"`` (``auto`` in a run older than the environment
file: float32 or bfloat16, depending on the host it ran on).

Method, ε, α, seed and learning rate come from the run's config, never from its name; the runs
and records are left untouched.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import schema
from common.config import AppConfig

ATTEMPTS_FILE = "sweep-attempts.csv"  # one row per cell run (simulations.experiments.cells)


CELLS_DIR = "cells"  # in a record folder: <run>.csv and <run>.json of every complete cell


COMMANDS_FILE = "commands.txt"  # in a record folder: the distinct sweep commands that wrote it


# a record CSV: these, then the run's metrics.csv columns
RECORD_COLUMNS = (schema.RUN, schema.METHOD, schema.EPSILON_BUDGET, schema.ALPHA, schema.SEED,
                  schema.LEARNING_RATE, schema.NUM_ROUNDS, schema.SETTINGS)


CONFIG_COLUMNS = {  # tidy column: config.json key
    schema.METHOD: "strategy.name", schema.EPSILON_BUDGET: "privacy.epsilon",
    schema.ALPHA: "data.dirichlet-alpha", schema.SEED: "seed",
    schema.LEARNING_RATE: "train.learning-rate",
}


METRIC_COLUMNS = {  # tidy column: metrics.csv column (common.schema)
    schema.tidy_name(column): column for column in (
        schema.ROUND, schema.ACCURACY, schema.BALANCED_ACCURACY, schema.AUC, schema.LOSS,
        schema.EVAL_EXAMPLES, schema.TRAIN_LOSS,
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
        tidy = self.tidy
        final = tidy[schema.tidy_name(schema.ROUND)] == tidy[schema.NUM_ROUNDS]
        return tidy[final].reset_index(drop=True)


def with_reference(runs: Runs, reference: Path, method: str = "fedsvd") -> Runs:
    """``runs`` plus ``method``'s runs of the folder ``reference`` at the same (ε, α, seed).

    For a table of other methods beside ``method`` (FedSVD: the reference of
    :func:`simulations.reports.statistics.paired_differences`) recorded in another folder: the
    cells of one seed pair as in one sweep when both were run with the same settings, which is
    checked (:func:`settings_digest`). Raise ValueError if ``runs`` holds ``method`` already, if
    ``reference`` has no such run, or if the settings differ.
    """
    final = runs.final
    if (final[schema.METHOD] == method).any():
        raise ValueError(f"the table has {method} runs of its own: no reference needed")
    theirs = load_runs(reference)
    keys = [schema.EPSILON_BUDGET, schema.ALPHA, schema.SEED]
    wanted = theirs.final[theirs.final[schema.METHOD] == method].merge(
        final[keys].drop_duplicates(), on=keys)
    if wanted.empty:
        raise ValueError(f"{reference} has no complete {method} run at the ε, α and seeds of "
                         "this table")
    if differing := set(wanted[schema.SETTINGS]) ^ set(final[schema.SETTINGS]):
        raise ValueError(f"{reference}'s {method} runs and this table's differ in their shared "
                         f"settings (digests {', '.join(sorted(differing))}): they do not pair")
    added = theirs.tidy[theirs.tidy[schema.RUN].isin(set(wanted[schema.RUN]))]
    return Runs(pd.concat([runs.tidy, added], ignore_index=True), runs.incomplete)


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
    source = _records if records else _run_folders
    for name, config, metrics, environment in source(Path(folder)):
        if config is None or metrics is None or \
                config["strategy.num-rounds"] not in set(metrics[schema.ROUND]):
            incomplete.append(name)
            continue
        configs[name] = config
        frames.append(_tidy(name, config, metrics, environment))
    _check_same_settings(configs, VARIED | set(also_varied))
    tidy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*CONFIG_COLUMNS, schema.tidy_name(schema.EVAL_SPLIT), *METRIC_COLUMNS,
                 schema.NUM_ROUNDS, schema.SETTINGS, schema.RUN, schema.COMPUTE_DTYPE])
    return Runs(tidy, tuple(incomplete))


# name, config, metrics, environment (None: the run wrote none)
Source = Iterator[tuple[str, dict | None, pd.DataFrame | None, dict | None]]


def _run_folders(folder: Path) -> Source:
    for run in sorted(p for p in folder.iterdir() if (p / schema.METRICS_FILE).is_file()):
        if not (run / schema.CONFIG_FILE).is_file():
            yield run.name, None, None, None
            continue
        yield (run.name, json.loads((run / schema.CONFIG_FILE).read_text()),
               pd.read_csv(run / schema.METRICS_FILE),
               _read_json(run / schema.ENVIRONMENT_FILE))


def _records(folder: Path) -> Source:
    for path in sorted((folder / CELLS_DIR).glob("*.csv")):
        try:
            metrics = pd.read_csv(path).drop(columns=list(RECORD_COLUMNS), errors="ignore")
        except (ValueError, OSError):  # empty or torn: not a record
            metrics = None
        yield (path.stem, _read_json(path.with_suffix(".json")),
               metrics if metrics is not None and schema.ROUND in metrics else None,
               _read_json(path.with_name(f"{path.stem}.{schema.ENVIRONMENT_FILE}")))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def compute_dtype(config: Mapping[str, object], environment: Mapping[str, object] | None) -> str:
    """The precision a run's frozen encoder computed in, or ``"unrecorded"``.

    Its ``environment.json`` says it; without one, a pinned ``model.compute-dtype`` does;
    ``auto`` without an environment (runs before 2026-12-04) depended on the host.
    """
    if environment and "compute-dtype" in environment:
        return str(environment["compute-dtype"])
    setting = str(config.get("model.compute-dtype", "auto"))
    return "unrecorded" if setting == "auto" else setting


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


def _tidy(name: str, config: dict, metrics: pd.DataFrame,
          environment: dict | None) -> pd.DataFrame:
    frame = pd.DataFrame({column: config[key] for column, key in CONFIG_COLUMNS.items()},
                         index=metrics.index)
    validation = config.get("data.validation-fraction")
    frame[schema.tidy_name(schema.EVAL_SPLIT)] = "validation" if validation else "test"
    for column, source in METRIC_COLUMNS.items():
        frame[column] = metrics[source] if source in metrics else np.nan
    frame[schema.NUM_ROUNDS] = config["strategy.num-rounds"]
    frame[schema.SETTINGS] = settings_digest(config)
    frame[schema.RUN] = name
    frame[schema.COMPUTE_DTYPE] = compute_dtype(config, environment)
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


def epsilon_label(epsilon: float) -> str:
    """``∞`` or the number as written in run names."""
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


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
