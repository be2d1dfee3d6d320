"""The cells of a sweep and running them one after another: naming, resume rule, progress.

A cell is one Flower simulation, ``<method>-eps<ε>-a<α>-seed<s>`` (learning-rate tuning cells
add ``-lr<lr>``), written to ``<sweep folder>/<cell name>/``. A cell is *complete* when its
``metrics.csv`` has the row of round ``strategy.num-rounds``; complete cells are skipped, so
rerunning the same command resumes the sweep. Each run's output goes to
``<sweep folder>/logs/<cell name>.log``, and every attempt is appended to
``sweep-attempts.csv`` (name, status, seconds, command): the report's wall time and command.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.config import AppConfig
from common.run_config import app_run_config, override_text
from server.checkpoint import CHECKPOINT_FILE
from server.preflight import check_run
from simulations.local_superlink import flwr_run
from simulations.sweep_report import ATTEMPTS_FILE, duration

ROOT = Path(__file__).resolve().parent.parent
Runner = Callable[[list[str], Path], int]  # (run-config items, log file) -> exit code


def say(line: str) -> None:
    """One progress line, flushed at once (stdout is often a pipe or a file on long sweeps)."""
    print(line, flush=True)


@dataclass(frozen=True)
class Cell:
    """One simulation of the grid; ``lr`` None: the run config's ``train.learning-rate``."""

    method: str
    epsilon: float
    alpha: float
    seed: int
    lr: float | None = None
    validation_fraction: float = 0.0  # > 0: an lr-tuning cell, evaluated on validation

    @property
    def name(self) -> str:
        """``fedsvd-eps6-a0.5-seed0``; tuning cells end in ``-lr0.5``."""
        name = f"{self.method}-eps{self.epsilon:g}-a{self.alpha:g}-seed{self.seed}"
        return f"{name}-lr{self.lr:g}" if self.validation_fraction else name

    def keys(self) -> dict[str, object]:
        """The run-config keys this cell sets (they win over the sweep's --run-config)."""
        keys = {"strategy.name": self.method, "privacy.epsilon": float(self.epsilon),
                "data.dirichlet-alpha": float(self.alpha), "seed": self.seed}
        if self.lr is not None:
            keys["train.learning-rate"] = float(self.lr)
        if self.validation_fraction:
            keys["data.validation-fraction"] = float(self.validation_fraction)
        return keys


def run_config_items(cell: Cell, folder: Path, overrides: Sequence[str],
                     resume: bool = False) -> list[str]:
    """``--run-config`` items of one cell: the sweep's overrides, then the cell's own keys."""
    keys = {**cell.keys(), "output.dir": str(Path(folder).resolve()),
            "output.run-name": cell.name, **({"output.resume": True} if resume else {})}
    return [*overrides, override_text(keys)]


def cell_config(items: Sequence[str]) -> AppConfig:
    """The AppConfig the ServerApp will build: pyproject defaults, then ``items``."""
    return AppConfig.from_run_config(app_run_config(ROOT, items))


def refuse_failing_runs(planned: Mapping[str, Sequence[str]], *,
                        num_partitions: int | None = None) -> None:
    """Raise ValueError naming every planned run that :func:`server.preflight.check_run` refuses.

    ``planned``: run name -> its ``--run-config`` items. Nothing is run: a sweep or an
    experiment stops before its first run rather than in the middle.
    """
    refused = []
    for name, items in planned.items():
        try:
            check_run(cell_config(items), num_partitions=num_partitions)
        except (ValueError, OSError) as exc:
            refused.append(f"{name}: " + str(exc).replace("\n", "\n    "))
    if refused:
        raise ValueError("these runs would fail; nothing was run:\n  " + "\n  ".join(refused))


