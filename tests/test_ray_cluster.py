"""A simulation spread over a Ray cluster: a head and one worker on loopback, clients on both.

The cluster is two ``ray start --block`` processes, each in its own session with a temporary
``--temp-dir``; every process of those two sessions is killed by PID at the end (never
``ray stop``, which would stop every Ray on the machine, other simulations' too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common.run_config import override_text
from deploy.processes import free_port
from tests.test_end_to_end import TINY_KEYS

CLUSTER_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _ray(*args: str, temp_dir: Path) -> subprocess.Popen:
    """``ray start --block`` with one CPU on loopback, in a session of its own."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", *args, "--num-cpus", "1",
         "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir), "--block",
         "--disable-usage-stats"],
        env=CLUSTER_ENV, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def _in_cluster(address: str, code: str) -> str:
    """Run ``code`` in a fresh Python connected to the cluster; its standard output."""
    prelude = f"import ray\nray.init(address={address!r}, logging_level='ERROR')\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], env=CLUSTER_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _sessions_processes(sessions: set[int]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _stop(sessions: set[int], temp_dir: Path) -> list[str]:
    """Kill every process of ``sessions`` by PID; return those of ``temp_dir`` still alive."""
    deadline = time.monotonic() + 30
    while (procs := _sessions_processes(sessions)) and time.monotonic() < deadline:
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
            left.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:120]}")
    return left


def test_a_simulation_joins_a_ray_cluster_and_runs_clients_on_both_nodes(tiny_run_config,
                                                                         tmp_path):
    from simulations import run as sim_run

    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = _ray("--head", "--port", str(port), "--include-dashboard", "false",
                temp_dir=temp_dir)
    sessions = {head.pid}
    try:
        deadline = time.monotonic() + 60
        while True:  # the head answers before the worker can join it
            try:
                _in_cluster(address, "print(len(ray.nodes()))")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        worker = _ray("--address", address, temp_dir=temp_dir)
        sessions.add(worker.pid)
        nodes = "print(sum(n['Alive'] for n in ray.nodes()))"
        while _in_cluster(address, nodes) != "2":
            assert time.monotonic() < deadline + 60, "the worker never joined the head"
            time.sleep(2)

        overrides = {k: tiny_run_config[k] for k in TINY_KEYS}
        code = sim_run.main(["--run-config", override_text({**overrides, "output.run-name": "ray"}),
                             "--num-supernodes", "2", "--ray-address", address,
                             "--results-dir", str(tmp_path / "results")])
        assert code == 0
        assert (tmp_path / "results" / "ray" / "metrics.csv").is_file()
        # Every ClientApp actor of the run, alive or not, and the node it ran on (the GCS actor
        # table: the public state API needs the dashboard, which this cluster does not run)
        placed = _in_cluster(address, (
            "from ray._private import state\n"
            "print(sorted({a['Address']['NodeID'] for a in state.actors().values()"
            " if a['ActorClassName'] == 'ClientAppActor'}))"))
        assert len(eval(placed)) == 2, placed  # noqa: S307 (our own printout)
    finally:
        left = _stop(sessions, temp_dir)
    assert not left, f"still running after the test: {left}"
