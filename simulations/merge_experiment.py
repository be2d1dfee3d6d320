"""Leave-one-group-out on 20 Newsgroups: merge adapters of the other groups, adapt by σ only.

``python -m simulations.merge_experiment --target sci [--epsilons inf,6,3] [--seeds 0]``

1. **Sources**: one FedSVD run per other topic group (``data.labels`` = that group's classes,
   ``--source-epsilon``, default ∞: the sources come from other organisations), each saving a
   peft adapter: ``<out>/sources/source-<group>/adapter``.
2. **Merges** of those adapters at rank ``lora.r`` by every ``--merges`` method (``axis``, ours;
   ``task-arithmetic``, ``ties``, ``peft-svd``): ``<out>/merges/target-<group>/<method>/``
   (``python -m merging``; the sources' heads are task-specific and not merged; a saved merge
   of other sources or rank is refused, not reused).
3. **Target federation** (the held-out group), per ε and seed: ``merge-sv-<method>`` (strategy
   merge-sv from that merge: only σ and the head train) and ``scratch`` (FedSVD from B = 0),
   same rounds, clients and ε: ``<out>/target-<group>/<method>-eps<ε>-seed<s>/``.
   With ``--variants noise,half`` the same is repeated with damaged sources (robustness): the
   first source replaced by Gaussian noise of the same per-layer Frobenius norm, or every
   source pruned to half its rank (:mod:`merging.perturb`), as ``merge-sv-<method>-<variant>``;
   ``random`` replaces every source by such noise, a control: σ tuning of a subspace that
   holds no knowledge, with as few private parameters.
4. **Report** in ``<out>/target-<group>/``: ``merge.csv`` (one row per run per round, its
   method from ``methods.json``, which the plan writes: run name -> method),
   ``summary.csv``, ``results.md`` (final accuracy, mean ± 95 % t-interval over seeds, and
   every command recorded in ``commands.txt`` that ran into the folder) and ``plots/``; with
   ``--readme``, the same table between the ``merge-table:target-<group>`` markers of
   ``docs/merging.md`` (or the page given).

Finished runs and merges are skipped, so the same command resumes. ``--run-config`` scales
every run (rounds, local steps, tokens, ...) as in :mod:`simulations.sweep`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import AppConfig, format_run_name
from common.model_path import resolve_model_path
from common.run_config import override_text
from merging import cli as merging_cli
from merging import load_sources
from merging.adapter_io import PROVENANCE_FILE, read_provenance
from merging.perturb import half_rank, noise_like, save_source
from server.checkpoint import CHECKPOINT_FILE
from simulations.experiments.cells import (
    ROOT,
    Runner,
    cell_config,
    flwr_runner,
    is_complete,
    refuse_failing_runs,
    stale_settings,
)
from simulations.launch.console import failure_reason, say
from simulations.reports.records import load_runs
from simulations.reports.statistics import summarize
from simulations.reports.tables import markdown_table, replace_between_markers

# 20 Newsgroups topic groups; misc.forsale (one class) is in none: a federation needs 2 classes.
GROUPS: dict[str, tuple[str, ...]] = {
    "comp": ("comp.*",),
    "rec": ("rec.*",),
    "sci": ("sci.*",),
    "politics": ("talk.politics.*",),
    "religion": ("alt.atheism", "soc.religion.christian", "talk.religion.misc"),
}
MERGES = merging_cli.METHODS  # axis, task-arithmetic, ties, peft-svd
# sources as trained; the first replaced by noise; every one by noise (a control: no knowledge
# to transfer, only the subspace size); every one pruned to half rank
VARIANTS = ("clean", "noise", "random", "half")
SCRATCH = "scratch"
COMMANDS_FILE = "commands.txt"  # in the target folder: every command that ran into it
METHODS_FILE = "methods.json"  # in the target folder: run name -> method, of every planned run


def readme_markers(target_folder: Path) -> tuple[str, str]:
    """The README markers of one target's table, e.g. ``<!-- merge-table:target-sci:start -->``."""
    return (f"<!-- merge-table:{target_folder.name}:start -->",
            f"<!-- merge-table:{target_folder.name}:end -->")


@dataclass(frozen=True)
class Run:
    """One Flower simulation: its folder's parent, its name, the run-config keys it sets.

    ``method``: what a target run compares (``merge-sv-<merge>`` or ``scratch``); "" for a source.
    """

    parent: Path
    name: str
    keys: Mapping[str, object]
    method: str = ""

    @property
    def folder(self) -> Path:
        """Where the ServerApp writes it."""
        return self.parent / self.name

    def items(self, overrides: Sequence[str], resume: bool = False) -> list[str]:
        """``--run-config`` items: the experiment's overrides, then this run's keys."""
        keys = {**self.keys, "output.dir": str(self.parent.resolve()), "output.run-name": self.name,
                **({"output.resume": True} if resume else {})}
        return [*overrides, override_text(keys)]

    @property
    def crashed(self) -> bool:
        """Whether an earlier attempt left a checkpoint to resume from."""
        return (self.folder / CHECKPOINT_FILE).is_file()


