"""Where a round of the default run spends its time: start-up, one client round, the server.

python -m benchmarks.round_time [--compute-dtype both] [--repeats 3] [--markdown]

Times, in this one process and with the project's own functions (:mod:`benchmarks.round_parts`),
the parts of ``python -m simulations.run``, with the frozen encoder in float32 and in bfloat16
(``model.compute-dtype``; both by default, interleaved in every repeat, so that their ratio is
paired under the same load):

- start-up, the same in either dtype: a fresh interpreter's imports (``client.app``, what each
  Ray actor imports), the corpus, the launcher's preflight (every partition), the server's
  ``check_run``, its model + LoRA + class-name head and evaluation sets (the subset and the
  whole test split), one client's partition tokenized and its σ calibrated (first round only);
- one client round as :func:`client.app.train` runs it: the model rebuilt from disk with the
  global adapter, the privacy plan, Opacus ``make_private``, the DP-SGD steps of
  :func:`client.training.run_local_steps` (per step, split by hooks into forward, loss,
  backward with Opacus' per-sample gradients, clipping, noise, the rest of the optimizer step,
  and the rest: Poisson batch, ``zero_grad``), the reply;
- the server: the strategy's ``configure_train`` and ``aggregate_train`` (FedSVD: mean of B and
  refactorization; every sampled node replies with the timed client's arrays, each but the
  first with noise added), and
  :class:`server.evaluation.GlobalEvaluator` on the evaluation subset (``--full-eval``: also
  once on the whole test split, as in the final round).

Each repeat rebuilds the model, which reseeds torch: every repeat and dtype trains on the same
Poisson batches. Prints the median [min] of each part, the ratio float32/bfloat16, and per round
≈ (clients per round) × client round + evaluation, the clients running one after another (on 2
cores the simulation runs two 1-CPU clients side by side and the third alone). bfloat16 is timed
only where the CPU computes it natively (AVX-512 BF16 or AMX) unless ``--emulated-bf16``
(emulated it is about 100× slower than float32). Nothing is written: the run's results folder
is a temporary one.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks import round_parts as rp
from common.config import COMPUTE_DTYPES

DTYPES = tuple(d for d in COMPUTE_DTYPES if d != "auto")  # the dtypes a run can compute in
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` the first CPU of ``cpuinfo`` lists (all False if unreadable)."""
    try:
        line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return dict.fromkeys(CPU_FLAGS, False)
    have = set(line.partition(":")[2].split())
    return {flag: flag in have for flag in CPU_FLAGS}


def run_config(args: argparse.Namespace, output_dir: str) -> dict:
    """The flat run config: pyproject's, then ``--run-config``, then the settings flags given."""
    from common.run_config import app_run_config, override_text

    flags = {"train.local-steps": args.local_steps, "train.batch-size": args.batch_size,
             "model.max-length": args.max_length, "data.max-eval-examples": args.eval_examples,
             "model.path": args.model_path}
    given = {key: value for key, value in flags.items() if value is not None}
    return app_run_config(rp.ROOT, [*args.run_config,
                                    override_text({**given, "output.dir": output_dir})])


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _cell(values: list[float] | None) -> str:
    return f"{_time(statistics.median(values))} [{_time(min(values))}]" if values else "-"


def _ratio(by: dict[str, list[float]], labels: list[str]) -> str:
    if len(labels) < 2 or not all(by.get(label) for label in labels):
        return "-"
    return f"{statistics.median(by[labels[0]]) / statistics.median(by[labels[1]]):.2f}x"


def rows(samples: rp.Samples, labels: list[str]) -> tuple[list, list]:
    """(start-up rows (part, cell), per-dtype rows (part, cell per label, ratio)), in order."""
    start = [(part, _cell(by[""])) for part, by in samples.items() if "" in by]
    server = [rp.CONFIGURE, rp.AGGREGATE]
    order = ([p for p in samples if "" not in samples[p] and p not in server]
             + [p for p in server if p in samples])
    return start, [(part, *(_cell(samples[part].get(label)) for label in labels),
                    _ratio(samples[part], labels)) for part in order]


