"""Methods × ε × seeds × Dirichlet α, one Flower run per cell: ``python -m simulations.sweep``.

Examples
--------
python -m simulations.sweep --tune-lr --lrs 0.25,0.5,1,2 --lr-file rates.toml  # on validation data
python -m simulations.sweep --lr-file rates.toml           # 6 methods × ε inf,6,3,1 × seeds 0,1,2
python -m simulations.sweep --methods fedsvd,ffa --epsilons 6,1 --seeds 0,1 --out results/small
    --run-config "strategy.num-rounds=3 train.local-steps=5 data.max-client-examples=200"
python -m simulations.sweep --report-only --readme         # CSV, plots; table into its README.md
python -m simulations.sweep --record experiments/main --commit   # a sweep that spans machines
python -m simulations.sweep --report-only --record experiments/main --readme
python -m simulations.sweep --report-only --record experiments/side-eps --readme --table side-eps

Cells run one at a time (``<out>/<method>-eps<ε>-a<α>-seed<s>/``); complete cells are skipped,
so the same command resumes a sweep, and a failed cell is logged and reported at the end; while
a cell runs, one line per round says its accuracy, ε and the cell's and the sweep's ETA.
``--record DIR`` (a folder tracked in git) keeps each complete cell as ``DIR/cells/<cell>.csv``
(every round) and ``.json`` (its config) as it completes; ``--commit`` commits them in batches,
at most one commit per ``--commit-every`` minutes (30) and one when the sweep ends. A recorded
cell is skipped even when its run folder is missing (committed or not), so the sweep resumes on
a fresh clone, and the report is built from the records alone, into ``DIR``.
``--record-adapters`` also keeps each cell's adapter and config in ``DIR/adapters/<cell>/``, a
run folder without metrics that ``fedsvd-spectrum`` reads. ``--stop-file PATH``:
once PATH exists the running cell finishes and no other starts (exit 3; rerun to go on).
Scale with ``--run-config``: ``strategy.num-rounds`` (rounds), ``train.local-steps`` (DP-SGD
steps per client per round), ``model.max-length`` (tokens per example),
``data.max-client-examples`` (training examples per client, 0 = all),
``data.max-eval-examples`` (per-round eval subset), ``strategy.fraction-train`` (share of
clients per round); the number of clients is ``--num-supernodes``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from flwr.common.config import parse_config_args

from common.methods import FROM_SCRATCH, METHOD_NAMES, METHODS
from common.run_config import app_run_config, run_config_args
from common.task_kinds import CLASSIFICATION, TASK_KINDS
from simulations.experiments import learning_rates as sweep_lr
from simulations.experiments.cells import (
    ROOT,
    Cell,
    Runner,
    cell_states,
    flwr_runner,
    grid,
    report_outcomes,
    run_cells,
)
from simulations.launch.superlink import RAY_ADDRESS_HELP
from simulations.reports.records import CELLS_DIR, is_record_folder, load_runs
from simulations.reports.statistics import summarize
from simulations.reports.tables import markdown_table, write_report

RECORD_README = "README.md"  # --readme without a page: the record's (or --out's) own README


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}: one of {METHOD_NAMES}")
    return methods


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; ε and seeds default to the sweep's or, with --tune-lr, the tuning's."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=_methods, default=list(FROM_SCRATCH),
                   help=f"comma-separated, of {','.join(METHOD_NAMES)} (merge-sv needs "
                   f"strategy.merged-adapter); default {','.join(FROM_SCRATCH)}")
    p.add_argument("--epsilons", type=_floats, help="default inf,6,3,1 (--tune-lr: 6)")
    p.add_argument("--seeds", type=_ints, help="default 0,1,2 (--tune-lr: 0)")
    p.add_argument("--alphas", type=_floats, default=[0.5], help="Dirichlet α; default 0.5")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "sweep",
                   help="sweep folder: one sub-folder per cell; default results/sweep")
    p.add_argument("--run-config", action="append", default=[],
                   help="'k=v ...' or a .toml file, for every cell (repeatable)")
    p.add_argument("--num-supernodes", type=int, default=6, help="clients")
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=0.0,
                   help="share of a GPU per ClientApp (0: none; 0.5: two per GPU)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help=RAY_ADDRESS_HELP)
    p.add_argument("--cell-timeout", type=float, help="seconds; a slower cell fails")
    p.add_argument("--lr-file",
                   help="learning rate per method (a file --tune-lr writes; --tune-lr: where "
                        "to write it); 'none': train.learning-rate for all; default: each "
                        "method's run config (simulations/conf/<method>.toml), unless "
                        "--run-config sets train.learning-rate")
    p.add_argument("--tune-lr", action="store_true",
                   help="run --lrs on the validation split, write the best per method")
    p.add_argument("--lrs", type=_floats, default=[0.25, 0.5, 1.0, 2.0],
                   help="the grid for --tune-lr; default 0.25,0.5,1,2")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="--tune-lr: share of the training data held out; default 0.1")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="a folder tracked in git (e.g. experiments/main): each complete cell "
                   "to DIR/cells/<cell>.csv and .json, recorded cells skipped, report into DIR")
    p.add_argument("--record-adapters", action="store_true",
                   help="with --record: also keep each cell's adapter and config in "
                        "DIR/adapters/<cell>/ (about 330 kB each for the default layout), for "
                        "analyses of the weights such as fedsvd-spectrum")
    p.add_argument("--commit", action="store_true",
                   help="with --record: git-commit the cells' records in batches (--commit-every)"
                        " and once more when the sweep ends, stopped or failed")
    p.add_argument("--commit-every", type=float, metavar="MINUTES",
                   help="with --commit: at most one commit per MINUTES (default 30; 0: one "
                        "commit per cell)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild CSV, plots and table from the run folders in --out (with "
                   "--record: from DIR/cells alone)")
    p.add_argument("--readme", type=Path, nargs="?", const=Path(RECORD_README),
                   help="also put the table between the sweep-table markers of this Markdown "
                        f"page (default: {RECORD_README} of --record, or of --out)")
    p.add_argument("--table", metavar="NAME",
                   help="with --readme: between '<!-- sweep-table:start NAME -->' and "
                        "'<!-- sweep-table:end NAME -->' instead (several tables on one page)")
    p.add_argument("--reference-record", type=Path, metavar="DIR",
                   help="with --record: add DIR's FedSVD cells at this record's ε, α and seeds "
                   "to the report, so the other methods pair with them (same settings only)")
    p.add_argument("--stop-file", type=Path, metavar="PATH",
                   help="when PATH exists, finish (and record) the running cell, run no more, "
                        "exit 3; the same command goes on later")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells and whether each is recorded, complete or to run")
    args = p.parse_args(argv)
    args.epsilons = args.epsilons or ([6.0] if args.tune_lr else [float("inf"), 6.0, 3.0, 1.0])
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.tune_lr else [0, 1, 2])
    return args


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Run the sweep (or tune, or only report); 0, 1 if a cell failed, 2 if refused.

    Refused (nothing run): a cell whose configuration, data or folder would fail; the reasons
    are the last lines.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return _main(args, argv, runner)
    except (ValueError, OSError) as exc:
        sys.stdout.flush()
        print(f"[sweep] error: {exc}\n[sweep] refused before starting: nothing was run",
              file=sys.stderr)
        return 2


def reproducing_command(argv: list[str]) -> str:
    """The command line recorded beside the results: ``argv`` without ``--stop-file PATH``.

    The stop file only says when this invocation ends, not what it computes, and its path is
    the machine's own; the recorded command is the one that reproduces the cells anywhere.
    """
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--stop-file":
            skip = True
        elif not arg.startswith("--stop-file="):
            kept.append(arg)
    return shlex.join(["python", "-m", "simulations.sweep", *kept])


def _main(args: argparse.Namespace, argv: list[str], runner: Runner | None) -> int:
    if args.record_adapters and args.record is None:
        raise ValueError("--record-adapters needs --record DIR (where to keep them)")
    if args.commit and args.record is None:
        raise ValueError("--commit needs --record DIR (the tracked folder to commit into)")
    if args.commit_every is not None and (not args.commit or args.commit_every < 0):
        raise ValueError(f"--commit-every {args.commit_every:g}: minutes >= 0, with --commit")
    if args.table is not None and args.readme is None:
        raise ValueError("--table NAME names the markers of a --readme page: give --readme")
    if args.reference_record is not None and args.record is None:
        raise ValueError("--reference-record DIR pairs with a record: give --record too")
    if args.readme == Path(RECORD_README):  # --readme without a page: the record's own
        args.readme = (args.record or args.out) / RECORD_README
    if args.report_only:
        return report(args.record or args.out, args.readme, records=args.record is not None,
                      table=args.table, reference=args.reference_record)
    command = reproducing_command(argv)
    runner = runner or flwr_runner(num_supernodes=args.num_supernodes,
                                   cpus_per_client=args.cpus_per_client,
                                   gpus_per_client=args.gpus_per_client,
                                   timeout=args.cell_timeout, ray_address=args.ray_address)
    if args.tune_lr:
        if args.lr_file is None or args.lr_file.lower() in ("", "none"):
            raise ValueError("--tune-lr writes the chosen rates: name the file with --lr-file "
                             "(a record's learning_rates.toml, for example)")
        return tune(args, runner, command)
    cells = grid(args.methods, args.epsilons, args.alphas, args.seeds, _learning_rates(args))
    if args.dry_run:
        return dry_run(cells, args.out, args)
    outcomes = run_cells(cells, args.out, overrides=args.run_config, runner=runner,
                         command=command, num_partitions=args.num_supernodes,
                         record=args.record, commit_every=_commit_every(args),
                         stop_file=args.stop_file, record_adapters=args.record_adapters)
    code = report_outcomes(outcomes)
    if any(o.status != "failed" for o in outcomes):
        code = max(code, report(args.record or args.out, args.readme,
                                records=args.record is not None, table=args.table,
                                reference=args.reference_record))
    return code


COMMIT_EVERY_MINUTES = 30.0  # --commit without --commit-every


def _commit_every(args: argparse.Namespace) -> float | None:
    """Minutes between the record's commits; None without --commit."""
    if not args.commit:
        return None
    return COMMIT_EVERY_MINUTES if args.commit_every is None else args.commit_every


