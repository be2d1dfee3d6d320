"""The spectrum of saved adapters against their base model: intruders, effective rank, forgetting.

``fedsvd-spectrum RUN_FOLDER [RUN_FOLDER ...] --out DIR [--top-k 10] [--threshold 0.5]
[--forgetting {newsgroups,sms}] [--texts 256] [--max-length N] [--seed 0] [--force]``

For each finished run folder (``config.json`` + ``adapter/``: :mod:`common.schema`) and each
LoRA layer of its adapter, against the layer's pretrained weight W0 (d_out, d_in) of the run's
``model.path``, read offline (nothing is downloaded):

- ΔW = s · B A, s = lora_alpha / r (alpha / √r with rsLoRA) as the saved ``adapter_config.json``
  says, plus the dense residual ``base_delta.safetensors`` of FLoRA / FedEx-LoRA
  (:mod:`merging.sources` reads both); its singular values and effective rank;
- the intruder dimensions of W0 + ΔW among its top ``--top-k`` left singular vectors at cosine
  threshold ``--threshold`` (:mod:`kernels.spectrum`: definitions, sources of the defaults);
- ‖A Aᵀ − I_r‖_F, the distance of A's rows from orthonormal (0 under FedSVD).

``DIR/spectrum.csv`` has one row per run × layer (:data:`COLUMNS`, then ``sigma_1`` …
``sigma_R``, the singular values of ΔW in descending order, R the largest LoRA rank of the
runs; a dense residual's singular values beyond R are in ``effective_rank`` only). With
``--forgetting``, ``DIR/forgetting.csv`` has one row per run (:data:`FORGETTING_COLUMNS`;
:mod:`common.forgetting`: causal LM, log-perplexity change; encoder, 1 − linear CKA) on
``--texts`` held-out texts outside every given run's domain (:mod:`common.out_of_domain`).
Plots: ``singular-values.png`` and ``intruders.png`` (:mod:`simulations.reports.spectrum_plots`).
A Markdown summary per run is printed. Exit 0 done; 2 refused before any model loads (a folder
without ``config.json`` or adapter, a base model not available offline, output files present
without ``--force``); 1 failed while computing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common import schema
from common.config import AppConfig, ConfigError
from common.devices import resolve_device
from common.forgetting import encode_texts, forgetting
from common.model import load_tokenizer
from common.model_path import resolve_model_path
from common.out_of_domain import SOURCES, HeldOutText, out_of_domain_texts, source_problem
from common.quiet import quiet_model_loading
from common.tasks import TASKS
from kernels import group_by_shape
from kernels.spectrum import (
    count_intruders,
    effective_rank,
    intruder_similarity,
    row_orthonormality_gap,
)
from merging.sources import Source, SourceError, load_adapter, lora_scale
from simulations.reports import spectrum_plots

SPECTRUM_FILE, FORGETTING_FILE = "spectrum.csv", "forgetting.csv"
OFFLINE_NOTE = " (fedsvd-spectrum reads models offline only: it downloads nothing)"
PLOT_FILES = (spectrum_plots.SINGULAR_VALUES_PLOT, spectrum_plots.INTRUDERS_PLOT)
# spectrum.csv, per run × layer; then sigma_1 … sigma_R
COLUMNS = {
    schema.RUN: "the run folder's name (with its parent where names repeat)",
    schema.METHOD: "strategy.name", schema.EPSILON_BUDGET: "privacy.epsilon (inf: no DP)",
    schema.SEED: "seed", "task": "model.task",
    "layer": "the LoRA module, as peft names it", "d_out": "rows of W0", "d_in": "columns of W0",
    "r": "LoRA rank of the layer", "scale": "s: lora_alpha / r (alpha / √r with rsLoRA)",
    "delta_norm": "‖ΔW‖_F", "relative_delta": "‖ΔW‖_F / ‖W0‖_F",
    "effective_rank": "Roy & Vetterli effective rank of ΔW (0 for ΔW = 0)",
    "top_k": "W0 + ΔW's top singular vectors examined (--top-k)",
    "threshold": "cosine threshold ε (--threshold)",
    "intruders": "top-k singular vectors of W0 + ΔW whose max |cos| with W0's is below ε",
    "min_similarity": "smallest max |cos| among the top k (below ε: some intruder)",
    "a_orthonormality_gap": "‖A Aᵀ − I_r‖_F (0: A has orthonormal rows)",
}
FORGETTING_COLUMNS = {
    schema.RUN: "as in spectrum.csv", schema.METHOD: "strategy.name",
    schema.EPSILON_BUDGET: "privacy.epsilon", schema.SEED: "seed", "task": "model.task",
    "texts": "what the held-out texts are", "n_texts": "how many", "max_length": "tokens each",
    "measure": "log-perplexity (causal LM) or linear-cka (encoder)",
    "base": "perplexity of W0 (CKA: 1)", "tuned": "perplexity of W0 + ΔW (CKA: CKA(W0, W0 + ΔW))",
    "forgetting": "log(tuned / base) (causal LM) or 1 − CKA (encoder); 0: nothing forgotten",
}


@dataclass(frozen=True)
class Run:
    """A run folder checked before any model loads: its config, adapter and base model folder."""

    folder: Path
    label: str
    cfg: AppConfig
    adapter: Source
    model_dir: Path

    def settings(self) -> dict[str, object]:
        """The run's identifying columns."""
        return {schema.RUN: self.label, schema.METHOD: self.cfg.strategy.name,
                schema.EPSILON_BUDGET: self.cfg.privacy.epsilon, schema.SEED: self.cfg.seed,
                "task": self.cfg.model.task}