def is_complete(run_folder: Path, num_rounds: int) -> bool:
    """Whether ``run_folder/metrics.csv`` holds the row of round ``num_rounds`` (the last)."""
    try:
        with (Path(run_folder) / "metrics.csv").open() as f:
            return any(float(row["round"]) == num_rounds for row in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return False


def stale_settings(run_folder: Path, cfg: AppConfig) -> list[str]:
    """Keys whose value in ``run_folder/config.json`` differs from ``cfg`` (output.* aside)."""
    path = Path(run_folder) / "config.json"
    if not path.is_file():
        return []
    saved, want = json.loads(path.read_text()), cfg.to_dict()
    return [f"{k}: {saved[k]!r} there, {want[k]!r} now" for k in sorted(saved.keys() & want)
            if not k.startswith("output.") and saved[k] != want[k]]


def flwr_runner(*, num_supernodes: int = 6, cpus_per_client: int = 1,
                timeout: float | None = None) -> Runner:
    """Run a cell with ``flwr run`` on a private SuperLink; its output and log into ``log``."""
    def run(items: list[str], log: Path) -> int:
        with tempfile.TemporaryDirectory(prefix="flwr-home-") as home, _output_to(log):
            try:
                return flwr_run(ROOT, run_config=items, num_supernodes=num_supernodes,
                                cpus_per_client=cpus_per_client, flwr_home=Path(home),
                                timeout=timeout)
            finally:
                superlink_log = Path(home) / "superlink.log"
                if superlink_log.is_file():
                    log.with_suffix(".superlink.log").write_bytes(superlink_log.read_bytes())
    return run


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1, 2: children too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell in this invocation."""

    cell: Cell
    status: str  # "skipped" (already complete), "done" or "failed"
    seconds: float = 0.0
    detail: str = ""


def run_cells(cells: Sequence[Cell], folder: Path, *, overrides: Sequence[str], runner: Runner,
              command: str, say: Callable[[str], None] = say,
              num_partitions: int | None = None) -> list[Outcome]:
    """Run every incomplete cell in order; a failed cell is logged and the sweep goes on.

    All cell configs are built (and validated) first, and complete runs whose config.json
    differs from the planned one stop the sweep before anything runs; so does any cell to run
    that :func:`server.preflight.check_run` refuses (data, partitions of ``num_partitions``
    SuperNodes, results folder): a ValueError or OSError listing every such cell.
    """
    folder = Path(folder)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    configs = {c: cell_config(run_config_items(c, folder, overrides)) for c in cells}
    stale = {c.name: s for c, cfg in configs.items() if (s := stale_settings(folder / c.name, cfg))}
    if stale:
        raise ValueError("these runs in the sweep folder have other settings; use another "
                         "--out or delete them:\n  " + "\n  ".join(
                             f"{name}: {'; '.join(s)}" for name, s in stale.items()))
    todo = [c for c in cells if not is_complete(folder / c.name, configs[c].strategy.num_rounds)]
    refuse_failing_runs({c.name: run_config_items(c, folder, overrides,
                                                  (folder / c.name / CHECKPOINT_FILE).is_file())
                         for c in todo}, num_partitions=num_partitions)
    say(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already complete, {len(todo)} to "
        f"run; folder {folder}, logs in {folder / 'logs'}")
    outcomes = {c: Outcome(c, "skipped") for c in cells if c not in todo}
    start, spent = time.monotonic(), []
    for k, cell in enumerate(todo):
        index = cells.index(cell) + 1
        outcome = _run_one(cell, folder, overrides, runner, configs[cell].strategy.num_rounds,
                           f"[{index}/{len(cells)}]", say)
        _record_attempt(folder, outcome, command)
        outcomes[cell] = outcome
        spent.append(outcome.seconds)
        left = len(todo) - k - 1
        say(f"[{index}/{len(cells)}] {cell.name} {outcome.status.upper()} in "
            f"{duration(outcome.seconds)}{outcome.detail} | elapsed "
            f"{duration(time.monotonic() - start)} | ETA "
            f"{duration(sum(spent) / len(spent) * left)} ({left} to run)")
    return [outcomes[c] for c in cells]


def _run_one(cell: Cell, folder: Path, overrides: Sequence[str], runner: Runner,
             num_rounds: int, tag: str, say: Callable[[str], None]) -> Outcome:
    run_folder, log = folder / cell.name, folder / "logs" / f"{cell.name}.log"
    resume = (run_folder / CHECKPOINT_FILE).is_file()  # a crashed attempt: go on after it
    say(f"{tag} {cell.name} started {datetime.now(UTC):%H:%M:%S} UTC"
        f"{' (resuming its checkpoint)' if resume else ''}; log {log}")
    started = time.monotonic()
    try:
        code = runner(run_config_items(cell, folder, overrides, resume), log)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not end the sweep
        with log.open("a") as f:
            traceback.print_exc(file=f)
        code, why = -1, f"{type(exc).__name__}: {exc}"
    else:
        why = f"exit code {code}"
    seconds = time.monotonic() - started
    if code == 0 and is_complete(run_folder, num_rounds):
        return Outcome(cell, "done", seconds, _final_accuracy(run_folder))
    reason = failure_reason(log)
    detail = (f" ({why}{'' if code else ', no final round in metrics.csv'}"
              f"{': ' + reason if reason else ''}; log {log})")
    return Outcome(cell, "failed", seconds, detail)


def failure_reason(log: Path) -> str:
    """The reason :func:`simulations.local_superlink.flwr_run` printed last in ``log``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    reasons = [line.removeprefix("[run] ") for line in lines if line.startswith("[run] ")]
    return " ".join(reasons[1:3] if len(reasons) > 1 else reasons)


def _final_accuracy(run_folder: Path) -> str:
    with (run_folder / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return f": final accuracy {float(rows[-1]['accuracy']):.4f}"


def _record_attempt(folder: Path, outcome: Outcome, command: str) -> None:
    path = folder / ATTEMPTS_FILE
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["finished", "run", "status", "seconds", "command"])
        writer.writerow([datetime.now(UTC).isoformat(timespec="seconds"), outcome.cell.name,
                         outcome.status, f"{outcome.seconds:.1f}", command])


def report_outcomes(outcomes: Sequence[Outcome], say: Callable[[str], None] = say) -> int:
    """Print the end-of-sweep summary; return 1 if any cell failed, else 0."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    seconds = sum(o.seconds for o in outcomes)
    say(f"[sweep] finished: {counts['done']} run, {counts['skipped']} already complete, "
        f"{counts['failed']} failed, {duration(seconds)} of cell runs")
    for o in outcomes:
        if o.status == "failed":
            say(f"[sweep] FAILED {o.cell.name}{o.detail}")
    return 1 if counts["failed"] else 0


def grid(methods: Sequence[str], epsilons: Sequence[float], alphas: Sequence[float],
         seeds: Sequence[int], lrs: Mapping[str, float] | None = None) -> list[Cell]:
    """Seeds outermost, so that a sweep stopped early has every method and ε for some seeds."""
    lrs = lrs or {}
    return list(dict.fromkeys(Cell(m, e, a, s, lrs.get(m)) for s in seeds for a in alphas
                              for e in epsilons for m in methods))
