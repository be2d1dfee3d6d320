"""Where a node keeps its privacy ledger, and whether the ledger spans runs.

A node's ε must count every step it has ever taken on its data. Flower keeps ``Context.state``
per run and per SuperNode process, so a ledger kept only there starts again from ε = 0 in each
new ``flwr run`` and after each restart of the SuperNode. :func:`ledger_place` decides:

- **On a SuperNode** (Flower's deployment runtime, see :func:`flower_runtime`): a file that the
  node controls and that spans every run it serves: the node config's ``privacy-state-file``
  (an absolute path), else ``privacy-ledger.json`` in the SuperNode's ``FLWR_HOME``. The run
  config, which the SuperLink's operator chooses, never decides where it lives. One file per
  ``FLWR_HOME``, not per partition-id: a node restarted with another partition-id may read
  the same records again, so only a ledger of everything the node has trained on never
  under-counts (Flower's docs and ``deploy.local`` give each SuperNode its own ``FLWR_HOME``;
  SuperNodes that share one also share one ledger, which over-counts). A node that cannot read
  or write the file refuses to train (:class:`LedgerUnavailable`), unless its node config says
  ``privacy-per-run-budget=true``: then the ledger lives in ``Context.state`` alone, ε restarts
  with every run and every restart, and a WARNING says so each time.
- **In a simulation** (Flower's simulation runtime, or the ClientApp called in-process, as the
  tests do): the run's own ``<results folder>/privacy/partition-<id>.json`` when ``output.dir``
  is absolute (so that a resumed run goes on counting), else ``Context.state``: one run, one
  budget, on data whose owner runs the simulation.

σ is per run (:func:`client.training.load_ledger`): a file that spans runs stores it with the
Flower run id it was calibrated in, and a new run calibrates its own after every earlier step
(:func:`privacy.policy.plan_round`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from filelock import FileLock
from flwr.app import Context
from flwr.common.logger import log
from flwr.supercore.constant import TaskType
from flwr.supercore.utils import get_flwr_home

from client import training as t
from common.config import RUN_LEDGER_DIR, AppConfig, OutputConfig, PrivacyConfig
from privacy import PrivacyLedger

PRIVACY_STATE_KEY = "privacy-state-file"  # node config: where a SuperNode keeps its ledger
PER_RUN_BUDGET_KEY = "privacy-per-run-budget"  # node config: true = ε restarts with each run
MAX_EPSILON_KEY = "max-epsilon"  # node config: the most ε this node ever spends, every run
NODE_LEDGER_FILE = "privacy-ledger.json"  # in a SuperNode's FLWR_HOME, by default
RUN_ID_FIELD = "run-id"  # in a file that spans runs: the Flower run its σ belongs to

DEPLOYMENT, SIMULATION, IN_PROCESS = "deployment", "simulation", "in-process"
SUPERNODE_RUNNER = "flwr.supernode.runtime.run_clientapp"  # calls the ClientApp on a SuperNode


class LedgerUnavailable(ValueError):
    """The node's ledger file cannot be read or written: the node must not train."""


@dataclass(frozen=True)
class LedgerPlace:
    """Where a node's ledger lives: ``path`` (None: ``Context.state`` only), and for how long.

    ``spans_runs``: the file holds every run the node has served (a SuperNode's); else it is
    the run's own. ``per_run_budget``: the node opted out of a ledger that spans runs.
    """

    path: Path | None
    spans_runs: bool = False
    per_run_budget: bool = False


def flower_runtime() -> str:
    """Which Flower runtime calls this ClientApp: ``DEPLOYMENT``, ``SIMULATION`` or ``IN_PROCESS``.

    ``DEPLOYMENT``: this process is the one a SuperNode's SuperExec starts for its ClientApp,
    Flower's ``flwr-clientapp`` command (``TaskType.CLIENT_APP``, whichever executor starts
    it), or Flower's SuperNode runner (:data:`SUPERNODE_RUNNER`) is on the call stack.
    ``SIMULATION``: the call runs in a Ray actor, where Flower's simulation runtime (whose only
    backend is Ray) runs every ClientApp call. ``IN_PROCESS``: neither; the ClientApp's
    functions called directly in Python, as the tests do. A deployment signal wins: a SuperNode
    is never taken for a simulation.
    """
    if Path(sys.argv[0]).name == TaskType.CLIENT_APP or _called_by(SUPERNODE_RUNNER):
        return DEPLOYMENT
    if _in_ray_actor():
        return SIMULATION
    return IN_PROCESS


