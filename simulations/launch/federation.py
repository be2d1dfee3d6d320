"""A local simulation federation for Flower's own ``flwr run``: ``fedsvd-federation start|stop``.

``make run`` (``fedsvd-run``) starts and stops a private SuperLink for each run. A Flower user
runs ``flwr run .`` instead, which on its own would start Flower's default federation (2
simulated SuperNodes, not this app's 6, so σ and the partitions would differ), ``uv sync`` the
app into a fresh environment (ignoring ``constraints.txt``: it fetched CUDA torch here), and
leave a detached SuperLink running. ``start`` gives that user the same federation as
``make run`` instead::

    fedsvd-federation start            # prints the two lines below
    export FLWR_HOME=<app>/.flwr
    flwr run . fedsvd --stream
    fedsvd-federation stop

It starts a simulation SuperLink on a free loopback port, in the background, with runtime
dependency installation off and this folder as its working directory (so that a relative
``output.dir`` lands in ``<app>/results``); writes the connection ``fedsvd`` into
``<home>/config.toml`` (its own FLWR_HOME, never the user's ``~/.flwr``); and sets the
federation to ``--num-supernodes`` SuperNodes with ``--cpus-per-client`` CPUs per ClientApp
(``flwr federation simulation-config``). ``stop`` stops the SuperLink and everything it
started, by the PID it recorded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

from deploy.processes import flower_env, free_port, stop_from_pid_files, wait_for_port
from simulations.launch.superlink import RAY_ADDRESS_HELP, start_simulation_superlink

ROOT = Path(__file__).resolve().parents[2]  # the app: pyproject.toml
CONNECTION = "fedsvd"
FEDERATION = "@none/default"  # the simulation federation a local SuperLink serves


def running_pid(home: Path) -> int | None:
    """The PID of this home's SuperLink if it is still a running Flower process, else None."""
    pid_file = home / "pids" / "superlink.pid"
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text().split()[0])
    try:
        alive = any("flower-superlink" in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return None
    return pid if alive else None


def start(home: Path, *, num_supernodes: int, cpus_per_client: int,
          gpus_per_client: float = 0.0, ray_address: str | None = None) -> int:
    """Start the SuperLink and configure its federation; return its PID."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "pids").mkdir(exist_ok=True)
    port = free_port()
    env = flower_env(home)
    log = home / "superlink.log"
    with log.open("a") as out:
        proc = start_simulation_superlink(home, port, CONNECTION, out, cwd=ROOT,
                                          ray_address=ray_address)
    (home / "pids" / "superlink.pid").write_text(f"{proc.pid}\n")
    try:
        wait_for_port(port, proc, log)
        subprocess.run(
            ["flwr", "federation", "simulation-config", FEDERATION, CONNECTION,
             "--num-supernodes", str(num_supernodes),
             "--client-resources-num-cpus", str(cpus_per_client),
             *(["--client-resources-num-gpus", f"{gpus_per_client:g}"] if gpus_per_client else [])],
            env=env, check=True, capture_output=True, text=True, timeout=120)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        stop_from_pid_files(home)
        detail = getattr(exc, "stderr", "") or ""
        raise RuntimeError(f"the SuperLink did not start ({exc}); {detail.strip()} "
                           f"see {log}") from exc
    return proc.pid


def main(argv: Sequence[str] | None = None) -> int:
    """``start`` or ``stop`` the local federation; 0 on success, 1 if it could not start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--home", type=Path, default=ROOT / ".flwr",
                        help="FLWR_HOME of the federation (config.toml, database, logs, PID)")
    parser.add_argument("--num-supernodes", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="share of a GPU each ClientApp reserves (0: none)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help=RAY_ADDRESS_HELP)
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        parser.error("--num-supernodes and --cpus-per-client must be >= 1")
    home = args.home.expanduser().resolve()
    if args.action == "stop":
        stopped = stop_from_pid_files(home) if (home / "pids").is_dir() else []
        print(f"stopped: {', '.join(stopped) or 'nothing (no SuperLink of ' + str(home) + ')'}")
        return 0
    if (pid := running_pid(home)) is not None:
        print(f"already running (SuperLink PID {pid}); `fedsvd-federation stop` first to "
              "change its federation")
    else:
        try:
            pid = start(home, num_supernodes=args.num_supernodes,
                        cpus_per_client=args.cpus_per_client,
                        gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"started: SuperLink PID {pid}, {args.num_supernodes} simulated SuperNodes with "
              f"{args.cpus_per_client} CPU(s) per ClientApp, runtime dependency installation off")
    print(f"export FLWR_HOME={home}\nflwr run . {CONNECTION} --stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
