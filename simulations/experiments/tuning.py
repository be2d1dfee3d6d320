"""Learning-rate trials that share one privacy budget: their plan, folder and composed ε.

A tuning (``fedsvd-tune``, :mod:`simulations.tune`) runs one cell per candidate rate on the
validation split (:func:`simulations.experiments.learning_rates.tuning_grid`). On the private
federation each of the K trials has ``privacy.trials = K`` (:mod:`privacy.trials`), so that
their plain composition stays within ``privacy.epsilon``; on a public proxy task each trial has
``privacy.trials = 1`` at the final run's ε, and the target federation spends nothing.

The tuning folder holds the trials' run folders and :data:`TUNE_FILE`, the plan (and the
result once chosen): a folder that holds another plan is refused, so that a second tuning never
mixes its trials (and its privacy spending) with an earlier one's unseen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.common.config import parse_config_args

from common.config import RUN_LEDGER_DIR
from common.run_config import override_text, run_config_args
from privacy.accounting import HistoryEntry, PrivacyLedger, epsilon_of
from server.preflight import remove_path
from simulations.experiments.cells import Cell, cell_config, run_config_items
from simulations.experiments.learning_rates import tuning_grid

TUNE_FILE = "tune.json"  # in the tuning folder: the plan, then the result
# run-config keys the tuning sets itself -> the flag that sets them
SET_BY_TUNE = {"strategy.name": "--method", "privacy.epsilon": "--epsilon",
               "privacy.trials": "the number of --lrs", "train.learning-rate": "--lrs",
               "data.validation-fraction": "--validation-fraction", "seed": "--seed",
               "data.dirichlet-alpha": "--alpha"}


@dataclass(frozen=True)
class TuningPlan:
    """What a tuning runs: one trial per rate of ``lrs``, on the target or on a public proxy.

    ``proxy_run_config``: overrides applied after ``run_config`` that make the trials run on a
    public proxy task (its data keys); () tunes on the target federation itself.
    """

    method: str
    lrs: tuple[float, ...]
    epsilon: float
    alpha: float
    seed: int
    validation_fraction: float
    run_config: tuple[str, ...] = ()
    proxy_run_config: tuple[str, ...] = ()

    @property
    def on_proxy(self) -> bool:
        """Whether the trials run on a public proxy task rather than the target federation."""
        return bool(self.proxy_run_config)

    @property
    def trials(self) -> int:
        """``privacy.trials`` of every trial: K on the target, 1 on a public proxy."""
        return 1 if self.on_proxy else len(self.lrs)

    def cells(self) -> list[Cell]:
        """One cell per rate, evaluated on the validation split."""
        return tuning_grid([self.method], [self.epsilon], [self.alpha], [self.seed],
                           list(self.lrs), self.validation_fraction)

    def overrides(self) -> list[str]:
        """The run-config items of every trial (each cell's own keys come after them)."""
        return [*self.run_config, *self.proxy_run_config,
                override_text({"privacy.trials": self.trials})]

    def to_dict(self) -> dict:
        """JSON-friendly, for :data:`TUNE_FILE`."""
        return {**asdict(self), "lrs": list(self.lrs), "run_config": list(self.run_config),
                "proxy_run_config": list(self.proxy_run_config), "trials": self.trials}


def override_problems(items: Sequence[str], flag: str) -> list[str]:
    """The keys of ``items`` that the tuning sets itself (``output.*`` too), naming the flag."""
    keys = parse_config_args(run_config_args(items)) if items else {}
    problems = [f"{flag} sets {key}={keys[key]!r}: the tuning sets it ({SET_BY_TUNE[key]})"
                for key in SET_BY_TUNE if key in keys]
    problems += [f"{flag} sets {key}={keys[key]!r}: the tuning chooses each trial's folder "
                 "(--out); a trial's steps cannot be replaced or resumed elsewhere"
                 for key in keys if key.startswith("output.")]
    return problems


def proxy_problems(plan: TuningPlan, folder: Path) -> list[str]:
    """Refuse a proxy that reads the target's own data source: its trials would spend ε there.

    Another subset of the same file (other labels, columns or sizes) is still the private data.
    """
    if not plan.on_proxy:
        return []
    cell = plan.cells()[0]
    target = cell_config(run_config_items(cell, folder, [*plan.run_config])).data.source
    proxy = cell_config(run_config_items(cell, folder, plan.overrides())).data.source
    if _same_source(proxy, target):
        return [f"--proxy-run-config {' '.join(plan.proxy_run_config)!r} leaves data.source as "
                f"--run-config has it ({target!r}): trials on the target's own data would spend "
                "its budget; give the public task's data.* keys"]
    return []


def _same_source(a: str, b: str) -> bool:
    """Whether two ``data.source`` values name the same data (a file by its resolved path)."""
    def where(source: str) -> str:
        return source if source == "20newsgroups" else str(Path(source).expanduser().resolve())
    return where(a) == where(b)


def prepare_folder(folder: Path, plan: TuningPlan, *, overwrite: bool) -> list[str]:
    """Check that ``folder`` is new, empty, or holds this plan; return what ``overwrite`` removed.

    A folder holding another plan is refused (ValueError) unless ``overwrite``: then the earlier
    plan's trial folders and logs, and its :data:`TUNE_FILE`, are removed (nothing else). A
    non-empty folder without :data:`TUNE_FILE` is refused: it is not a tuning's.
    """
    folder = Path(folder)
    manifest = folder / TUNE_FILE
    if not manifest.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"--out {folder}: the folder holds files but no {TUNE_FILE}; it is "
                             "not a tuning's folder: give a new or empty one")
        return []
    earlier = json.loads(manifest.read_text())
    if earlier.get("plan") == plan.to_dict():
        return []
    differing = sorted(k for k in plan.to_dict() if earlier.get("plan", {}).get(k)
                       != plan.to_dict()[k])
    if not overwrite:
        raise ValueError(f"--out {folder} holds a tuning with other settings "
                         f"({', '.join(differing)}; {manifest}); its trials spent privacy "
                         "too: give another --out, or --overwrite to remove that tuning's "
                         "trials and start this one there")
    removed = [str(path) for name in earlier.get("trial-folders", [])
               for path in (folder / name, folder / "logs" / f"{name}.log",
                            folder / "logs" / f"{name}.superlink.log") if remove_path(path)]
    manifest.unlink()
    return removed