def _called_by(module: str) -> bool:
    """Whether a function of ``module`` is on the current thread's call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == module:
            return True
        frame = frame.f_back
    return False


def _in_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (never imports Ray: a SuperNode has none)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def node_flag(context: Context, key: str) -> bool:
    """A true/false node config value (absent: false); ValueError naming key and value."""
    raw = context.node_config.get(key, False)
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if not isinstance(raw, bool):
        raise ValueError(f"node config {key}={raw!r}: expected true or false, e.g. "
                         f"--node-config \"{key}=true\"")
    return raw


def node_max_epsilon(context: Context) -> float | None:
    """The node config's ``max-epsilon`` (the most ε this node ever reaches), or None."""
    raw = context.node_config.get(MAX_EPSILON_KEY)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
        raise ValueError(f"node config {MAX_EPSILON_KEY}={raw!r}: expected a number > 0 (the "
                         f"most ε this node spends over all runs), e.g. --node-config "
                         f"\"{MAX_EPSILON_KEY}=3.0\"")
    return float(raw)


def ledger_place(context: Context, cfg: AppConfig) -> LedgerPlace:
    """Where this node keeps its ledger (see the module docstring)."""
    raw = context.node_config.get(PRIVACY_STATE_KEY)
    per_run = node_flag(context, PER_RUN_BUDGET_KEY)
    if raw and per_run:
        raise ValueError(f"node config {PRIVACY_STATE_KEY}={raw!r} and {PER_RUN_BUDGET_KEY}=true: "
                         "a ledger file that spans runs, or a budget per run; remove one")
    if raw:
        path = Path(str(raw)).expanduser()
        if not path.is_absolute():  # the ClientApp's working directory is Flower's, not ours
            raise ValueError(f"{PRIVACY_STATE_KEY}={raw!r}: must be an absolute path")
        return LedgerPlace(path, spans_runs=True)
    if per_run:
        return LedgerPlace(None, per_run_budget=True)
    if flower_runtime() == DEPLOYMENT:
        return LedgerPlace(get_flwr_home().expanduser().resolve() / NODE_LEDGER_FILE,
                           spans_runs=True)
    if not Path(cfg.output.dir).expanduser().is_absolute():
        return LedgerPlace(None)  # relative: it would resolve against Flower's directory
    partition_id, _ = t.node_partition(context)
    return LedgerPlace(cfg.results_folder / RUN_LEDGER_DIR / f"partition-{partition_id}.json")


@contextlib.contextmanager
def node_privacy_state(context: Context, cfg: AppConfig) -> Iterator[LedgerPlace]:
    """Keep the ledger in the file of :func:`ledger_place`, if any, around one round or census.

    The file is read into ``Context.state`` before the round unless ``Context.state`` already
    counts at least as many steps: a copy can only lag behind (a simulation spread over several
    machines writes each node's file on whichever machine ran its round), and the ledger that
    counts more is the true one. It is written back atomically after the round, under an
    exclusive lock held for the whole round, so that concurrent rounds cannot drop steps. A
    resumed private run without a file is refused (ValueError): its node would count from zero
    the steps it took before the resume. The file is rewritten only when the round changed
    the ledger or σ.
    """
    place = ledger_place(context, cfg)
    if place.path is None:
        _check_resumable(cfg.output, cfg.privacy, place)
        if place.per_run_budget and cfg.privacy.is_private:
            log(WARNING, "node config %s=true: this node keeps its privacy ledger in this run's "
                "Context.state only, so its ε starts again from 0 in every run and after every "
                "restart of the SuperNode; the ε it reports covers this run only, not what its "
                "data has spent in earlier runs", PER_RUN_BUDGET_KEY)
        yield place
        return
    path, accountant = place.path, cfg.privacy.accountant
    with FileLock(_writable_lock(path)):
        on_disk = _read_ledger_file(path, accountant, context, spans_runs=place.spans_runs)
        _adopt(context, on_disk, accountant)
        try:
            yield place
        finally:
            if (kept := t.load_ledger(context, accountant)) != on_disk and kept[0].history:
                _write_ledger_file(path, *kept, run_id=context.run_id,
                                   spans_runs=place.spans_runs)


