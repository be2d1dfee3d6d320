"""Starting and stopping Flower processes by PID: ports, environment, process trees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, the venv's bin on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home),  # the SuperLink and SuperNodes
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # spawn flower-superexec
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Ray's FutureWarning about accelerator variables, once per Ray worker; keep the
            # current behaviour (no GPUs are asked for) without it
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@contextlib.contextmanager
def sigterm_raises_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so ``finally`` clauses run.

    Python's default SIGTERM ends the process at once, so a launcher killed by ``kill`` (or a
    job scheduler) would leave the SuperLink, SuperExec and Ray it started running. Only the
    main thread can set a handler; elsewhere the block runs unchanged. The previous handler is
    restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def process_trees(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes ``pids`` (those still there) and all their descendants."""
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    return procs


def stop_process_trees(pids: Iterable[int], timeout: float = 20.0,
                       sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` (SIGTERM) to processes and all their descendants, then SIGKILL what is left.

    SuperExec and the apps start their own sessions, so a process group does not cover them.
    """
    procs = process_trees(pids)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=timeout if sig != signal.SIGKILL else 5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def live_pid_files(run_dir: Path) -> dict[str, int]:
    """The processes of ``run_dir/pids`` that still run (Flower's only), by name: their PIDs.

    A PID file whose process is gone, or whose PID now belongs to something other than a
    ``flower-`` command (a reused PID), names no live process.
    """
    live: dict[str, int] = {}
    for pid_file in sorted((run_dir / "pids").glob("*.pid")):
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pid = int(pid_file.read_text().split()[0])
            if any("flower-" in part for part in psutil.Process(pid).cmdline()):
                live[pid_file.stem] = pid
    return live


def stop_from_pid_files(run_dir: Path) -> list[str]:
    """Stop the processes named in ``run_dir/pids`` (Flower processes only); return names."""
    stopped = live_pid_files(run_dir)
    for pid_file in (run_dir / "pids").glob("*.pid"):
        pid_file.unlink()
    stop_process_trees(pid for name, pid in stopped.items() if name != "superlink")
    stop_process_trees(pid for name, pid in stopped.items() if name == "superlink")
    return sorted(stopped)


def tee(stream: IO[str], log: IO[str], echo: bool) -> None:
    """Copy ``stream`` line by line into ``log`` (and stdout if ``echo``)."""
    for line in stream:
        log.write(line)
        if echo:
            print(line, end="", flush=True)


def wait_for_port(port: int, proc: subprocess.Popen, log: Path | None = None,
                  timeout: float = 90.0) -> None:
    """Block until something listens on loopback ``port``; raise if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    see = f"; see {log}" if log else ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}{see}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not open port {port} within {timeout:.0f} s")


@dataclass(frozen=True)
class RunStatus:
    """What the SuperLink says of a run: ``status`` as ``flwr ls`` prints it, and why."""

    run_id: str
    status: str  # "finished:completed", "finished:failed", "running", ...
    details: str = ""

    @property
    def completed(self) -> bool:
        """Whether the run finished and its ServerApp returned normally."""
        return self.status == "finished:completed"


def last_run_status(env: Mapping[str, str], connection: str) -> RunStatus | None:
    """The most recent run of the SuperLink ``connection`` (``flwr ls --format json``).

    ``flwr run --stream`` exits 0 even when the ServerApp raised; the run's status is the
    only record of the outcome. None when the SuperLink lists no run or cannot be asked.
    """
    try:
        done = subprocess.run(["flwr", "ls", connection, "--format", "json"], env=dict(env),
                              capture_output=True, text=True, timeout=60, check=False)
        runs = json.loads(done.stdout)["runs"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    if not runs:
        return None
    last = max(runs, key=lambda r: str(r.get("pending-at", "")))
    return RunStatus(str(last.get("run-id", "")), str(last.get("status", "")),
                     str(last.get("status-details", "")))


def failure_lines(code: int, status: RunStatus | None) -> list[str]:
    """The last lines a launcher prints when a run did not complete; [] when it did."""
    if code == 0 and status is not None and status.completed:
        return []
    if status is None:
        return [f"FAILED: flwr run exited with {code} and the SuperLink reports no run"]
    why = status.details.strip() or "no reason given; see the log above"
    return [f"FAILED: run {status.run_id} {status.status} (flwr run exited with {code})",
            *why.splitlines()]
