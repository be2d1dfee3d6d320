"""Learning-rate tuning whose privacy cost is counted: ``fedsvd-tune``.

Examples
--------
fedsvd-tune --method fedsvd --lrs 0.125,0.5,2 --epsilon 6
fedsvd-tune --method fedsvd --lrs 0.125,0.5,2 --epsilon 6 --run-config my-task.toml
    --proxy-run-config simulations/conf/proxy_20newsgroups.toml

One trial per rate, each a Flower simulation evaluated on the validation split
(``data.validation-fraction`` of the training data, held out before partitioning), chosen by
the best final validation accuracy (ties: the lower validation loss, then the smaller rate; a
causal LM: the lowest validation loss), the rule of ``fedsvd-sweep --tune-lr``.

On the private federation (the default) ``--epsilon`` is the budget of *all* K trials: each runs
with ``privacy.trials = K``, so its σ is calibrated for the plain composition of the K runs
(:mod:`privacy.trials`), and the total ε of each node is composed from every trial's ledger. The
chosen trial's adapter is the result: the budget is spent. The validation scores that choose
the rate are not privatised, so the guarantee covers the trained adapters, not the choice.

With ``--proxy-run-config`` the trials run on a public proxy task instead (its data keys, applied
after ``--run-config``, at ``privacy.trials = 1`` and the final run's ε): nothing of the target
federation's budget is spent, and the final run on the private data spends its whole ε.

Trials run one after another in ``--out`` (one folder each, as the sweep's cells); complete
trials are skipped, so the same command resumes. Exit 0 when a rate was chosen, 1 when a trial
failed (the reason on the last lines), 2 when refused before any run.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from common.methods import METHOD_NAMES, METHODS
from common.run_config import override_text
from common.schema import ADAPTER_DIR
from simulations.experiments import learning_rates as sweep_lr
from simulations.experiments import tuning
from simulations.experiments.cells import (
    ROOT,
    Runner,
    cell_config,
    flwr_runner,
    report_outcomes,
    run_cells,
    run_config_items,
)
from simulations.launch.console import say
from simulations.launch.superlink import RAY_ADDRESS_HELP
from simulations.reports.records import load_runs
from simulations.sweep import tuning_criterion

REFUSED, FAILED = 2, 1
NOT_PRIVATISED = ("the validation scores that chose the rate are not privatised: the guarantee "
                  "covers the trained adapters, not the choice (private selection, Papernot & "
                  "Steinke 2022, would need DP scores and a random number of trials)")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None
    if len(rates) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: at least two rates to choose from")
    if bad := [r for r in rates if not (math.isfinite(r) and r > 0)]:
        raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]:g} is not a finite rate > 0")
    if len(set(rates)) < len(rates):
        raise argparse.ArgumentTypeError(f"{text!r}: a rate appears twice (each trial spends "
                                         "privacy)")
    return rates


def _budget(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value:g}: must be a finite ε > 0 (tuning without "
                                         "DP has nothing to count: fedsvd-sweep --tune-lr)")
    return value


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(METHOD_NAMES)}")
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; a bad value exits 2 with the flag and the value (argparse)."""
    p = argparse.ArgumentParser(prog="fedsvd-tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", type=_method, default="fedsvd", help="strategy.name")
    p.add_argument("--lrs", type=_rates, required=True, help="candidate rates, e.g. 0.125,0.5,2")
    p.add_argument("--epsilon", type=_budget, required=True,
                   help="the budget of ALL trials together (with --proxy-run-config: of the "
                        "final run on the private data)")
    p.add_argument("--run-config", action="append", default=[],
                   help="'k=v ...' or a .toml file, for every trial (repeatable)")
    p.add_argument("--proxy-run-config", action="append", default=[],
                   help="tune on a public proxy task: its data keys ('k=v ...' or .toml), "
                        "applied after --run-config; the target spends nothing")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of the training data held out for validation; default 0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α; default 0.5")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "tune",
                   help="the tuning's folder: one sub-folder per trial; default results/tune")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier tuning with other settings in --out (removes its "
                        "trial folders)")
    p.add_argument("--num-supernodes", type=int, default=6, help="clients")
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--ray-address", metavar="HOST:PORT", help=RAY_ADDRESS_HELP)
    p.add_argument("--cell-timeout", type=float, help="seconds; a slower trial fails")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Run the trials, choose the rate, compose ε; 0, 1 if a trial failed, 2 if refused."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    plan = tuning.TuningPlan(args.method, tuple(args.lrs), args.epsilon, args.alpha, args.seed,
                             args.validation_fraction, tuple(args.run_config),
                             tuple(args.proxy_run_config))
    try:
        removed = _refuse_before_running(args, plan)
    except (ValueError, OSError) as exc:
        sys.stdout.flush()
        print(f"[tune] error: {exc}\n[tune] refused before starting: nothing was run",
              file=sys.stderr)
        return REFUSED
    for path in removed:
        say(f"[tune] --overwrite: removed {path}")
    command = shlex.join(["fedsvd-tune", *argv])
    fresh = not (args.out / tuning.TUNE_FILE).is_file()
    tuning.write_manifest(args.out, plan, command)
    runner = runner or flwr_runner(num_supernodes=args.num_supernodes,
                                   cpus_per_client=args.cpus_per_client,
                                   gpus_per_client=args.gpus_per_client,
                                   timeout=args.cell_timeout, ray_address=args.ray_address)
    try:
        outcomes = run_cells(plan.cells(), args.out, overrides=plan.overrides(), runner=runner,
                             command=command, num_partitions=args.num_supernodes)
    except (ValueError, OSError) as exc:  # a trial's config, data or folder: nothing ran
        if fresh:
            (args.out / tuning.TUNE_FILE).unlink(missing_ok=True)
        sys.stdout.flush()
        print(f"[tune] error: {exc}\n[tune] refused before starting: nothing was run",
              file=sys.stderr)
        return REFUSED
    code = report_outcomes(outcomes)
    spend = _spend(args.out, plan)
    if failed := [o for o in outcomes if o.status == "failed"]:
        say(spend["line"])
        say(f"[tune] FAILED: {len(failed)} of {len(outcomes)} trials did not complete, so no rate "
            f"is chosen; the first: {failed[0].cell.name}{failed[0].detail}")
        return FAILED
    return _choose(args, plan, command, spend) or code