def check_run(folder: Path, label: str) -> Run | str:
    """The :class:`Run` of ``folder``, or one line saying why it cannot be read (nothing loads)."""
    config, adapter = folder / schema.CONFIG_FILE, folder / schema.ADAPTER_DIR
    if not folder.is_dir():
        return f"{folder}: no such run folder"
    if not config.is_file():
        return f"{folder}: no {schema.CONFIG_FILE}; not a run's results folder"
    try:
        cfg = AppConfig.from_run_config(json.loads(config.read_text(encoding="utf-8")))
        source = load_adapter(adapter)
    except SourceError as exc:
        return f"{folder}: no readable adapter: {exc}"
    except ConfigError as exc:  # the run's settings, model.path among them
        return f"{folder}: " + "; ".join(exc.problems)
    except (OSError, ValueError) as exc:  # config.json is not JSON
        return f"{folder}: {config}: {exc}"
    try:
        model_dir = resolve_model_path(cfg.model, offline=True)
    except ConfigError as exc:  # a hub model not in the cache
        return f"{folder}: " + "; ".join(exc.problems) + OFFLINE_NOTE
    except OSError as exc:  # a folder without config.json, the shipped model not installed
        return f"{folder}: {exc}"
    return Run(folder, label, cfg, source, model_dir)


def run_labels(folders: Sequence[Path]) -> list[str]:
    """Each folder's name, or ``parent/name`` where two names repeat (or the path as given)."""
    names = [f.resolve().name for f in folders]
    if len(set(names)) == len(names):
        return names
    longer = [f"{f.resolve().parent.name}/{f.resolve().name}" for f in folders]
    return longer if len(set(longer)) == len(longer) else [str(f) for f in folders]