def dry_run(cells: list[Cell], folder: Path, args: argparse.Namespace) -> int:
    """Print each cell, its learning rate and whether it is recorded, complete or to run."""
    states = cell_states(cells, folder, args.run_config, args.record, args.record_adapters)
    for cell in cells:
        lr = f"{cell.lr:g}" if cell.lr is not None else "(run config)"
        print(f"{cell.name}  lr {lr}  {states[cell]}")
    counts = {s: sum(v == s for v in states.values()) for s in dict.fromkeys(states.values())}
    print(f"[dry-run] {len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + (f" (records: {args.record / CELLS_DIR})" if args.record is not None else ""))
    return 0


def _learning_rates(args: argparse.Namespace) -> dict[str, float] | None:
    if args.lr_file is not None and args.lr_file.lower() in ("", "none"):
        return None
    run_config_sets_rate = "train.learning-rate" in parse_config_args(
        run_config_args(args.run_config))
    if args.lr_file is None:  # each method's own rate, unless the run config sets one for all
        return None if run_config_sets_rate else sweep_lr.method_conf_rates(args.methods)
    if not Path(args.lr_file).is_file():
        print(f"[sweep] no {args.lr_file}: every method uses train.learning-rate of the run "
              "config (run --tune-lr first to tune it on the validation split)")
        return None
    if run_config_sets_rate:
        raise ValueError(f"--run-config sets train.learning-rate and {args.lr_file} sets one "
                         "per method: pass --lr-file none to use the run config's")
    return sweep_lr.learning_rates_for(Path(args.lr_file), args.methods)


def tune(args: argparse.Namespace, runner: Runner, command: str) -> int:
    """The learning-rate grid on the validation split; the best rate per method to --lr-file."""
    cells = sweep_lr.tuning_grid(args.methods, args.epsilons, args.alphas, args.seeds,
                                 args.lrs, args.validation_fraction)
    folder = args.out / "lr-tuning"
    if args.dry_run:
        return dry_run(cells, folder, args)
    outcomes = run_cells(cells, folder, overrides=args.run_config, runner=runner,
                         command=command, num_partitions=args.num_supernodes,
                         record=args.record, commit_every=_commit_every(args),
                         stop_file=args.stop_file, record_adapters=args.record_adapters)
    code = report_outcomes(outcomes)
    if any(o.status == "stopped" for o in outcomes):
        print(f"[tune] stopped before the grid was complete: {args.lr_file} not written")
        return code
    final = load_runs(args.record or folder, records=args.record is not None).final
    final = final[final["run"].isin({c.name for c in cells})]
    if final.empty:
        print("[tune] no tuning run completed; nothing written")
        return 1
    table = markdown_table(summarize(final, by=("method", "learning_rate", "alpha")),
                           column="learning_rate")
    by = tuning_criterion(args.run_config)
    chosen, incomplete = sweep_lr.choose_learning_rates(final, args.lrs, by=by)
    losses = "".join(f"\n{m}: rates {t['grid']}, mean final validation loss "
                     f"{t['validation-loss']}\n" for m, t in chosen.items())
    (folder / "results.md").write_text(f"Final validation accuracy\n\n{table}\n\n"
                                       f"Chosen by the best mean final validation {by}.\n"
                                       + losses)
    note = {"tuned-on": (f"ε {','.join(f'{e:g}' for e in args.epsilons)}; α "
                         f"{','.join(f'{a:g}' for a in args.alphas)}; seeds "
                         f"{','.join(map(str, args.seeds))}; data.validation-fraction "
                         f"{args.validation_fraction:g}; {datetime.now(UTC):%Y-%m-%d}"),
            "command": command}
    if chosen:
        sweep_lr.write_learning_rates(Path(args.lr_file), chosen, note)
    print(f"{table}\n\n[tune] chosen by the best mean final validation {by}: " + ", ".join(
        f"{m} {t['learning-rate']:g}" for m, t in chosen.items()) + f" -> {args.lr_file}")
    if incomplete:
        print(f"[tune] not written (some rate has no complete run): {', '.join(incomplete)}")
    return 1 if incomplete else code


def tuning_criterion(run_config: list[str]) -> str:
    """``"loss"`` for a causal LM (``model.task`` in the run config), else ``"accuracy"``."""
    task = app_run_config(ROOT, run_config).get("model.task", CLASSIFICATION.name)
    return "accuracy" if TASK_KINDS.get(task, CLASSIFICATION).is_classification else "loss"


def report(folder: Path, readme: Path | None, records: bool = False,
           table: str | None = None, reference: Path | None = None) -> int:
    """Build CSV, plots and table from ``folder``; print the table; 1 on a problem.

    ``records``: ``folder`` is a record folder (``--record``), read from ``folder/cells``;
    ``reference``: a record whose FedSVD cells join the table (``--reference-record``).
    """
    if records and not is_record_folder(folder):
        print(f"[report] no record in {Path(folder) / CELLS_DIR}: nothing to report")
        return 1
    try:
        written = write_report(folder, readme=readme, table=table, reference=reference)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[report] {exc}")
        return 1
    print(written["table"].read_text())
    print("[report] wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