def _refuse_before_running(args: argparse.Namespace, plan: tuning.TuningPlan) -> list[str]:
    """Every problem of the flags and the plan at once (ValueError); what --overwrite removed."""
    problems = [*tuning.override_problems(args.run_config, "--run-config"),
                *tuning.override_problems(args.proxy_run_config, "--proxy-run-config")]
    if not 0 < args.validation_fraction < 1:
        problems.append(f"--validation-fraction {args.validation_fraction:g}: must be in (0, 1) "
                        "(tuning on the test split is not allowed)")
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        problems.append(f"--num-supernodes {args.num_supernodes} / --cpus-per-client "
                        f"{args.cpus_per_client}: must be >= 1")
    if problems:
        raise ValueError("\n  ".join(problems))
    for cell in plan.cells():  # every trial's config, before anything is written
        cell_config(run_config_items(cell, args.out, plan.overrides()))
    if problems := tuning.proxy_problems(plan, args.out):
        raise ValueError("\n  ".join(problems))
    return tuning.prepare_folder(args.out, plan, overwrite=args.overwrite)


def _spend(folder: Path, plan: tuning.TuningPlan) -> dict:
    """Each trial's σ and ε and each node's ε over all trials, from the trials' ledgers."""
    cfg = cell_config(run_config_items(plan.cells()[0], folder, plan.overrides()))
    accountant, delta = cfg.privacy.accountant, cfg.privacy.delta
    trials = [tuning.trial_ledgers(folder / c.name, accountant) for c in plan.cells()]
    nodes = tuning.composed_epsilons(trials, accountant, delta)
    largest = max(nodes.values(), default=0.0)
    where = "the public proxy's data" if plan.on_proxy else "each node"
    line = (f"[tune] total ε on {where} over the {len(trials)} trials (plain composition of every "
            f"trial's accountant history, δ = {delta:g}): "
            + (", ".join(f"partition {n} {e:.4f}" for n, e in nodes.items()) or "no ledger found")
            + f"; largest {largest:.4f}")
    return {"trials": {t.name: {"noise-multiplier": t.noise_multiplier,
                                "epsilon": tuning.trial_epsilon(t, accountant, delta)}
                       for t in trials},
            "nodes": {str(n): e for n, e in nodes.items()}, "largest": largest, "line": line}


