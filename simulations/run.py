"""Run one Flower simulation of the app: ``python -m simulations.run [--run-config ...]``.

Examples
--------
python -m simulations.run                                  # the default run (pyproject.toml)
python -m simulations.run --run-config "privacy.epsilon=3 strategy.num-rounds=30"
python -m simulations.run --run-config simulations/conf/non_private.toml

Before any SuperLink or Ray starts, the whole run is checked in this process
(:func:`server.preflight.preflight`: every key and value, the data files, each SuperNode's
partition, the model folder, the results folder). Exit codes: 0 the run completed; 2 it was
refused before starting (the reasons are the last lines, each naming its key, file or line);
1 (or ``flwr run``'s own code) it started and failed (the reason is the last lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.preflight import refusal
from simulations.launch.superlink import flwr_run

ROOT = Path(__file__).resolve().parent.parent
REFUSED_EXIT_CODE = 2


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, check the run, run it; return 0, 2 (refused) or the run's failure code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help="overrides: 'k1=v1 k2=v2' or a .toml file (keys as in "
                             "pyproject); may be repeated")
    parser.add_argument("--num-supernodes", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--results-dir", default=str(ROOT / "results"),
                        help="folder for metrics.csv, config.json and the adapter")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        parser.error("--num-supernodes and --cpus-per-client must be >= 1")
    run_config = [f"output.dir={json.dumps(args.results_dir)}", *args.run_config]
    if why := refusal(ROOT, run_config, num_partitions=args.num_supernodes):
        sys.stdout.flush()
        print(why, file=sys.stderr)
        return REFUSED_EXIT_CODE
    return flwr_run(ROOT, run_config=run_config, num_supernodes=args.num_supernodes,
                    cpus_per_client=args.cpus_per_client)


if __name__ == "__main__":
    sys.exit(main())