def estimates(samples: rp.Samples, s: dict, labels: list[str], client_threads: int
              ) -> list[str]:
    """Per round and per run, from the medians: clients one after another, then evaluation."""
    n_sub, n_full, rounds = len(s["subset"]), len(s["full"]), s["cfg"].strategy.num_rounds
    final = rp.evaluation_part(n_full, final=True)

    def median(part: str, label: str) -> float:
        return statistics.median(samples[part][label])

    per_round, full, run = {}, {}, {}
    for label in labels:
        client, evaluation = median(rp.CLIENT_ROUND, label), median(rp.evaluation_part(n_sub),
                                                                    label)
        full[label] = (median(final, label) if label in samples.get(final, {})
                       else evaluation * n_full / n_sub)
        per_round[label] = s["sampled"] * client + evaluation
        run[label] = rounds * s["sampled"] * client + rounds * evaluation + full[label]

    def each(values: dict[str, float]) -> str:
        text = ", ".join(f"{label} {values[label]:.1f} s" for label in labels)
        return text + (f" ({labels[0]}/{labels[1]} {values[labels[0]] / values[labels[1]]:.2f}x)"
                       if len(labels) == 2 else "")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    waves = -(-s["sampled"] // cores)  # 1-CPU clients, as many side by side as there are cores
    if client_threads == 1:
        simulated = {label: per_round[label] - (s["sampled"] - waves)
                     * median(rp.CLIENT_ROUND, label) for label in labels}
        as_simulated = (f"as simulated (1-CPU clients, {cores} side by side): per round ≈ "
                        f"{waves} × client round + evaluation: {each(simulated)}")
    else:
        as_simulated = (f"the simulation gives each client 1 thread and runs {cores} side by "
                        "side: --threads 1 estimates that round too")
    how = ("timed once" if final in samples
           else "extrapolated from the subset by example count; --full-eval times it")
    return [f"per round ≈ {s['sampled']} × client round (if clients run one after another on 2 "
            f"cores) + evaluation: {each(per_round)}", as_simulated,
            f"final round's evaluation of all {n_full} test examples ({how}): {each(full)}",
            f"{rounds} rounds ≈ {rounds} × {s['sampled']} client rounds + {rounds} evaluations of "
            f"{n_sub} (rounds 0-{rounds - 1}) + the final one: {each(run)}; start-up, Ray and "
            "each actor's first partitions not included"]


def markdown(start: list, parts: list, labels: list[str]) -> str:
    """The two tables as one markdown table (indentation shown as "·")."""
    def name(part: str) -> str:
        depth = (len(part) - len(part.lstrip())) // 2
        return "· " * depth + part.strip()

    lines = [f"| part | {' | '.join(labels)} | {'/'.join(labels) if len(labels) == 2 else ''} |",
             "|---|" + "---:|" * (len(labels) + 1)]
    lines += [f"| {name(p)} | {cell} |" + " |" * len(labels) for p, cell in start]
    lines += [f"| {name(p)} | " + " | ".join(cells) + " |" for p, *cells in parts]
    return "\n".join(lines)


def header(s: dict, args: argparse.Namespace, native: bool, client_threads: int) -> list[str]:
    """The machine, torch's threads, the CPU flags and the settings timed."""
    import torch

    from common.environment import cpu_model
    from common.model_path import resolve_model_path

    cfg = s["cfg"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu_flags().items())
    return [f"torch {torch.__version__}, device {s['model'].device}, torch threads "
            f"{client_threads} in the clients, {torch.get_num_threads()} in the server, "
            f"{os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}; CPU {cpu_model() or '?'}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {flags}: native bfloat16 "
            f"{'yes' if native else 'no'}",
            f"model {resolve_model_path(cfg.model)}, partition {args.partition} of "
            f"{args.num_supernodes} ({len(s['data'].train)} training examples), "
            f"{cfg.train.local_steps} DP-SGD steps of expected batch {cfg.train.batch_size}, "
            f"max length {cfg.model.max_length}, {len(s['subset'])} evaluation examples of "
            f"{len(s['full'])}, {cfg.strategy.num_rounds} rounds; median [min] of "
            f"{args.repeats} repeats"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-dtype", choices=(*DTYPES, "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local-steps", type=int, help="default: train.local-steps (5)")
    parser.add_argument("--batch-size", type=int, help="default: train.batch-size (64)")
    parser.add_argument("--max-length", type=int, help="default: model.max-length (64)")
    parser.add_argument("--eval-examples", type=int,
                        help="default: data.max-eval-examples (500)")
    parser.add_argument("--model-path", help="default: model.path (the shipped MiniLM)")
    parser.add_argument("--run-config", action="append", default=[],
                        help="overrides: 'k1=v1 k2=v2' or a .toml file, as fedsvd-run takes them")
    parser.add_argument("--num-supernodes", type=int, default=6)
    parser.add_argument("--partition", type=int, default=0, help="the client timed")
    parser.add_argument("--threads", type=int,
                        help="torch threads of the client parts (default: torch's own; the "
                             "simulation's 1-CPU clients have 1); the server's stay torch's own")
    parser.add_argument("--full-eval", action="store_true",
                        help="also time the final round's evaluation of the whole test split")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="time bfloat16 on a CPU without it (about 100x slower)")
    parser.add_argument("--skip-imports", action="store_true",
                        help="do not time a fresh interpreter's imports")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 0 <= args.partition < args.num_supernodes:
        parser.error("--repeats must be >= 1 and --partition in [0, --num-supernodes)")
    return args


def measure(args: argparse.Namespace, labels: list[str]) -> tuple[rp.Samples, dict]:
    """Run every part ``args.repeats`` times; dtypes alternate which goes first."""
    import torch

    def client(*client_args):
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads or threads)
        try:
            return rp.client_round(*client_args)
        finally:
            torch.set_num_threads(threads)

    samples: rp.Samples = {}
    with tempfile.TemporaryDirectory() as output_dir:
        flat = run_config(args, output_dir)
        s = rp.start_up(flat, partition=args.partition, num_partitions=args.num_supernodes,
                        repeats=args.repeats, imports=not args.skip_imports, samples=samples)
        for repeat in range(args.repeats):
            for label in labels if repeat % 2 == 0 else labels[::-1]:
                dtype = getattr(torch, label)
                rp.server_round(s, flat, num_partitions=args.num_supernodes, dtype=dtype,
                                label=label, samples=samples, full_eval=args.full_eval,
                                client=lambda d=dtype, x=label: client(s, d, x, samples))
    return samples, s