def _choose(args: argparse.Namespace, plan: tuning.TuningPlan, command: str,
            spend: dict) -> int:
    """Choose the rate from the trials' final validation rows; print, write tune.json; 0 or 1."""
    names = {c.name for c in plan.cells()}
    final = load_runs(args.out, records=False).final
    final = final[final["run"].isin(names)]
    by = tuning_criterion(list(plan.run_config))
    chosen, _ = sweep_lr.choose_learning_rates(final, list(plan.lrs), by=by)
    if plan.method not in chosen:
        say(f"[tune] FAILED: not every rate has a complete trial in {args.out}; no rate chosen")
        return FAILED
    table = chosen[plan.method]
    rate = table["learning-rate"]
    for lr, acc, loss in zip(table["grid"], table["validation-accuracy"],
                             table["validation-loss"], strict=True):
        name = next(c.name for c in plan.cells() if math.isclose(c.lr, lr))
        trial = spend["trials"][name]
        sigma = "-" if trial["noise-multiplier"] is None else f"{trial['noise-multiplier']:.4f}"
        say(f"[tune] lr {lr:g}: validation accuracy {acc:.4f}, loss {loss:.4f}, largest node σ "
            f"{sigma}, largest node ε of this trial {trial['epsilon']:.4f}"
            + ("  <- chosen" if math.isclose(lr, rate) else ""))
    result = {"learning-rate": rate, "chosen-by": by, **table, "privacy": spend}
    tuning.write_manifest(args.out, plan, command, result)
    say(spend["line"])
    if not plan.on_proxy and not spend["nodes"]:
        say(f"[tune] FAILED: no trial left a node ledger in {args.out}/*/privacy: the privacy "
            f"spent cannot be counted (rate {rate:g} not to be used)")
        return FAILED
    if spend["largest"] > plan.epsilon + 1e-9 and not plan.on_proxy:
        say(f"[tune] FAILED: a node's composed ε {spend['largest']:.4f} passes --epsilon "
            f"{plan.epsilon:g}: the trials' ledgers do not add up (rate {rate:g} not to be used)")
        return FAILED
    say(f"[tune] {NOT_PRIVATISED}")
    say(_next_step(args, plan, rate))
    say(f"[tune] chosen learning rate {rate:g} (best final validation {by}, ties to the "
        f"{'lower loss' if by == 'accuracy' else 'higher accuracy'}, then the smaller rate); "
        f"{args.out / tuning.TUNE_FILE}")
    return 0


def _next_step(args: argparse.Namespace, plan: tuning.TuningPlan, rate: float) -> str:
    """What to do with the rate: the final run (proxy), or the chosen trial's adapter."""
    if plan.on_proxy:
        keys = override_text({"strategy.name": plan.method, "train.learning-rate": rate,
                              "privacy.epsilon": plan.epsilon})
        items = " ".join(f"--run-config {arg!r}" for arg in [*plan.run_config, keys])
        return (f"[tune] tuned on a public proxy: the target federation spent nothing; the "
                f"final run on the private data spends its whole ε = {plan.epsilon:g} "
                f"(privacy.trials = 1): fedsvd-run {items}")
    cell = next(c for c in plan.cells() if math.isclose(c.lr, rate))
    return (f"[tune] tuned on the private federation: the {plan.trials} trials shared ε = "
            f"{plan.epsilon:g} (privacy.trials = {plan.trials}), so the budget is spent; the "
            f"result is the chosen trial's adapter, {args.out / cell.name / ADAPTER_DIR}, "
            "trained on the training data less the validation share; another run on this data "
            "would pass ε")


if __name__ == "__main__":
    sys.exit(main())
