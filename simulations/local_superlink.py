"""Start a private simulation SuperLink, ``flwr run`` the app on it, and stop it by PID.

``flwr run .`` against the ``:local:`` address starts a detached SuperLink that outlives the
command and, by default, ``uv sync``s the app's dependencies into a fresh venv (which would
fetch CUDA torch). Here the SuperLink is our own child process, on free loopback ports, with
runtime dependency installation off, and it is always stopped when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from common.run_config import run_config_args
from deploy.processes import failure_lines, free_port, last_run_status, wait_for_port

CONNECTION = "sim"


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path | None = None) -> Iterator[dict[str, str]]:
    """Run a simulation SuperLink for the duration of the block; yield the env for ``flwr``.

    ``flwr_home`` (default: a temporary folder, removed afterwards) receives ``config.toml``
    with one connection to this SuperLink, its database and its log.
    """
    if flwr_home is None:
        with tempfile.TemporaryDirectory(prefix="flwr-home-") as tmp:
            with simulation_superlink(Path(tmp)) as env:
                yield env
        return
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()  # since flwr 1.40 one HTTP port serves the Control, Fleet and Runtime APIs
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(home),  # it spawns flower-superexec
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    log = (home / "superlink.log").open("w")
    proc = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port, proc)
        yield env
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the SuperLink's process group (it spawns the apps and Ray), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def flwr_run(app_dir: Path, *, run_config: Sequence[str] | str = (), num_supernodes: int = 6,
             cpus_per_client: int = 1, flwr_home: Path | None = None,
             timeout: float | None = None) -> int:
    """``flwr run <app_dir> --stream`` on a private SuperLink; 0 only if the run completed.

    ``run_config``: override strings ("k=v k2=v2") or .toml files, passed as ``--run-config``.
    ``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's status is asked
    of the SuperLink before it stops: a run that did not finish as completed returns flwr's
    non-zero code or 1, and its reason is printed last (lines starting ``[run] FAILED``).
    """
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    cmd = ["flwr", "run", str(app_dir), CONNECTION, "--stream",
           "--federation-config", federation]
    for overrides in run_config_args([run_config] if isinstance(run_config, str) else run_config):
        cmd += ["--run-config", overrides]
    with simulation_superlink(flwr_home) as env:
        code = subprocess.run(cmd, env=env, cwd=app_dir, timeout=timeout).returncode
        lines = failure_lines(code, last_run_status(env, CONNECTION))
    sys.stdout.flush()
    for line in lines:
        print(f"[run] {line}", flush=True)
    return (code or 1) if lines else 0