@torch.no_grad()
def layer_rows(run: Run, model: torch.nn.Module, *, top_k: int, threshold: float) -> list[dict]:
    """One row of :data:`COLUMNS` (and ``sigma_i``) per LoRA layer, in the model's order."""
    order = [name for name, _ in model.named_modules() if name in run.adapter.shapes]
    if missing := sorted(set(run.adapter.shapes) - set(order)):
        raise ValueError(f"{run.folder}: the base model {run.model_dir} has no module "
                         f"{missing[0]!r} of the adapter ({len(missing)} missing): not the "
                         "model the adapter was trained on")
    # one batch per (B shape, A shape): B (d_out, r) and A (r, d_in) fix W0's (d_out, d_in)
    groups = group_by_shape({m: run.adapter.lora[m] for m in order})
    rows = {}
    for modules in groups.values():
        W0 = torch.stack([_weight(run, model, m) for m in modules])  # (L, d_out, d_in)
        delta = torch.stack([run.adapter.delta(m) for m in modules])  # (L, d_out, d_in)
        A = torch.stack([run.adapter.lora[m][1] for m in modules])  # (L, r, d_in)
        sigma = torch.linalg.svdvals(delta)  # (L, min(d_out, d_in)), descending
        similarity = intruder_similarity(W0, W0 + delta, top_k)  # (L, k')
        stats = zip(modules, sigma, effective_rank(sigma), torch.linalg.matrix_norm(W0),
                    similarity, count_intruders(similarity, threshold),
                    row_orthonormality_gap(A), strict=True)
        for module, s, erank, w0_norm, sim, intruders, gap in stats:
            r, scale = lora_scale(run.adapter.config, module)
            rows[module] = {
                **run.settings(), "layer": module, "d_out": W0.shape[1], "d_in": W0.shape[2],
                "r": r, "scale": scale, "delta_norm": float(s.norm()),
                "relative_delta": float(s.norm() / w0_norm), "effective_rank": float(erank),
                "top_k": top_k, "threshold": threshold, "intruders": int(intruders),
                "min_similarity": float(sim.min()), "a_orthonormality_gap": float(gap),
                **{f"sigma_{i + 1}": float(v) for i, v in enumerate(s[:r])},
            }
    return [rows[m] for m in order]


def _weight(run: Run, model: torch.nn.Module, module: str) -> torch.Tensor:
    """W0 of ``module`` as (d_out, d_in) float32 on the CPU; raise if the adapter's differs."""
    weight = model.get_submodule(module).weight.detach().float().cpu()
    weight = weight.T if run.adapter.config.fan_in_fan_out else weight
    if tuple(weight.shape) != run.adapter.shapes[module]:
        raise ValueError(f"{run.folder}: module {module!r} is {tuple(weight.shape)} in the base "
                         f"model {run.model_dir} but {run.adapter.shapes[module]} in the adapter")
    return weight


def load_base(run: Run) -> torch.nn.Module:
    """The run's pretrained model (no adapter), float32, eval mode, on ``model.device``.

    A classifier gets a new 2-way head: neither measure reads the head.
    """
    with quiet_model_loading():
        model = TASKS[run.cfg.model.task].load_model(run.model_dir, num_labels=2)
    return model.float().eval().to(resolve_device(run.cfg.model.device))


