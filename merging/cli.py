"""Command line: merge N sources into one rank-K LoRA adapter, or fold one more into a merge.

    python -m merging --rank K [--rank-by sigma|normalized|quota] [--weights w1,w2,...]
                      [--base MODEL_DIR] [--method axis|task-arithmetic|ties|peft-svd]
                      [--force] --out DIR SRC1 SRC2 ...
    python -m merging add --into DIR [--rank K] [--weight W] [--base MODEL_DIR]
                          [--out DIR2 | --force] SRC

A source is a peft LoRA adapter folder or a full fine-tuned model folder (``--base`` needed).
Errors name the source at fault and exit with status 2. No Flower import.

What a user made is never lost by accident: before anything is loaded, an output folder that
is one of the sources is refused (even with ``--force``), and one that already holds an adapter
(``--into`` itself for ``add`` without ``--out``) is refused unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kernels.merge import RANK_BY
from merging.adapter_io import MergedAdapter, adapter_files, read_provenance, save_merged
from merging.baselines import load_base_model, peft_svd, task_arithmetic, ties
from merging.loading import load_sources
from merging.merge import add_adapter, merge_adapters

METHODS = ("axis", "task-arithmetic", "ties", "peft-svd")


def _floats(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,0.5,2") from exc


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder: needed for full-model sources "
                        "(Δ = W_ft − W_0); with adapters it checks every module's shape")
    parser.add_argument("--target-modules", type=_names, help="full models only: modules to "
                        "merge, e.g. query,value (adapters name their own)")
    parser.add_argument("--dense-rank", type=int, help="rank of the truncated SVD of dense "
                        "deltas (full models, base_delta.safetensors); default --rank")
    parser.add_argument("--allow-base-mismatch", action="store_true", help="accept adapters "
                        "whose base_model_name_or_path differ (same model, other paths)")


def merge_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m merging``."""
    parser = argparse.ArgumentParser(
        prog="python -m merging", description="Merge LoRA adapters and/or full fine-tunes of "
        "one base model into one rank-K LoRA adapter: per layer, the top K rank-one SVD "
        "components pooled across sources (AXIS). `python -m merging add -h`: fold one more "
        "source into a merge.")
    parser.add_argument("sources", nargs="+", metavar="SRC", help="adapter or model folders")
    parser.add_argument("--rank", type=int, required=True, help="K, the merged rank")
    parser.add_argument("--rank-by", choices=RANK_BY, default="sigma",
                        help="component score: |w| σ, σ / σ_1 of its source, or a per-source "
                        "quota of K / N first (default sigma)")
    parser.add_argument("--weights", type=_floats, help="w1,w2,... one per source (default 1)")
    parser.add_argument("--method", choices=METHODS, default="axis", help="axis (ours) or a "
                        "baseline, each truncated to rank K")
    parser.add_argument("--density", type=float, default=0.2, help="ties: fraction kept")
    parser.add_argument("--out", required=True, help="output adapter folder (never a source)")
    parser.add_argument("--force", action="store_true", help="replace an adapter already in "
                        "--out (a source is never overwritten)")
    _shared(parser)
    return parser


def add_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m merging add``."""
    parser = argparse.ArgumentParser(
        prog="python -m merging add", description="Fold one more source into a merged adapter "
        "by Brand's incremental SVD: the rank-K truncation of merge + w · Δ_new.")
    parser.add_argument("source", metavar="SRC", help="adapter or model folder to add")
    parser.add_argument("--into", required=True, help="merged adapter folder")
    parser.add_argument("--rank", type=int, help="K (default: the merge's rank; its rank + "
                        "the source's keeps everything)")
    parser.add_argument("--weight", type=float, default=1.0, help="w of the new source")
    parser.add_argument("--out", help="output folder (default: --into, updated in place, "
                        "which needs --force; never SRC)")
    parser.add_argument("--force", action="store_true", help="update --into in place, or "
                        "replace an adapter already in --out (SRC is never overwritten)")
    _shared(parser)
    return parser


def output_problem(args: argparse.Namespace, add: bool) -> str | None:
    """Why writing the output of ``args`` would lose what a user made, or None if it is safe.

    Checked before anything is loaded. The output folder (``--out``; ``--into`` for ``add``
    without ``--out``) must not be a source (resolved paths compared; ``--force`` does not
    allow it), and must not already hold an adapter unless ``--force`` is given.
    """
    out = Path(args.out or args.into) if add else Path(args.out)
    sources = [("SRC", args.source)] if add else [
        (f"SRC {i}", s) for i, s in enumerate(args.sources, start=1)]
    for label, source in sources:
        if out.resolve() == Path(source).resolve():
            return (f"--out {out}: is {label} {source}; writing the merge there would "
                    f"overwrite that source (refused even with --force); pick another --out")
    if args.force:
        return None
    if add and out.resolve() == Path(args.into).resolve():
        how = "without --out" if args.out is None else "with --out equal to --into"
        return (f"--into {args.into}: {how} the merge is updated in place, replacing it; "
                f"pass --force to do so, or --out DIR to write a new folder")
    if found := adapter_files(out):
        return (f"--out {out}: already holds an adapter ({', '.join(found)}); pass --force to "
                f"replace it, or pick another --out")
    return None


def run_merge(args: argparse.Namespace) -> tuple[Path, MergedAdapter]:
    """Load and check the sources, merge them by ``args.method``, save the adapter."""
    sources = load_sources(args.sources, base=args.base, target_modules=args.target_modules,
                           check_base_name=not args.allow_base_mismatch)
    if args.method == "axis":
        merged = merge_adapters(sources, args.rank, args.rank_by, args.weights, args.dense_rank)
    elif args.method == "task-arithmetic":
        merged = task_arithmetic(sources, args.rank, args.weights, args.dense_rank)
    elif args.method == "ties":
        merged = ties(sources, args.rank, args.density, args.weights)
    else:
        merged = peft_svd(sources, load_base_model(args.base, sources[0]), args.rank,
                          args.weights)
    return save_merged(args.out, merged), merged


def run_add(args: argparse.Namespace) -> tuple[Path, MergedAdapter]:
    """Load the merge and the new source, check them, add it, save the adapter."""
    merged, source = load_sources([args.into, args.source], base=args.base,
                                  target_modules=args.target_modules,
                                  check_base_name=not args.allow_base_mismatch)
    result = add_adapter(merged, source, args.rank, args.weight, args.dense_rank,
                         read_provenance(args.into))
    return save_merged(args.out or args.into, result), result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, merge (or add), save; on a bad source or output print why, exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    add = bool(argv) and argv[0] == "add"
    parser = add_parser() if add else merge_parser()
    args = parser.parse_args(argv[1:] if add else argv)
    if problem := output_problem(args, add):
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    start = time.perf_counter()
    try:
        out, merged = run_add(args) if add else run_merge(args)
    except (ValueError, OSError) as exc:  # SourceError is a ValueError naming its source
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"{out}: rank-{merged.config.r} LoRA on {len(merged.pairs)} modules from "
          f"{len(merged.provenance['sources'])} sources in {time.perf_counter() - start:.2f} s")
    return 0