def write_manifest(folder: Path, plan: TuningPlan, command: str,
                   result: dict | None = None) -> Path:
    """Write :data:`TUNE_FILE`: the plan, its trial folders, the command, and ``result``."""
    path = Path(folder) / TUNE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"plan": plan.to_dict(), "trial-folders": [c.name for c in plan.cells()],
               "command": command, **({"result": result} if result is not None else {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class TrialLedgers:
    """The node ledgers one trial left: partition id -> (history, the trial's σ)."""

    name: str
    nodes: dict[int, tuple[list[HistoryEntry], float | None]]

    @property
    def noise_multiplier(self) -> float | None:
        """The trial's σ (the same on every node of one size; the largest if they differ)."""
        sigmas = [s for _, s in self.nodes.values() if s is not None]
        return max(sigmas) if sigmas else None


def trial_ledgers(run_folder: Path, accountant: str) -> TrialLedgers:
    """Every ``<run>/privacy/partition-<id>.json`` of one trial (:mod:`client.ledger`)."""
    nodes = {}
    for path in sorted((Path(run_folder) / RUN_LEDGER_DIR).glob("partition-*.json")):
        ledger, sigma = PrivacyLedger.load(path, accountant)
        nodes[int(path.stem.removeprefix("partition-"))] = (ledger.history, sigma)
    return TrialLedgers(Path(run_folder).name, nodes)


def trial_epsilon(trial: TrialLedgers, accountant: str, delta: float) -> float:
    """The largest ε a node reached in this trial alone (0 if no node trained)."""
    return max((epsilon_of(accountant, h, delta) for h, _ in trial.nodes.values()), default=0.0)


def composed_epsilons(trials: Sequence[TrialLedgers], accountant: str,
                      delta: float) -> dict[int, float]:
    """ε of each node over every trial: its histories concatenated, on one accountant.

    Plain composition, the rule by which :mod:`privacy.trials` calibrated each trial's σ.
    """
    nodes = sorted({node for trial in trials for node in trial.nodes})
    return {node: epsilon_of(accountant, [entry for trial in trials
                                          for entry in trial.nodes.get(node, ([], None))[0]],
                             delta)
            for node in nodes}