def labels(group: str) -> str:
    """The ``data.labels`` value of a group."""
    return ",".join(GROUPS[group])


def source_runs(out: Path, target: str, epsilon: float) -> list[Run]:
    """One FedSVD run per group other than ``target``."""
    return [Run(out / "sources", f"source-{g}",
                {"strategy.name": "fedsvd", "data.labels": labels(g),
                 "privacy.epsilon": float(epsilon), "seed": 0})
            for g in GROUPS if g != target]


def merge_names(merges: Sequence[str], variants: Sequence[str]) -> list[str]:
    """``axis``, ``axis-noise``, ...: one merge folder per merge method and source variant."""
    return [m if v == "clean" else f"{m}-{v}" for v in variants for m in merges]


def target_runs(out: Path, target: str, merges: Sequence[str], epsilons: Sequence[float],
                seeds: Sequence[int]) -> list[Run]:
    """merge-sv from every merge (``merge_names``), and FedSVD from scratch, per seed and ε."""
    runs = []
    for seed in seeds:
        for epsilon in epsilons:
            # plain averaging at lr 1: the settings experiments/merging ran at (the run defaults
            # moved to FedAdam at lr 2 after it)
            common = {"data.labels": labels(target), "privacy.epsilon": float(epsilon),
                      "seed": seed, "strategy.server-optimizer": "none",
                      "train.learning-rate": 1.0}
            for method in [*(f"merge-sv-{m}" for m in merges), SCRATCH]:
                keys = {**common, "strategy.name": "fedsvd"} if method == SCRATCH else {
                    **common, "strategy.name": "merge-sv",
                    "strategy.merged-adapter": str(merge_folder(out, target, method).resolve())}
                runs.append(Run(out / f"target-{target}",
                                format_run_name(method, epsilon, seed), keys, method))
    return runs


def merge_folder(out: Path, target: str, method: str) -> Path:
    """``<out>/merges/target-<target>/<merge>`` for ``<merge>`` or ``merge-sv-<merge>``.

    One folder per held-out group: its merges are of the other groups' sources only.
    """
    return out / "merges" / f"target-{target}" / method.removeprefix("merge-sv-")


def stale_merge(folder: Path, provenance: Mapping, adapters: Sequence[Path],
                rank: int) -> str | None:
    """Why the merge saved in ``folder`` is not of ``adapters`` at ``rank``; None if it is.

    ``provenance`` is the folder's ``merge.json`` (:func:`merging.adapter_io.read_provenance`).
    """
    there = [str(Path(s["path"]).resolve()) for s in provenance["sources"]]
    now = [str(path.resolve()) for path in adapters]
    if there != now:
        return f"{folder}: merged from {there}, now {now}"
    if provenance["steps"][-1]["rank"] != rank:
        return f"{folder}: rank {provenance['steps'][-1]['rank']} there, {rank} now"
    return None


def run_all(runs: Sequence[Run], overrides: Sequence[str], runner: Runner) -> list[str]:
    """Run the incomplete ones in order; return the names of those that failed.

    Raises ValueError, before running anything, if a run's folder holds a run made with other
    settings (e.g. sources of another ``--source-epsilon``): it would be reused silently.
    """
    configs = {r.name: cell_config(r.items(overrides)) for r in runs}
    stale = [f"{r.parent.name}/{r.name}: {'; '.join(keys)}" for r in runs
             if (keys := stale_settings(r.folder, configs[r.name]))]
    if stale:
        raise ValueError("these runs exist with other settings; use another --out or delete "
                         "them:\n  " + "\n  ".join(stale))
    rounds = {name: cfg.strategy.num_rounds for name, cfg in configs.items()}
    todo = [r for r in runs if not is_complete(r.folder, rounds[r.name])]
    refuse_failing_runs({f"{run.parent.name}/{run.name}": run.items(overrides, resume=run.crashed)
                         for run in todo})
    failed = []
    for k, run in enumerate(runs, start=1):
        if run not in todo:
            continue
        log = run.parent / "logs" / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        say(f"[merge-experiment] [{k}/{len(runs)}] {run.name}; log {log}")
        code = runner(run.items(overrides, resume=run.crashed), log)
        if code != 0 or not is_complete(run.folder, rounds[run.name]):
            reason = failure_reason(log)
            say(f"[merge-experiment] FAILED {run.name} (exit code {code}"
                f"{': ' + reason if reason else ''}; log {log})")
            failed.append(f"{run.name}{': ' + reason if reason else ''}")
    return failed


