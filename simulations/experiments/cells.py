"""The cells of a sweep and running them one after another: naming, resume, records, progress.

A cell is one Flower simulation, ``<method>-eps<ε>-a<α>-seed<s>`` (learning-rate tuning cells
add ``-lr<lr>``), written to ``<sweep folder>/<cell name>/``. A cell is *complete* when its
``metrics.csv`` has the row of round ``strategy.num-rounds``; complete cells are skipped, so
rerunning the same command resumes the sweep. Each run's output goes to
``<sweep folder>/logs/<cell name>.log``, which is followed while the cell runs (one progress
line per round, :class:`Progress`), and every attempt is appended to ``sweep-attempts.csv``
(name, status, seconds, command): the report's wall time and command.

With a record folder (``--record DIR``, tracked in git), every complete cell is also written to
``DIR/cells/<cell name>.csv``, ``.json`` and ``.environment.json`` as it completes and, with
``--commit``, committed in batches (:mod:`simulations.experiments.record_folder`); a recorded
cell is skipped even without its run folder, so a sweep resumes on a fresh clone.
"""

from __future__ import annotations

import csv
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from common import schema
from common.config import AppConfig, format_run_name
from common.run_config import app_run_config, override_text
from server.checkpoint import CHECKPOINT_FILE
from server.evaluation import gives_one_answer
from server.preflight import check_run
from simulations.experiments.record_folder import (
    BatchCommits,
    differing_settings,
    has_recorded_adapter,
    has_round,
    is_recorded,
    recorded_stale_settings,
    write_record,
)
from simulations.launch.console import (
    Progress,
    class_metrics_text,
    duration,
    failure_reason,
    following,
    output_to,
    say,
)
from simulations.launch.superlink import flwr_run
from simulations.reports.records import ATTEMPTS_FILE, CELLS_DIR, record_command

ROOT = Path(__file__).resolve().parents[2]  # the app: pyproject.toml
Runner = Callable[[list[str], Path], int]  # (run-config items, log file) -> exit code


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
        """``fedsvd-eps6-a0.5-seed0``; tuning cells end in ``-lr0.5`` (:func:`format_run_name`)."""
        return format_run_name(self.method, self.epsilon, self.seed, alpha=self.alpha,
                               lr=self.lr if self.validation_fraction else None)

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
    return has_round(Path(run_folder) / schema.METRICS_FILE, num_rounds)


def stale_settings(run_folder: Path, cfg: AppConfig) -> list[str]:
    """Keys whose value in ``run_folder/config.json`` differs from ``cfg`` (output.* aside)."""
    return differing_settings(Path(run_folder) / schema.CONFIG_FILE, cfg)


def _record_cell(run_folder: Path, record: Path, command: str, commits: BatchCommits | None,
                 say: Callable[[str], None], adapter: bool = False) -> bool:
    """Record a complete run, queued for the next commit; False, said loudly, when that failed."""
    name = run_folder.name
    try:
        paths = [*write_record(run_folder, record, adapter=adapter),
                 record_command(record, command)]
        accuracy = _last_accuracy(run_folder)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        say(f"[record] !!! {name} is done but NOT RECORDED: writing {record} failed: {exc}; "
            f"its run is in {run_folder}")
        return False
    say(f"[record] {name} -> {paths[0]}")
    if commits is not None:
        commits.add(name, paths, f" (final accuracy {accuracy:.4f})")
    return True


# --- the states of the cells before a sweep ----------------------------------------------------

RECORDED, COMPLETE, TO_RUN = "recorded", "complete locally", "to run"


