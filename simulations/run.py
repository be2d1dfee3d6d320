"""Run one Flower simulation of the app: ``python -m simulations.run [--run-config ...]``.

Examples
--------
python -m simulations.run                                  # the default run (pyproject.toml)
python -m simulations.run --run-config "privacy.epsilon=3 strategy.num-rounds=30"
python -m simulations.run --run-config simulations/conf/non_private.toml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simulations.local_superlink import flwr_run

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run; return the exit code of ``flwr run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help="overrides: 'k1=v1 k2=v2' or a .toml file (keys as in "
                             "pyproject); may be repeated")
    parser.add_argument("--num-supernodes", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--results-dir", default=str(ROOT / "results"),
                        help="folder for metrics.csv, config.json and the adapter")
    args = parser.parse_args(argv)
    run_config = [f"output.dir={json.dumps(args.results_dir)}", *args.run_config]
    return flwr_run(ROOT, run_config=run_config, num_supernodes=args.num_supernodes,
                    cpus_per_client=args.cpus_per_client)


if __name__ == "__main__":
    sys.exit(main())
