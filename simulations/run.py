"""Run one Flower simulation of the app: ``fedsvd-run [--run-config ...]``.

Examples
--------
fedsvd-run                                  # the default run (pyproject.toml)
fedsvd-run --run-config "privacy.epsilon=3 strategy.num-rounds=30"
fedsvd-run --run-config simulations/conf/non_private.toml
python -m simulations.run --verbose         # the same, printing everything Flower prints

Before any SuperLink or Ray starts, the whole run is checked in this process
(:func:`server.preflight.preflight`: every key and value, the data files, each SuperNode's
partition, the model folder, the results folder). Everything the run prints (flwr, the
ServerApp, every ClientApp) goes to ``run.log`` in the run's results folder; the console gets
one line per round (accuracy, ε, time, ETA), the run's warnings and errors, and a summary.
Exit codes: 0 the run completed; 2 it was refused before starting (the reasons are the last
lines, each naming its key, file or line); 1 (or ``flwr run``'s own code) it started and
failed (the reason is the last lines).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import schema
from common.run_config import app_run_config
from server.preflight import REFUSED, preflight
from simulations.launch import console
from simulations.launch.superlink import RAY_ADDRESS_HELP, flwr_run

ROOT = Path(__file__).resolve().parent.parent
REFUSED_EXIT_CODE = 2
# Log lines shown on the console besides the rounds: warnings and errors, minus what Flower
# always prints in a simulation of ours (the number of SuperNodes is set, evaluation is the
# server's own, the Ray actors are stopped at the end).
SHOWN = re.compile(r"\b(WARNING|ERROR|Traceback)\b|^\S*Error: ")
EXPECTED = ("default simulated SuperNodes changed", "fraction_evaluate is set to 0.0",
            "Manually terminating ClientAppActor")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, check the run, run it; return 0, 2 (refused) or the run's failure code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help="overrides: 'k1=v1 k2=v2' or a .toml file (keys as in "
                             "pyproject); may be repeated")
    parser.add_argument("--num-supernodes", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="share of a GPU each ClientApp reserves (0: none; 0.5: two per GPU)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help=RAY_ADDRESS_HELP)
    parser.add_argument("--results-dir", default=str(ROOT / "results"),
                        help="folder for metrics.csv, config.json, the adapter and run.log")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything the run prints (it goes to run.log either way)")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        parser.error("--num-supernodes and --cpus-per-client must be >= 1")
    if not 0 <= args.gpus_per_client <= 1:
        parser.error(f"--gpus-per-client {args.gpus_per_client:g}: a share of one GPU, in [0, 1]")
    run_config = [f"output.dir={json.dumps(args.results_dir)}", *args.run_config]
    try:
        cfg = preflight(app_run_config(ROOT, run_config), num_partitions=args.num_supernodes)
    except REFUSED as exc:
        sys.stdout.flush()
        print(f"error: {exc}\nrefused before starting: nothing was run", file=sys.stderr)
        return REFUSED_EXIT_CODE
    folder = cfg.results_folder
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / schema.RUN_LOG
    with log.open("a") as f:
        f.write(f"=== {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC: {' '.join(sys.argv)}\n")
    console.say(f"[run] {cfg.run_name}: {cfg.strategy.name}, ε {cfg.privacy.epsilon:g}, "
                f"{cfg.strategy.num_rounds} rounds on {args.num_supernodes} SuperNodes; "
                f"everything it prints goes to {log}")
    started = time.monotonic()
    on_line = _console(cfg.strategy.num_rounds, verbose=args.verbose)
    with console.output_to(log), console.following(log, on_line):
        code = flwr_run(ROOT, run_config=run_config, num_supernodes=args.num_supernodes,
                        cpus_per_client=args.cpus_per_client,
                        gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
    if code:
        reason = console.failure_reason(log) or f"exit code {code}"
        console.say(f"[run] FAILED after {console.duration(time.monotonic() - started)}: "
                    f"{reason} (whole output: {log})")
        return code
    console.say(_summary(folder, cfg.privacy.epsilon, time.monotonic() - started))
    return 0


def _console(num_rounds: int, *, verbose: bool):
    """``on_line`` for the run's log: progress over ``num_rounds`` rounds, warnings and errors.

    ``verbose``: every line.
    """
    rounds = console.Progress(console.say).cell("[run]", "", num_rounds, rounds_after=None)

    def on_line(line: str) -> None:
        if verbose:
            console.say(line)
            return
        rounds(line)
        text = ANSI.sub("", line).strip()
        if text.startswith("[run]"):  # flwr_run's own verdict: main() says it at the end
            return
        if SHOWN.search(text) and not any(e in text for e in EXPECTED):
            console.say(f"[run] {text}")
    return on_line


def _summary(folder: Path, epsilon: float, seconds: float) -> str:
    """The last line: final accuracy, balanced accuracy, AUC, examples, largest client ε, where.

    ``epsilon`` is the run's budget, ``privacy.epsilon`` (inf: none).
    """
    with (folder / schema.METRICS_FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    epsilons = [float(r[schema.EPSILON_MAX]) for r in rows if r.get(schema.EPSILON_MAX)]
    spent = (f"largest client ε {max(epsilons):.2f} (budget {epsilon:g})"
             if epsilons and math.isfinite(epsilon) else "no privacy budget")
    balanced = console.class_metrics_text(last)
    return (f"[run] done in {console.duration(seconds)}: final {last[schema.EVAL_SPLIT]} "
            f"accuracy {float(last[schema.ACCURACY]):.4f}{balanced} on "
            f"{last[schema.EVAL_EXAMPLES]} examples, {spent}; results in {folder}")


if __name__ == "__main__":
    sys.exit(main())