def plan_cells(cells: Sequence[Cell], folder: Path, configs: Mapping[Cell, AppConfig],
               record: Path | None = None, record_adapters: bool = False) -> dict[Cell, str]:
    """The state of every cell: RECORDED (in ``record``), COMPLETE (in ``folder``) or TO_RUN.

    With ``record_adapters`` a cell counts as recorded only with its adapter in the record
    (:func:`~simulations.experiments.record_folder.has_recorded_adapter`).
    Raises ValueError, naming the cells and the keys, when a run in ``folder`` or a record in
    ``record`` has other settings than the planned config (``output.*`` aside): nothing is
    run then.
    """
    folder = Path(folder)
    stale = {c.name: s for c, cfg in configs.items() if (s := stale_settings(folder / c.name, cfg))}
    problems = [] if not stale else [
        "these runs in the sweep folder have other settings; use another --out or delete "
        "them:\n  " + "\n  ".join(f"{name}: {'; '.join(s)}" for name, s in stale.items())]
    if record is not None:
        stale = {c.name: s for c, cfg in configs.items()
                 if (s := recorded_stale_settings(record, c.name, cfg))}
        if stale:
            problems.append(
                f"these cells recorded in {record} have other settings; use another --record "
                f"or delete their files from {Path(record) / CELLS_DIR}:\n  " + "\n  ".join(
                    f"{name}: {'; '.join(s)}" for name, s in stale.items()))
    if problems:
        raise ValueError("\n".join(problems))
    states = {}
    for cell in cells:
        rounds = configs[cell].strategy.num_rounds
        if record is not None and is_recorded(record, cell.name, rounds) and (
                not record_adapters or has_recorded_adapter(record, cell.name)):
            states[cell] = RECORDED
        elif is_complete(folder / cell.name, rounds):
            states[cell] = COMPLETE
        else:
            states[cell] = TO_RUN
    return states


def cell_states(cells: Sequence[Cell], folder: Path, overrides: Sequence[str],
                record: Path | None = None, record_adapters: bool = False) -> dict[Cell, str]:
    """:func:`plan_cells` of the configs that ``overrides`` give the cells; nothing written."""
    folder = Path(folder)
    configs = {c: cell_config(run_config_items(c, folder, overrides)) for c in cells}
    return plan_cells(cells, folder, configs, record, record_adapters)


# --- running the cells: one Flower run each, its log followed ----------------------------------