def variant_sources(out: Path, sources: Sequence[Run], variant: str,
                    model_dir: Path) -> list[Path]:
    """The source adapter folders of a variant, writing the damaged copies once."""
    clean = [s.folder / "adapter" for s in sources]
    if variant == "clean":
        return clean
    loaded = load_sources(clean, base=model_dir)
    paths = []
    for i, (source, path) in enumerate(zip(loaded, clean, strict=True)):
        if variant == "noise" and i > 0:  # only the first source is replaced by noise
            paths.append(path)
            continue
        # one noise copy per source, shared by the noise and random variants
        dest = out / f"sources-{'noise' if variant == 'random' else variant}" / path.parent.name
        if not (dest / PROVENANCE_FILE).is_file():
            pairs = (half_rank(source.lora) if variant == "half"
                     else noise_like(source.lora, torch.Generator().manual_seed(i)))
            save_source(dest, source, pairs, op=variant)
        paths.append(dest)
    return paths


def merge_sources(out: Path, target: str, adapters: Sequence[Path], merges: Sequence[str],
                  rank: int, model_dir: Path, variant: str = "clean") -> list[str]:
    """Merge the adapters by every method; return the merge names that failed.

    A merge already saved is kept if it is of the same adapters at the same rank; otherwise
    ValueError (it would be reused silently).
    """
    failed = []
    for method, name in zip(merges, merge_names(merges, [variant]), strict=True):
        folder = merge_folder(out, target, name)
        if (provenance := read_provenance(folder)) is not None:
            if reason := stale_merge(folder, provenance, adapters, rank):
                raise ValueError(f"this merge exists with other settings; use another --out "
                                 f"or delete it:\n  {reason}")
            continue
        argv = ["--method", method, "--rank", str(rank), "--base", str(model_dir),
                "--out", str(folder), *map(str, adapters)]
        say(f"[merge-experiment] python -m merging {shlex.join(argv)}")
        try:
            merging_cli.main(argv)
        except SystemExit as exc:  # the CLI exits 2 on a bad source, naming it
            say(f"[merge-experiment] merge {name} FAILED (exit {exc.code})")
            failed.append(name)
    return failed


def _known_methods(folder: Path) -> dict[str, str]:
    path = folder / METHODS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def record_methods(folder: Path, runs: Sequence[Run]) -> None:
    """Add the method of every run in ``runs`` to ``<folder>/methods.json`` (run name -> method)."""
    methods = {**_known_methods(folder), **{r.name: r.method for r in runs}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METHODS_FILE).write_text(json.dumps(methods, indent=1) + "\n")


def read_methods(folder: Path, runs: Sequence[str]) -> dict[str, str]:
    """The method of each of ``runs`` from ``<folder>/methods.json``; ValueError for one missing."""
    known = _known_methods(folder)
    if missing := sorted(set(runs) - known.keys()):
        raise ValueError(f"{folder / METHODS_FILE}: no method for {', '.join(missing)}; run the "
                         "experiment's command again (finished runs and merges are skipped) to "
                         "record them")
    return {run: known[run] for run in runs}


def record_command(folder: Path, command: str) -> None:
    """Append ``command`` to ``<folder>/commands.txt`` unless it is there already."""
    path = folder / COMMANDS_FILE
    known = path.read_text().splitlines() if path.is_file() else []
    if command not in known:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([*known, command]) + "\n")