def main(argv: list[str] | None = None) -> int:
    """Time every part and print the tables and the estimates."""
    args = parse(argv)
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import AppConfig
    from common.devices import resolve_device
    from common.precision import native_bfloat16

    cfg = AppConfig.from_run_config(run_config(args, tempfile.gettempdir()))
    native = native_bfloat16(resolve_device(cfg.model.device))
    labels = list(DTYPES) if args.compute_dtype == "both" else [args.compute_dtype]
    skipped = [] if native or args.emulated_bf16 else [x for x in labels if x == "bfloat16"]
    labels = [x for x in labels if x not in skipped]
    threads, flwr_level = torch.get_num_threads(), logging.getLogger("flwr").level
    identity = {name: vars(TaskIdentity)[name] for name in ("_run_id", "_node_id", "_task_id")}
    try:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # the evaluator's lines, every round
        if identity["_run_id"] is None:  # building a Message needs one
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' and the accountant's, every round
            samples, s = measure(args, labels)
        start, parts = rows(samples, labels)
        print("\n".join(header(s, args, native, args.threads or threads)))
        width = max(len(p) for p, *_ in start + parts) + 2
        print(f"\n{'start-up (either dtype)':<{width}}{'median [min]':>20}")
        print("\n".join(f"{p:<{width}}{cell:>20}" for p, cell in start))
        print(f"\n{'one round':<{width}}" + "".join(f"{x:>20}" for x in labels)
              + (f"{'/'.join(labels):>20}" if len(labels) == 2 else ""))
        print("\n".join(f"{p:<{width}}" + "".join(f"{c:>20}" for c in cells[:len(labels)])
                        + (f"{cells[-1]:>20}" if len(labels) == 2 else "")
                        for p, *cells in parts))
        for label in skipped:
            print(f"{label}: not timed, this CPU has no native {label} (--emulated-bf16 times "
                  "it, about 100x slower than float32)")
        if not s["aggregated"]:
            print("the strategy rejected the replies or kept the adapter: the aggregation "
                  "timed is not a full one")
        print("\n" + "\n".join(estimates(samples, s, labels, args.threads or threads)))
        if args.markdown:
            print("\n" + markdown(start, parts, labels))
    finally:
        torch.set_num_threads(threads)
        logging.getLogger("flwr").setLevel(flwr_level)
        for name, value in identity.items():
            setattr(TaskIdentity, name, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
