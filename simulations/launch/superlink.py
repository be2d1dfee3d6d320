"""Start a private simulation SuperLink, ``flwr run`` the app on it, and stop it by PID.

``flwr run .`` against the ``:local:`` address starts a detached SuperLink that outlives the
command and, by default, ``uv sync``s the app's dependencies into a fresh venv (which would
fetch CUDA torch). Here the SuperLink is our own child process, on free loopback ports, with
runtime dependency installation off, and it is always stopped when the run ends.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from common.run_config import run_config_args
from deploy.processes import (
    failure_lines,
    flower_env,
    free_port,
    last_run_status,
    sigterm_raises_exit,
    stop_process_trees,
    wait_for_port,
)

CONNECTION = "sim"
RAY_ADDRESS_HELP = ("host:port of a running Ray cluster's head: the simulation joins it (its "
                    "nodes run the ClientApps) instead of starting Ray on this machine")


def start_simulation_superlink(home: Path, port: int, connection: str, log: IO[str], *,
                               cwd: Path | None = None,
                               ray_address: str | None = None) -> subprocess.Popen:
    """Start a simulation SuperLink on loopback ``port``; return it (not waited for).

    ``home/config.toml`` gets one insecure ``connection`` to it; the process runs in its own
    session. Runtime dependency installation is off (:func:`deploy.processes.flower_env`); its
    database is ``home/state.db``, its output goes to ``log``. With ``ray_address``
    (``host:port`` of a running Ray cluster's head) its simulations join that cluster
    (``RAY_ADDRESS``, which Flower's ``ray.init`` reads) instead of starting Ray here.
    """
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n'
        f'[superlink.{connection}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
        env=flower_env(home) | ({"RAY_ADDRESS": ray_address} if ray_address else {}),
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path | None = None,
                         ray_address: str | None = None) -> Iterator[dict[str, str]]:
    """Run a simulation SuperLink for the duration of the block; yield the env for ``flwr``.

    ``flwr_home`` (default: a temporary folder, removed afterwards) receives ``config.toml``
    with one connection to this SuperLink, its database and its log; ``ray_address``: see
    :func:`start_simulation_superlink`.
    """
    if flwr_home is None:
        with tempfile.TemporaryDirectory(prefix="flwr-home-") as tmp:
            with simulation_superlink(Path(tmp), ray_address) as env:
                yield env
        return
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()  # since flwr 1.40 one HTTP port serves the Control, Fleet and Runtime APIs
    env = flower_env(home)  # it spawns flower-superexec, which must find the venv's apps
    log = (home / "superlink.log").open("w")
    proc = start_simulation_superlink(home, port, CONNECTION, log, ray_address=ray_address)
    try:
        with sigterm_raises_exit():  # a `kill` of this process still stops the SuperLink
            wait_for_port(port, proc)
            yield env
    finally:
        stop_process_trees([proc.pid])  # SuperExec, the simulation and Ray: their own sessions
        proc.wait()
        log.close()


def federation_config(num_supernodes: int, cpus_per_client: int,
                      gpus_per_client: float = 0.0) -> str:
    """``--federation-config`` of a local simulation: SuperNodes and each ClientApp's resources.

    ``gpus_per_client`` is the share of one GPU a ClientApp reserves (0.5: two per GPU); Ray then
    runs at most as many ClientApps at once as the GPUs hold, and each sees its GPU as CUDA.
    """
    config = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client > 0:
        config += f" client-resources-num-gpus={gpus_per_client:g}"
    return config


def flwr_run(app_dir: Path, *, run_config: Sequence[str] | str = (), num_supernodes: int = 6,
             cpus_per_client: int = 1, gpus_per_client: float = 0.0,
             flwr_home: Path | None = None, timeout: float | None = None,
             ray_address: str | None = None) -> int:
    """``flwr run <app_dir> --stream`` on a private SuperLink; 0 only if the run completed.

    ``run_config``: override strings ("k=v k2=v2") or .toml files, passed as ``--run-config``.
    ``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's status is asked
    of the SuperLink before it stops: a run that did not finish as completed returns flwr's
    non-zero code or 1, and its reason is printed last (lines starting ``[run] FAILED``).
    """
    federation = federation_config(num_supernodes, cpus_per_client, gpus_per_client)
    cmd = ["flwr", "run", str(app_dir), CONNECTION, "--stream",
           "--federation-config", federation]
    for overrides in run_config_args([run_config] if isinstance(run_config, str) else run_config):
        cmd += ["--run-config", overrides]
    with simulation_superlink(flwr_home, ray_address) as env:
        code = subprocess.run(cmd, env=env, cwd=app_dir, timeout=timeout).returncode
        lines = failure_lines(code, last_run_status(env, CONNECTION))
    sys.stdout.flush()
    for line in lines:
        print(f"[run] {line}", flush=True)
    return (code or 1) if lines else 0
