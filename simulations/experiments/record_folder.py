"""A sweep's record folder (``--record DIR``, in git): written per cell, committed in batches.

Every complete cell is written at once to ``DIR/cells/<cell>.csv`` (every round), ``.json``
(its config) and ``.environment.json`` (:func:`write_record`): a sweep resumes from these files
alone, committed or not. With ``--record-adapters`` each cell also keeps its adapter
(:func:`record_adapter_folder`), so that an analysis of the weights (``fedsvd-spectrum``) runs
from the record alone. With ``--commit`` they go into git through :class:`BatchCommits`: at
most one commit per ``--commit-every`` minutes, and one when the sweep ends, however it ends,
so that a long sweep leaves a few commits, not one per cell.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from common import schema
from common.config import AppConfig, inert_settings
from simulations.reports.records import CELLS_DIR, COMMANDS_FILE, RECORD_COLUMNS, settings_digest


def has_round(table: Path, num_rounds: int) -> bool:
    """Whether the metrics table ``table`` (a run's or a record's) has the row of ``num_rounds``."""
    try:
        with Path(table).open() as f:
            return any(float(row[schema.ROUND]) == num_rounds for row in csv.DictReader(f))
    except (OSError, KeyError, ValueError, TypeError):
        return False


def differing_settings(path: Path, cfg: AppConfig) -> list[str]:
    """Keys whose value in the config file ``path`` differs from ``cfg``.

    ``output.*`` aside, and keys that act in neither (:func:`common.config.inert_settings`:
    a server rate under plain averaging).
    """
    if not path.is_file():
        return []
    saved, want = json.loads(path.read_text()), cfg.to_dict()
    inert = inert_settings(saved) & inert_settings(want)
    return [f"{k}: {saved[k]!r} there, {want[k]!r} now" for k in sorted(saved.keys() & want)
            if not k.startswith("output.") and k not in inert and saved[k] != want[k]]


def record_paths(record: Path, name: str) -> tuple[Path, Path]:
    """``record/cells/<name>.csv`` (every round) and ``record/cells/<name>.json`` (its config)."""
    cells = Path(record) / CELLS_DIR
    return cells / f"{name}.csv", cells / f"{name}.json"


def record_environment_path(record: Path, name: str) -> Path:
    """``record/cells/<name>.environment.json``: what computed the cell (its precision, CPU)."""
    return Path(record) / CELLS_DIR / f"{name}.{schema.ENVIRONMENT_FILE}"


def is_recorded(record: Path, name: str, num_rounds: int) -> bool:
    """Whether ``record`` holds the config of run ``name`` and its row of round ``num_rounds``."""
    table, config = record_paths(record, name)
    return config.is_file() and has_round(table, num_rounds)


ADAPTERS_DIR = "adapters"  # in a record: <run>/config.json and <run>/adapter/ (--record-adapters)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft loads


def record_adapter_folder(record: Path, name: str) -> Path:
    """``record/adapters/<name>``: the cell's ``config.json`` and ``adapter/`` (peft's files).

    The layout of a run folder (:mod:`common.schema`), without its metrics: commands that
    read run folders (``fedsvd-spectrum``, ``PeftModel.from_pretrained`` on ``adapter/``) read
    it as one.
    """
    return Path(record) / ADAPTERS_DIR / name


def missing_adapter_files(run_folder: Path) -> list[str]:
    """The files of :data:`ADAPTER_FILES` that ``run_folder/adapter/`` lacks."""
    return [f for f in ADAPTER_FILES if not (Path(run_folder) / schema.ADAPTER_DIR / f).is_file()]


def has_recorded_adapter(record: Path, name: str) -> bool:
    """Whether ``record`` keeps the config and every adapter file of run ``name``."""
    folder = record_adapter_folder(record, name)
    return (folder / schema.CONFIG_FILE).is_file() and not missing_adapter_files(folder)


def recorded_stale_settings(record: Path, name: str, cfg: AppConfig) -> list[str]:
    """Keys whose value in the recorded config of ``name`` differs from ``cfg`` (output.* aside)."""
    return differing_settings(record_paths(record, name)[1], cfg)


def write_record(run_folder: Path, record: Path, *, adapter: bool = False) -> list[Path]:
    """Write the record of a complete run: ``record/cells/<run>.csv``, ``.json``, environment.

    The CSV holds RECORD_COLUMNS (run, method, epsilon, alpha, seed, learning_rate,
    num_rounds, settings: :func:`simulations.reports.records.settings_digest`), all from the
    run's ``config.json``, then every column of its ``metrics.csv`` as written, one row per
    round; the JSON is the run's ``config.json``; ``<run>.environment.json`` is the run's
    ``environment.json`` (the resolved precision, CPU and versions), when it wrote one: a few
    kB per cell. With ``adapter``, also the run's peft adapter and config in
    :func:`record_adapter_folder` (about 330 kB for the default layout); raises
    FileNotFoundError if the run saved none. Each file is written to a temporary file and
    renamed, so a reader never sees half of one. Returns the paths written, the CSV and the
    JSON first.
    """
    run_folder = Path(run_folder)
    if adapter and (missing := missing_adapter_files(run_folder)):
        raise FileNotFoundError(f"{run_folder / schema.ADAPTER_DIR}: no {', '.join(missing)} "
                                "(the run saved no adapter to record)")
    config_text = (run_folder / schema.CONFIG_FILE).read_text()
    config = json.loads(config_text)
    with (run_folder / schema.METRICS_FILE).open(newline="") as f:
        header, *rows = list(csv.reader(f))
    ident = [run_folder.name, config["strategy.name"], config["privacy.epsilon"],
             config["data.dirichlet-alpha"], config["seed"], config["train.learning-rate"],
             config["strategy.num-rounds"], settings_digest(config)]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*RECORD_COLUMNS, *header])
    writer.writerows([*ident, *row] for row in rows)
    table, config_path = record_paths(record, run_folder.name)
    table.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(config_path, config_text)
    _write_atomic(table, text.getvalue())
    written = [table, config_path]
    environment = run_folder / schema.ENVIRONMENT_FILE
    if environment.is_file():
        written.append(record_environment_path(record, run_folder.name))
        _write_atomic(written[-1], environment.read_text())
    if adapter:
        kept = record_adapter_folder(record, run_folder.name)
        (kept / schema.ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        written.append(kept / schema.CONFIG_FILE)
        _write_atomic(written[-1], config_text)
        for name in ADAPTER_FILES:
            written.append(kept / schema.ADAPTER_DIR / name)
            _write_atomic(written[-1], (run_folder / schema.ADAPTER_DIR / name).read_bytes())
    return written


def _write_atomic(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    os.replace(tmp, path)


def _git(record: Path, *args: str) -> tuple[str, str]:
    """``git -C record args``: (stdout, "") on success, else ("", why git failed)."""
    try:
        done = subprocess.run(["git", "-C", str(record), *args], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"git {args[0]}: {exc}"
    if done.returncode:
        output = (done.stderr.strip() or done.stdout.strip()).replace("\n", " | ")
        return "", f"git {args[0]} exited {done.returncode}: {output}"
    return done.stdout, ""


def commit_record(record: Path, paths: Sequence[Path], message: str) -> str:
    """``git add`` and ``git commit`` of ``paths`` only, in the repository holding ``record``.

    Nothing else is staged or committed (``git commit -- <paths>``), whatever else the working
    tree or the index holds. Returns "" on success, else why git failed.
    """
    record = Path(record).resolve()
    names = [Path(p).resolve().relative_to(record).as_posix() for p in paths]
    for args in (["add", "--", *names], ["commit", "-q", "-m", message, "--", *names]):
        if why := _git(record, *args)[1]:
            return why
    return ""


def uncommitted_files(record: Path) -> set[Path]:
    """The record files of ``record`` that git does not hold as they are (new or changed).

    Empty when git cannot tell (no repository): the commit that follows says why.
    """
    record = Path(record).resolve()
    if not record.is_dir():
        return set()
    out, _ = _git(record, "ls-files", "--others", "--modified", "--exclude-standard", "--",
                  CELLS_DIR, COMMANDS_FILE)
    return {record / line for line in out.splitlines()}


class BatchCommits:
    """The record files of finished cells, committed together: at most once per ``every_minutes``.

    :meth:`add` queues a cell's files; :meth:`commit_if_due` commits the queue once
    ``every_minutes`` have passed since the last commit (or since the start; 0: at every call);
    :meth:`commit` commits it now, which the sweep does when it ends, however it ends. A commit
    that fails is said loudly, with the git command that finishes it by hand, and its files stay
    queued for the next one.
    """

    def __init__(self, record: Path, every_minutes: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record, self.every, self.say, self.clock = Path(record), every_minutes * 60, say, clock
        self.queued: dict[str, tuple[list[Path], str]] = {}  # cell -> (its files, commit line)
        self.last = clock()

    def add(self, name: str, paths: Iterable[Path], detail: str = "") -> None:
        """Queue the files of cell ``name``; ``detail`` follows its name in the message."""
        self.queued[name] = (list(paths), detail)

    def add_uncommitted(self, names: Iterable[str]) -> None:
        """Queue the record files of cells ``names`` that git does not hold yet.

        A sweep that ended before its last commit (killed, a lost machine) left them: the next
        one with ``--commit`` commits them with its first batch.
        """
        files = uncommitted_files(self.record)
        commands = [p for p in [Path(self.record).resolve() / COMMANDS_FILE] if p in files]
        for name in names:
            cell = [*record_paths(self.record, name), record_environment_path(self.record, name)]
            if mine := [p for p in cell if p.resolve() in files]:
                self.add(name, [*mine, *commands], " (recorded earlier)")

    def commit_if_due(self) -> None:
        """Commit the queue if ``every_minutes`` have passed since the last commit."""
        if self.queued and self.clock() - self.last >= self.every:
            self.commit()

    def commit(self) -> list[str]:
        """Commit the queue now; the cells left uncommitted ([] when it worked or was empty)."""
        if not self.queued:
            return []
        names = list(self.queued)
        paths = list(dict.fromkeys(p for files, _ in self.queued.values() for p in files))
        lines = [f"{name}{detail}" for name, (_, detail) in self.queued.items()]
        subject = lines[0] if len(lines) == 1 else f"{len(lines)} cells"
        message = f"sweep {self.record}: {subject}" + (
            "" if len(lines) == 1 else "\n\n" + "\n".join(lines))
        why = commit_record(self.record, paths, message)
        self.last = self.clock()
        if why:
            git, files = f"git -C {shlex.quote(str(self.record))}", f"{CELLS_DIR} {COMMANDS_FILE}"
            self.say(f"[record] !!! {len(names)} recorded cell(s) NOT COMMITTED: {why}\n"
                     f"[record] !!! their records are written; the next commit retries, or by "
                     f"hand: {git} add -- {files} && {git} commit -m "
                     f"{shlex.quote(f'sweep {self.record}')} -- {files}")
            return names
        self.say(f"[record] committed {len(names)} cell(s) of {self.record}: {subject}")
        self.queued.clear()
        return []
