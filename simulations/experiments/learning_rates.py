"""One learning rate per method, chosen on the validation split, and the file that keeps them.

``python -m simulations.sweep --tune-lr --lrs 0.25,0.5,1,2`` runs the same grid for every
method with ``data.validation-fraction`` > 0 (a seeded share of the training data, carved out
before partitioning, is the evaluation split; the test split is not loaded), picks per method
the rate with the best mean final validation accuracy (for ``model.task = "causal-lm"``: the
lowest mean final validation loss, the log of perplexity), and writes it to the file
``--lr-file`` names (a record's ``learning_rates.toml``), which a later sweep applies per method
with the same ``--lr-file``. Without one a sweep gives each method the rate of its run config
(:func:`method_conf_rates`).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import tomli_w

from common.methods import method_order
from simulations.experiments.cells import ROOT, Cell
from simulations.reports.statistics import summarize

CONF = ROOT / "simulations" / "conf"  # <method>.toml: a method's settings, its rate among them
HEADER = """\
# Learning rate per method for `python -m simulations.sweep` (it sets train.learning-rate).
# Written by `python -m simulations.sweep --tune-lr`: every method runs the same grid; the
# chosen rate has the best mean final accuracy on the validation split (data.validation-fraction
# of the training data, carved out before partitioning; never the test split), ties going to
# the lower validation loss, then to the smaller rate; for a causal LM (chosen-by = "loss") the
# lowest mean final validation loss.
"""


def tuning_grid(methods: Sequence[str], epsilons: Sequence[float], alphas: Sequence[float],
                seeds: Sequence[int], lrs: Sequence[float],
                validation_fraction: float) -> list[Cell]:
    """Every method × learning rate × ε × α × seed, evaluated on the validation split."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"--validation-fraction={validation_fraction}: must be in (0, 1); "
                         "tuning on the test split is not allowed")
    return list(dict.fromkeys(Cell(m, e, a, s, lr, validation_fraction) for s in seeds
                              for a in alphas for e in epsilons for lr in lrs for m in methods))


def choose_learning_rates(final: pd.DataFrame, lrs: Sequence[float], by: str = "accuracy"
                          ) -> tuple[dict[str, dict], list[str]]:
    """Per method with a complete grid: the chosen rate and the mean accuracy of every rate.

    ``final``: one row per tuning run (method, learning_rate, accuracy, loss). ``by``:
    ``"accuracy"`` (highest mean, ties to the lower loss) or ``"loss"`` (lowest mean, for a
    causal LM, whose next-token accuracy moves in the third decimal; ties to the higher
    accuracy); remaining ties go to the smaller rate. Returns the tables to write and the
    methods left out because some rate has no complete run.
    """
    if by not in ("accuracy", "loss"):
        raise ValueError(f"by={by!r}: 'accuracy' or 'loss'")
    summary = summarize(final, by=("method", "learning_rate"))
    chosen, incomplete = {}, []
    for method in method_order(summary["method"]):
        rows = summary[summary["method"] == method]
        if not all(any(math.isclose(lr, r) for r in rows["learning_rate"]) for lr in lrs):
            incomplete.append(method)
            continue
        keys = ["mean", "loss"] if by == "accuracy" else ["loss", "mean"]
        best = rows.sort_values([*keys, "learning_rate"],
                                ascending=[by == "loss", by == "accuracy", True]).iloc[0]
        ordered = rows.sort_values("learning_rate")
        chosen[method] = {
            "learning-rate": float(best["learning_rate"]),
            "grid": [float(v) for v in ordered["learning_rate"]],
            "validation-accuracy": [round(float(v), 4) for v in ordered["mean"]],
            "validation-loss": [round(float(v), 4) for v in ordered["loss"]],
            "chosen-by": by,
            "runs-per-rate": int(ordered["n"].min()),
        }
    return chosen, incomplete


def read_learning_rates(path: Path) -> dict[str, dict]:
    """The tables of ``path`` ({method: {"learning-rate": ..., ...}}); {} if it does not exist."""
    path = Path(path)
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def method_conf_rates(methods: Sequence[str]) -> dict[str, float]:
    """``train.learning-rate`` of each method's ``simulations/conf/<method>.toml`` that sets one.

    A method without such a file (FedSVD: its settings are the run defaults of pyproject.toml)
    or whose file sets no rate keeps the run config's.
    """
    rates = {}
    for method in methods:
        conf = CONF / f"{method}.toml"
        rate = (tomllib.loads(conf.read_text()).get("train", {}).get("learning-rate")
                if conf.is_file() else None)
        if rate is not None:
            rates[method] = float(rate)
    return rates


def learning_rates_for(path: Path, methods: Sequence[str]) -> dict[str, float]:
    """The tuned rate of each method; raise naming the methods ``path`` lacks."""
    tables = read_learning_rates(path)
    missing = [m for m in methods if "learning-rate" not in tables.get(m, {})]
    if missing:
        raise ValueError(f"{path} has no learning rate for {', '.join(missing)}: run "
                         f"`python -m simulations.sweep --tune-lr --methods {','.join(missing)} "
                         f"--lr-file {path}`"
                         " or pass --lr-file none to use train.learning-rate for every method")
    return {m: float(tables[m]["learning-rate"]) for m in methods}


def write_learning_rates(path: Path, chosen: dict[str, dict], note: dict[str, str]) -> None:
    """Add (or replace) the tables of ``chosen``, each with ``note``; keep the other methods."""
    tables = {**read_learning_rates(path), **{m: {**t, **note} for m, t in chosen.items()}}
    ordered = {method: tables[method] for method in method_order(tables)}
    Path(path).write_text(HEADER + "\n" + tomli_w.dumps(ordered))