def forgetting_row(run: Run, model: torch.nn.Module, held_out: HeldOutText,
                   max_length: int | None) -> dict:
    """One row of :data:`FORGETTING_COLUMNS`: :func:`common.forgetting.forgetting` of the run."""
    task = TASKS[run.cfg.model.task]
    length = max_length or run.cfg.model.max_length
    tokens = encode_texts(task, held_out.texts, load_tokenizer(run.cfg.model, run.model_dir),
                          length)
    deltas = {m: run.adapter.delta(m) for m in run.adapter.shapes}
    measured = forgetting(model, deltas, tokens, task,
                          fan_in_fan_out=bool(run.adapter.config.fan_in_fan_out))
    return {**run.settings(), "texts": held_out.description, "n_texts": len(held_out.texts),
            "max_length": length, "measure": measured.measure, "base": measured.base,
            "tuned": measured.tuned, "forgetting": measured.forgetting}


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, columns in first-seen order (a run of lower rank leaves sigma_i empty)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summary(layers: list[dict], forgotten: list[dict]) -> str:
    """Per run: layers, intruders in all, mean effective rank, largest A gap, forgetting."""
    lines = ["| run | method | ε | layers | intruders | mean erank(ΔW) | max ‖AAᵀ−I‖_F | "
             "forgetting |", "|---|---|---|---|---|---|---|---|"]
    by_run = {row[schema.RUN]: row["forgetting"] for row in forgotten}
    for run in dict.fromkeys(row[schema.RUN] for row in layers):
        rows = [row for row in layers if row[schema.RUN] == run]
        forgot = f"{by_run[run]:.4g}" if run in by_run else ""
        lines.append(
            f"| {run} | {rows[0][schema.METHOD]} | {rows[0][schema.EPSILON_BUDGET]:g} | "
            f"{len(rows)} | {sum(r['intruders'] for r in rows)} | "
            f"{sum(r['effective_rank'] for r in rows) / len(rows):.3g} | "
            f"{max(r['a_orthonormality_gap'] for r in rows):.3g} | {forgot} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fedsvd-spectrum``."""
    p = argparse.ArgumentParser(prog="fedsvd-spectrum", description=__doc__.split("\n", 1)[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_FOLDER",
                   help="finished run folders (config.json, adapter/)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the CSVs and plots")
    p.add_argument("--top-k", type=int, default=10, metavar="K",
                   help="top singular vectors of W0 + ΔW examined for intruders (default 10)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="EPS",
                   help="cosine threshold ε: an intruder's max |cos| is below it (default 0.5)")
    p.add_argument("--forgetting", choices=SOURCES,
                   help="also measure forgetting on held-out text of this source")
    p.add_argument("--texts", type=int, default=256, metavar="N",
                   help="held-out texts (default 256)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per text (default: each run's model.max-length)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="which texts are drawn (default 0)")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier call")
    return p


def option_problems(args: argparse.Namespace, runs: list[Run]) -> list[str]:
    """One line per option that cannot be used, output that would be overwritten included."""
    problems = []
    if args.top_k < 1:
        problems.append(f"--top-k {args.top_k}: examine at least 1 singular vector")
    if not 0 < args.threshold <= 1:
        problems.append(f"--threshold {args.threshold:g}: a cosine threshold in (0, 1]")
    if args.texts < 10:
        problems.append(f"--texts {args.texts}: at least 10 (CKA compares pairs of texts)")
    if args.max_length is not None and args.max_length < 2:
        problems.append(f"--max-length {args.max_length}: at least 2 tokens")
    if args.forgetting and (why := source_problem(args.forgetting, [r.cfg.data for r in runs])):
        problems.append(why)
    if args.out.exists() and not args.out.is_dir():
        problems.append(f"--out {args.out}: is a file, not a folder")
    elif not args.force:
        made = [name for name in (SPECTRUM_FILE, FORGETTING_FILE, *PLOT_FILES)
                if (args.out / name).exists()]
        if made:
            problems.append(f"--out {args.out}: already holds {', '.join(made)}; pass --force "
                            "to replace them, or pick another --out")
    return problems


def compute(args: argparse.Namespace, runs: list[Run]) -> int:
    """Measure every run, write the CSVs and plots, print the summary; 0."""
    held_out = (out_of_domain_texts(args.forgetting, [r.cfg.data for r in runs], args.texts,
                                    args.seed) if args.forgetting else None)
    layers, forgotten = [], []
    for run in runs:
        start = time.perf_counter()
        model = load_base(run)
        rows = layer_rows(run, model, top_k=args.top_k, threshold=args.threshold)
        layers += rows
        if held_out is not None:
            forgotten.append(forgetting_row(run, model, held_out, args.max_length))
        print(f"[spectrum] {run.label}: {len(rows)} layers"
              f"{', forgetting' if held_out else ''} in {time.perf_counter() - start:.1f} s",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / SPECTRUM_FILE, layers)
    written = [args.out / SPECTRUM_FILE]
    if forgotten:
        write_csv(args.out / FORGETTING_FILE, forgotten)
        written.append(args.out / FORGETTING_FILE)
    written += spectrum_plots.write_all(layers, args.out)
    print(summary(layers, forgotten))
    if held_out is not None:
        print(f"forgetting on {len(held_out.texts)} {held_out.description}")
    print("[spectrum] wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Check every run and option (2 if any is refused), then measure (1 if that fails)."""
    args = build_parser().parse_args(argv)
    checked = [check_run(f, label) for f, label in zip(args.runs, run_labels(args.runs),
                                                        strict=True)]
    runs = [c for c in checked if isinstance(c, Run)]
    problems = [c for c in checked if isinstance(c, str)] + option_problems(args, runs)
    if problems:
        sys.stdout.flush()
        print("\n".join(f"error: {p}" for p in problems)
              + "\nrefused before starting: nothing was run", file=sys.stderr)
        return 2
    try:
        return compute(args, runs)
    except (ValueError, OSError, RuntimeError) as exc:
        sys.stdout.flush()
        print(f"[spectrum] FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