def _check_resumable(output: OutputConfig, privacy: PrivacyConfig, place: LedgerPlace) -> None:
    """Refuse a resumed private run whose earlier steps are in no file this node reads."""
    if not (output.resume and privacy.is_private):
        return
    if place.per_run_budget:
        raise ValueError(f"output.resume=true with node config {PER_RUN_BUDGET_KEY}=true: this "
                         "node cannot read the privacy ledger of the rounds before the resume "
                         "(it kept it in that run's Context.state); remove "
                         f"{PER_RUN_BUDGET_KEY} so that its ledger file spans the runs")
    raise ValueError(
        f"output.resume=true with output.dir={output.dir!r} (relative) and no node "
        f"config {PRIVACY_STATE_KEY}: this node cannot read the privacy ledger of the "
        "rounds before the resume; set output.dir to an absolute path (simulations.run "
        f"does) or give each node a {PRIVACY_STATE_KEY}")


def _unwritable(path: Path, exc: OSError) -> LedgerUnavailable:
    """The refusal of a node whose ledger file cannot be written: the path, why, the fixes."""
    return LedgerUnavailable(
        f"privacy ledger {path} cannot be written ({exc}). This node refuses to train without "
        "it: its ε would start again from 0 in the next run or after a restart, on the same "
        f"data. Fix: make {path.parent} writable (a SuperNode keeps the file in its FLWR_HOME), "
        f"give the SuperNode the node config {PRIVACY_STATE_KEY}=\"<absolute path of a writable "
        f"file>\", or accept a budget that restarts with every run: {PER_RUN_BUDGET_KEY}=true")


def _unreadable(path: Path, exc: Exception) -> LedgerUnavailable:
    """The refusal of a node whose ledger file cannot be read: the path, why, the fixes."""
    return LedgerUnavailable(
        f"privacy ledger {path} is unreadable ({exc.__cause__ or exc}). This node refuses to "
        "train with an unknown privacy history. Fix: restore the file (delete it only to give "
        "this node a fresh budget on new data), or accept a budget that restarts with every "
        f"run: {PER_RUN_BUDGET_KEY}=true")


def _writable_lock(path: Path) -> Path:
    """The lock file beside ``path``, created now: LedgerUnavailable if the folder refuses."""
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a"):  # fail here with the reason, rather than wait inside FileLock
            pass
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    return lock


def _read_ledger_file(path: Path, accountant: str, context: Context, *,
                      spans_runs: bool) -> tuple[PrivacyLedger, float | None]:
    """The file's ledger (empty if there is no file) and the σ it holds for this run.

    A run's own file holds its σ (a resumed run keeps it); a file that spans runs holds the σ
    of the run that wrote it last, which is this run's only if the run ids agree (a restarted
    SuperNode keeps its σ; a new run calibrates its own).
    """
    if not path.exists():
        return PrivacyLedger(accountant), None
    try:
        ledger, sigma = PrivacyLedger.load(path, accountant)
        run_id = json.loads(path.read_text(encoding="utf-8")).get(RUN_ID_FIELD)
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if spans_runs and run_id != str(context.run_id):
        return ledger, None
    return ledger, sigma


def _adopt(context: Context, on_disk: tuple[PrivacyLedger, float | None],
           accountant: str) -> None:
    """Put the file's ledger into ``Context.state`` unless the context counts more steps."""
    ledger, sigma = t.load_ledger(context, accountant)
    if on_disk[0].history and on_disk[0].steps >= ledger.steps:
        t.store_ledger(context, on_disk[0], sigma if on_disk[1] is None else on_disk[1])


def _write_ledger_file(path: Path, ledger: PrivacyLedger, sigma: float | None, *, run_id: int,
                       spans_runs: bool) -> None:
    """Write the ledger and this run's σ atomically (with the run id if the file spans runs)."""
    try:
        ledger.save(path, noise_multiplier=sigma,
                    extra={RUN_ID_FIELD: str(run_id)} if spans_runs else None)
    except OSError as exc:  # the reply is withheld: nothing this round computed is released
        raise _unwritable(path, exc) from exc