def report(folder: Path, readme: Path | None = None) -> Path:
    """CSV, summary, table and plots of the target runs in ``folder``; return results.md.

    The table lists the commands recorded in ``commands.txt``. With ``readme``, the table also
    goes between this target's :func:`readme_markers` (checked first: a README without them
    changes nothing) and the CSVs and plots into ``_static/merge-loo/<folder name>/`` beside it,
    linked from there.
    """
    from simulations.reports import plots  # matplotlib only when plotting

    runs = load_runs(folder, also_varied=("strategy.merged-adapter",))
    if runs.final.empty:
        raise ValueError(f"no complete target run in {folder}")
    if readme:
        replace_between_markers(readme.read_text(), "", readme_markers(folder))
    methods = read_methods(folder, list(runs.tidy["run"].unique()))
    tidy = runs.tidy.assign(method=runs.tidy["run"].map(methods))
    tidy.to_csv(folder / "merge.csv", index=False)
    final = tidy[tidy["round"] == tidy["num_rounds"]]
    summary = summarize(final)
    summary.to_csv(folder / "summary.csv", index=False)
    images = plots.write_all(tidy, summary, folder / "plots")
    commands_file = folder / COMMANDS_FILE
    commands = commands_file.read_text().splitlines() if commands_file.is_file() else []

    def block(image_folder: str) -> str:
        return (f"Final test accuracy on the held-out group, round "
                f"{int(final['num_rounds'].max())} (mean ± 95 % t-interval over seeds; "
                f"seeds {', '.join(map(str, sorted(final['seed'].unique())))}).\n\n"
                "```bash\n" + "\n".join(commands) + f"\n```\n\n{markdown_table(summary)}\n\n"
                + "\n".join(f"![{p.stem}]({image_folder}/{p.name})" for p in images) + "\n")

    (folder / "results.md").write_text(block("plots"))
    if readme:
        relative = f"_static/merge-loo/{folder.name}"
        static = readme.parent / relative
        static.mkdir(parents=True, exist_ok=True)
        for file in [*images, folder / "merge.csv", folder / "summary.csv"]:
            (static / file.name).write_bytes(file.read_bytes())
        readme.write_text(replace_between_markers(readme.read_text(), block(relative),
                                                  readme_markers(folder)))
    return folder / "results.md"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(GROUPS), required=True, help="held-out group")
    p.add_argument("--epsilons", default="inf,6,3", help="target ε values; default inf,6,3")
    p.add_argument("--seeds", default="0", help="target seeds; default 0")
    p.add_argument("--merges", default=",".join(MERGES), help=f"default {','.join(MERGES)}")
    p.add_argument("--variants", default="clean", help=f"source variants, of "
                   f"{','.join(VARIANTS)}; default clean")
    p.add_argument("--source-epsilon", type=float, default=float("inf"),
                   help="ε of the source runs; default inf")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "merge-loo")
    p.add_argument("--run-config", action="append", default=[],
                   help="'k=v ...' or a .toml file, for every run (repeatable)")
    p.add_argument("--num-supernodes", type=int, default=6, help="clients per federation")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--readme", type=Path, nargs="?", const=ROOT / "docs" / "merging.md",
                   help="also put the table between the merge-table:target-<group> markers of "
                        "this Markdown page and the CSVs and plots into _static/merge-loo/"
                        "target-<group>/ beside it (default docs/merging.md)")
    args = p.parse_args(argv)
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for flag, given, known in (("--merges", args.merges, MERGES),
                               ("--variants", args.variants, VARIANTS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            p.error(f"{flag}: unknown {unknown}; one of {','.join(known)}")
    return args


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    """Sources → merges → target runs → report; 1 if anything failed, 2 if refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return _main(args, argv, runner)
    except (ValueError, OSError) as exc:
        sys.stdout.flush()
        print(f"[merge-experiment] error: {exc}\n[merge-experiment] refused: nothing more was "
              "run", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: Sequence[str], runner: Runner | None) -> int:
    command = shlex.join(["python", "-m", "simulations.merge_experiment",
                          *_without_report_flags(argv)])
    target_folder = args.out / f"target-{args.target}"
    if args.report_only:
        print(report(target_folder, args.readme).read_text())
        return 0
    runner = runner or flwr_runner(num_supernodes=args.num_supernodes)
    sources = source_runs(args.out, args.target, args.source_epsilon)
    targets = target_runs(args.out, args.target, merge_names(args.merges, args.variants),
                          args.epsilons, args.seeds)
    cfg: AppConfig = cell_config(sources[0].items(args.run_config))  # validates the overrides
    record_command(target_folder, command)
    record_methods(target_folder, targets)
    failed = run_all(sources, args.run_config, runner)
    if failed:
        say("[merge-experiment] FAILED: no merge without every source; failed:\n  "
            + "\n  ".join(failed))
        return 1
    model_dir = resolve_model_path(cfg.model)
    bad_merges = [name for variant in args.variants for name in merge_sources(
        args.out, args.target, variant_sources(args.out, sources, variant, model_dir),
        args.merges, cfg.lora.r, model_dir, variant)]
    targets = [t for t in targets if t.method not in {f"merge-sv-{m}" for m in bad_merges}]
    failed = run_all(targets, args.run_config, runner)
    print(report(target_folder, args.readme).read_text())
    if failed or bad_merges:
        say("[merge-experiment] FAILED:\n  " + "\n  ".join(
            [*failed, *(f"merge {name}" for name in bad_merges)]))
        return 1
    return 0


def _without_report_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without --readme (and its value) and --report-only: the command that ran."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--report-only" or arg.startswith("--readme="):
            continue
        if arg == "--readme":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