def flwr_runner(*, num_supernodes: int = 6, cpus_per_client: int = 1,
                gpus_per_client: float = 0.0, timeout: float | None = None,
                ray_address: str | None = None) -> Runner:
    """Run a cell with ``flwr run`` on a private SuperLink; its output and log into ``log``."""
    def run(items: list[str], log: Path) -> int:
        with tempfile.TemporaryDirectory(prefix="flwr-home-") as home, output_to(log):
            try:
                return flwr_run(ROOT, run_config=items, num_supernodes=num_supernodes,
                                cpus_per_client=cpus_per_client,
                                gpus_per_client=gpus_per_client, flwr_home=Path(home),
                                timeout=timeout, ray_address=ray_address)
            finally:
                superlink_log = Path(home) / "superlink.log"
                if superlink_log.is_file():
                    log.with_suffix(".superlink.log").write_bytes(superlink_log.read_bytes())
    return run


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell in this invocation."""

    cell: Cell
    status: str  # "skipped" (recorded or already complete), "done", "failed" or "stopped"
    seconds: float = 0.0
    detail: str = ""
    recorded: bool | None = None  # with a record folder: written (and committed, if asked)


def run_cells(cells: Sequence[Cell], folder: Path, *, overrides: Sequence[str], runner: Runner,
              command: str, say: Callable[[str], None] = say,
              num_partitions: int | None = None, record: Path | None = None,
              commit_every: float | None = None,
              stop_file: Path | None = None, record_adapters: bool = False) -> list[Outcome]:
    """Run every cell not yet complete, in order; a failed cell is logged and the sweep goes on.

    All cell configs are built (and validated) first, and runs in ``folder`` or records in
    ``record`` whose config differs from the planned one stop the sweep before anything runs;
    so does any cell to run that :func:`server.preflight.check_run` refuses (data, partitions
    of ``num_partitions`` SuperNodes, results folder): a ValueError or OSError listing every
    such cell. With ``record``, a recorded cell is skipped (its run folder may be missing), and
    every complete cell without a record gets one as it completes (:func:`write_record`; with
    ``record_adapters``, its adapter too, and a cell recorded without one is not skipped). With
    ``commit_every`` (minutes; None: no commits) the records are committed in batches
    (:class:`BatchCommits`): at most one commit per ``commit_every`` minutes, one more before
    this returns or raises, and the first takes the records of planned cells that an earlier
    sweep left uncommitted. A record that cannot be written or committed is said loudly, its
    cell counts as not recorded, and the sweep goes on. While a cell runs, its log is
    followed: one line per round. When ``stop_file`` exists before a cell would start, that
    cell and the ones after it are not run (status "stopped"): the cell running when it
    appeared finishes and is recorded first, and the same command resumes the sweep.
    """
    folder = Path(folder)
    configs = {c: cell_config(run_config_items(c, folder, overrides)) for c in cells}
    states = plan_cells(cells, folder, configs, record, record_adapters)
    todo = [c for c in cells if states[c] == TO_RUN]
    refuse_failing_runs({c.name: run_config_items(c, folder, overrides,
                                                  (folder / c.name / CHECKPOINT_FILE).is_file())
                         for c in todo}, num_partitions=num_partitions)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    recorded = sum(state == RECORDED for state in states.values())
    say(f"[sweep] {len(cells)} cells, "
        + (f"{recorded} recorded in {record}, " if record is not None else "")
        + f"{len(cells) - len(todo) - recorded} already complete, {len(todo)} to run; folder "
        f"{folder}, logs in {folder / 'logs'}")
    commits = None if record is None or commit_every is None else \
        BatchCommits(record, commit_every, say)
    if commits is not None:
        commits.add_uncommitted(c.name for c in cells if states[c] == RECORDED)
    outcomes = {}
    try:
        for cell in cells:
            if states[cell] == RECORDED:
                outcomes[cell] = Outcome(cell, "skipped", recorded=True)
            elif states[cell] == COMPLETE:
                outcomes[cell] = Outcome(cell, "skipped", recorded=None if record is None else
                                         _record_cell(folder / cell.name, record, command,
                                                      commits, say, record_adapters))
        rounds = [configs[c].strategy.num_rounds for c in todo]
        start, spent, progress = time.monotonic(), [], Progress(say)
        for k, cell in enumerate(todo):
            if commits is not None:
                commits.commit_if_due()
            if stop_file is not None and Path(stop_file).exists():
                say(f"[sweep] {stop_file} exists: stopping before {cell.name}; {len(todo) - k} "
                    "cell(s) not run, the same command goes on with them")
                outcomes |= {c: Outcome(c, "stopped") for c in todo[k:]}
                break
            tag = f"[{cells.index(cell) + 1}/{len(cells)}]"
            on_line = progress.cell(tag, cell.name, rounds[k], sum(rounds[k + 1:]))
            outcome = _run_one(cell, folder, overrides, runner, rounds[k], tag, say, on_line)
            _record_attempt(folder, outcome, command)
            spent.append(outcome.seconds)
            left = len(todo) - k - 1
            say(f"{tag} {cell.name} {outcome.status.upper()} in "
                f"{duration(outcome.seconds)}{outcome.detail} | elapsed "
                f"{duration(time.monotonic() - start)} | ETA "
                f"{duration(sum(spent) / len(spent) * left)} ({left} to run)")
            if record is not None and outcome.status == "done":
                outcome = replace(outcome, recorded=_record_cell(
                    folder / cell.name, record, command, commits, say, record_adapters))
            outcomes[cell] = outcome
    finally:
        uncommitted = set(commits.commit()) if commits is not None else set()
    return [replace(outcomes[c], recorded=False) if c.name in uncommitted else outcomes[c]
            for c in cells]


def _run_one(cell: Cell, folder: Path, overrides: Sequence[str], runner: Runner,
             num_rounds: int, tag: str, say: Callable[[str], None],
             on_line: Callable[[str], None] = lambda line: None) -> Outcome:
    run_folder, log = folder / cell.name, folder / "logs" / f"{cell.name}.log"
    resume = (run_folder / CHECKPOINT_FILE).is_file()  # a crashed attempt: go on after it
    say(f"{tag} {cell.name} started {datetime.now(UTC):%H:%M:%S} UTC"
        f"{' (resuming its checkpoint)' if resume else ''}; log {log}")
    started = time.monotonic()
    try:
        with following(log, on_line):
            code = runner(run_config_items(cell, folder, overrides, resume), log)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not end the sweep
        with log.open("a") as f:
            traceback.print_exc(file=f)
        code, why = -1, f"{type(exc).__name__}: {exc}"
    else:
        why = f"exit code {code}"
    seconds = time.monotonic() - started
    if code == 0 and is_complete(run_folder, num_rounds):
        return Outcome(cell, "done", seconds, _final_result(run_folder))
    reason = failure_reason(log)
    detail = (f" ({why}{'' if code else ', no final round in metrics.csv'}"
              f"{': ' + reason if reason else ''}; log {log})")
    return Outcome(cell, "failed", seconds, detail)


def _final_row(run_folder: Path) -> dict[str, str]:
    with (run_folder / schema.METRICS_FILE).open() as f:
        return list(csv.DictReader(f))[-1]


def _last_accuracy(run_folder: Path) -> float:
    return float(_final_row(run_folder)[schema.ACCURACY])


def _final_result(run_folder: Path) -> str:
    """The end of a finished cell's line: ``: final accuracy 0.4148 (balanced 0.4012)``.

    A ``ONE ANSWER`` flag follows when the final model gives one class to ≥
    ``server.evaluation.ONE_ANSWER_SHARE`` of the examples (the cell's log has the WARNING that
    names it).
    """
    row = _final_row(run_folder)
    text = f": final accuracy {float(row[schema.ACCURACY]):.4f}"
    text += class_metrics_text(row)
    share = row.get(schema.MOST_PREDICTED_SHARE)
    if share and gives_one_answer(float(share)):
        text += (f"; ONE ANSWER: the final model gives one class to {float(share):.1%} of the "
                 "examples (not learning; WARNING in its log)")
    return text


def _record_attempt(folder: Path, outcome: Outcome, command: str) -> None:
    path = folder / ATTEMPTS_FILE
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["finished", "run", "status", "seconds", "command"])
        writer.writerow([datetime.now(UTC).isoformat(timespec="seconds"), outcome.cell.name,
                         outcome.status, f"{outcome.seconds:.1f}", command])


STOPPED_EXIT_CODE = 3  # the sweep stopped on request (--stop-file): not done, not failed


def report_outcomes(outcomes: Sequence[Outcome], say: Callable[[str], None] = say) -> int:
    """Print the end-of-sweep summary; the exit status of the sweep.

    1 if a cell failed or a record was not written; else ``STOPPED_EXIT_CODE`` if cells were
    left for later on request; else 0.
    """
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("done", "skipped", "failed", "stopped")}
    unrecorded = [o for o in outcomes if o.recorded is False]
    seconds = sum(o.seconds for o in outcomes)
    say(f"[sweep] finished: {counts['done']} run, {counts['skipped']} already complete, "
        f"{counts['failed']} failed, {duration(seconds)} of cell runs"
        + (f"; {len(unrecorded)} NOT RECORDED" if unrecorded else ""))
    for o in outcomes:
        if o.status == "failed":
            say(f"[sweep] FAILED {o.cell.name}{o.detail}")
    for o in unrecorded:
        say(f"[sweep] NOT RECORDED {o.cell.name}: done, but its record was not written or "
            "committed (see the [record] !!! line above)")
    if counts["stopped"]:
        say(f"[sweep] STOPPED on request: {counts['stopped']} cell(s) not run; run the same "
            "command again to go on")
    if counts["failed"] or unrecorded:
        return 1
    return STOPPED_EXIT_CODE if counts["stopped"] else 0


def grid(methods: Sequence[str], epsilons: Sequence[float], alphas: Sequence[float],
         seeds: Sequence[int], lrs: Mapping[str, float] | None = None) -> list[Cell]:
    """Seeds outermost, so that a sweep stopped early has every method and ε for some seeds."""
    lrs = lrs or {}
    return list(dict.fromkeys(Cell(m, e, a, s, lrs.get(m)) for s in seeds for a in alphas
                              for e in epsilons for m in methods))
