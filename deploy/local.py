"""A Flower deployment on loopback: SuperLink (TLS + SuperNode auth), N SuperNodes, ``flwr run``.

``python -m deploy.local`` does, in order (each process is our child, in its own session):

1. writes a CA, a SuperLink certificate and one key pair per SuperNode (``deploy.certificates``)
   unless ``--certs`` points at existing ones;
2. starts ``flower-superlink`` with ``--ssl-*`` and ``--enable-supernode-auth`` on a free port;
3. registers each SuperNode's public key with ``flwr supernode register`` (Control API);
4. starts N ``flower-supernode`` with ``--node-config "partition-id=i num-partitions=N"``;
5. runs ``flwr run <app> deploy --stream`` (``deploy``: the SuperLink connection written to
   the CLI's ``$FLWR_HOME/config.toml``) and waits for it;
6. stops every process it started, by PID (the process and its descendants).

Everything goes under ``--run-dir``: ``logs/<name>.log``, ``pids/<name>.pid``, one
``FLWR_HOME`` per process (``superlink/``, ``supernode-<i>/``, ``cli/``), ``certs/`` and
``results/`` (the run's ``output.dir``). Each SuperNode keeps its privacy ledger in its own
``FLWR_HOME`` (``supernode-<i>/privacy-ledger.json``, :mod:`client.ledger`), so that its ε
counts every run it serves; ``--per-run-budget`` opts every node out (ε restarts each run).
``--insecure`` runs the same without TLS and auth. ``--keep-running`` leaves the deployment up;
``--stop`` stops one by its PID files.

Started again on the same ``--run-dir``, it reuses the certificates, the SuperLink's database
and the keys registered in it (a key already registered is left as it is), and the SuperNodes'
ledgers. It refuses up front (exit 2, the reason last) when the folder holds a deployment that
is still running or certificates that do not fit together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.supercore.error import ApiErrorCode

from common.run_config import run_config_args
from deploy import certificates as certs_mod
from deploy.processes import (
    failure_lines,
    flower_env,
    free_port,
    last_run_status,
    sigterm_raises_exit,
    stop_from_pid_files,
    stop_process_trees,
    tee,
    wait_for_port,
)
from deploy.reuse import reuse_refusal
from server.preflight import refusal

CONNECTION = "deploy"  # SuperLink connection name in the CLI's config.toml: `flwr run . deploy`
ROOT = Path(__file__).resolve().parent.parent
# client.ledger.PER_RUN_BUDGET_KEY, spelled out so that this launcher does not import torch before
# its checks (tests/test_deployment.py checks that they agree)
PER_RUN_BUDGET_KEY = "privacy-per-run-budget"
# what the SuperLink answers `flwr supernode register` for a key its database already holds
KEY_IN_USE = f"[code: {ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE.value}]"


@dataclass
class LocalDeployment:
    """A SuperLink and its SuperNodes on loopback, all children of this process.

    ``certs``: folder written by :mod:`deploy.certificates` (TLS + SuperNode authentication);
    ``None``: insecure (no TLS, any SuperNode may connect).
    """

    run_dir: Path
    certs: Path | None = None
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    failure: list[str] = field(default_factory=list)  # why the last run_app failed

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        for sub in ("logs", "pids", "cli"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        """SuperLink address (Fleet, Control and Runtime APIs share one HTTPS port)."""
        return f"127.0.0.1:{self.port}"

    def log(self, name: str) -> Path:
        """Log file of process ``name``."""
        return self.run_dir / "logs" / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        home = self.run_dir / name
        home.mkdir(exist_ok=True)
        with self.log(name).open("w") as log:
            proc = subprocess.Popen(cmd, env=flower_env(home), cwd=home, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        (self.run_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def start_superlink(self) -> None:
        """Start the SuperLink; write the CLI's connection ``deploy`` to it."""
        if self.certs is None:
            security = ["--insecure"]
            connection = "insecure = true\n"
        else:
            c = self.certs.resolve()
            security = ["--ssl-ca-certfile", str(c / certs_mod.CA_CERT),
                        "--ssl-certfile", str(c / certs_mod.SERVER_CERT),
                        "--ssl-keyfile", str(c / certs_mod.SERVER_KEY), "--enable-supernode-auth"]
            connection = f'root-certificates = "{c / certs_mod.CA_CERT}"\n'
        proc = self._spawn("superlink", [
            "flower-superlink", *security, "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.run_dir / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation"])
        (self.run_dir / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{connection}')
        wait_for_port(self.port, proc, self.log("superlink"))

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment (connection ``deploy``)."""
        return subprocess.run(["flwr", *args], env=flower_env(self.run_dir / "cli"),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def register(self, public_key: Path) -> int | None:
        """``flwr supernode register <key> deploy``: the new node ID, or None if already there.

        A deployment started again on its run dir finds its keys in the SuperLink's database;
        the SuperLink answers Flower's error ``PUBLIC_KEY_ALREADY_IN_USE`` and the key stays
        registered as it was. Any other failure raises RuntimeError with the CLI's output.
        """
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            answer = json.loads(done.stdout)
            if answer.get("success"):
                return int(answer["node-id"])
            if KEY_IN_USE in str(answer.get("error-message", "")):
                return None
        raise RuntimeError(f"registering {public_key} failed:\n{done.stdout}{done.stderr}")

    def online_nodes(self) -> int:
        """Number of SuperNodes the SuperLink sees online."""
        done = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        with contextlib.suppress(ValueError, KeyError):
            return sum(n["status"] == "online" for n in json.loads(done.stdout)["nodes"])
        return 0

    def start_supernode(self, name: str, *, node_config: str, key: Path | None = None,
                        max_retries: int | None = None) -> subprocess.Popen:
        """Start a SuperNode; ``key``: its private key (required when auth is on)."""
        cmd = ["flower-supernode", "--superlink", self.address, "--host", "127.0.0.1",
               "--port", str(free_port()), "--node-config", node_config]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.certs.resolve() / certs_mod.CA_CERT)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self._spawn(name, cmd)

    def wait_for_nodes(self, count: int, names: Iterable[str] = (),
                       timeout: float = 90.0) -> None:
        """Block until ``count`` SuperNodes are online; raise if one of ``names`` exits first."""
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            for name in ["superlink", *names]:
                proc = self.processes[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}; "
                                       f"see {self.log(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def run_app(self, app_dir: Path, run_config: Sequence[str] = (), *,
                timeout: float | None = None, echo: bool = False) -> int:
        """``flwr run <app_dir> deploy --stream``; 0 only if the run completed (flwr-run.log).

        Past ``timeout`` seconds the command is killed and 124 is returned. ``flwr run`` exits
        0 even when the ServerApp raised, so the SuperLink is asked for the run's status: a run
        that did not complete returns flwr's non-zero code or 1, and its reason (lines starting
        ``[run] FAILED``) is logged last and kept in ``self.failure``.
        """
        cmd = ["flwr", "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        for overrides in run_config_args(run_config):
            cmd += ["--run-config", overrides]
        with self.log("flwr-run").open("w") as log:
            proc = subprocess.Popen(cmd, env=flower_env(self.run_dir / "cli"), cwd=app_dir,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            copier = threading.Thread(target=tee, args=(proc.stdout, log, echo), daemon=True)
            copier.start()
            code = 124
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:  # also on Ctrl-C: never leave the CLI behind
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                copier.join(timeout=10)
            lines = failure_lines(code, last_run_status(flower_env(self.run_dir / "cli"),
                                                        CONNECTION))
            self.failure = [f"[run] {line}" for line in lines]
            log.writelines(f"{line}\n" for line in self.failure)
            return (code or 1) if lines else 0

    def stop(self) -> None:
        """Stop every process started here by PID: SuperNodes (together), then the SuperLink."""
        nodes = [p for name, p in self.processes.items() if name != "superlink"]
        stop_process_trees(p.pid for p in nodes)
        if "superlink" in self.processes:
            stop_process_trees([self.processes["superlink"].pid])
        for name, proc in self.processes.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            (self.run_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
        self.processes.clear()


@contextlib.contextmanager
def local_deployment(run_dir: Path, certs: Path | None = None) -> Iterator[LocalDeployment]:
    """A running SuperLink for the duration of the block; everything stopped on exit."""
    deployment = LocalDeployment(Path(run_dir), certs)
    try:
        deployment.start_superlink()
        yield deployment
    finally:
        deployment.stop()


def start_supernodes(deployment: LocalDeployment, count: int, *, per_run_budget: bool = False,
                     wait: bool = True) -> list[str]:
    """Register (when auth is on) and start ``count`` SuperNodes, partition i of ``count``.

    Each keeps its privacy ledger in its own FLWR_HOME (``<run dir>/supernode-<i>``);
    ``per_run_budget`` gives every node ``privacy-per-run-budget=true`` instead (its ε starts
    again from 0 in every run). ``wait``: block until all are online. Returns their names.
    """
    names = [f"supernode-{i}" for i in range(count)]
    for i, name in enumerate(names):
        node_config = f"partition-id={i} num-partitions={count}"
        if per_run_budget:
            node_config += f" {PER_RUN_BUDGET_KEY}=true"
        key = None
        if deployment.certs is not None:
            key, public = certs_mod.supernode_key_paths(deployment.certs, i)
            deployment.register(public)
        deployment.start_supernode(name, node_config=node_config, key=key)
    if wait:
        deployment.wait_for_nodes(count, names)
    return names


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.local``."""
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "results" / "deploy-local",
                        help="logs, PIDs, FLWR_HOMEs, certificates and results")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--certs", type=Path, default=None,
                        help="existing deploy.certificates folder (default: write one into "
                             "RUN_DIR/certs)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth")
    parser.add_argument("--run-config", action="append", default=[],
                        help="'k1=v1 k2=v2' overrides passed to flwr run; may be repeated")
    parser.add_argument("--per-run-budget", action="store_true",
                        help="every SuperNode keeps its privacy ledger for one run only: its ε "
                             "starts again from 0 in every run (default: a ledger in each "
                             "SuperNode's FLWR_HOME counts every run)")
    parser.add_argument("--app", type=Path, default=ROOT, help="the Flower app to run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for flwr run")
    parser.add_argument("--keep-running", action="store_true",
                        help="start everything, skip flwr run, leave it up (stop with --stop)")
    parser.add_argument("--stop", action="store_true",
                        help="stop the deployment in RUN_DIR by its PID files, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 completed, 2 refused before starting, else the run failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.stop:
        print("stopped:", ", ".join(stop_from_pid_files(args.run_dir)) or "nothing")
        return 0
    if args.supernodes < 1:
        parser.error("--supernodes must be >= 1")
    run_config = [f"output.dir={json.dumps(str(args.run_dir.resolve() / 'results'))}",
                  *args.run_config]
    if not args.keep_running and (why := refusal(args.app, run_config,
                                                 num_partitions=args.supernodes)):
        print(why, file=sys.stderr)
        return 2
    certs = None
    if not args.insecure:
        certs = args.certs or args.run_dir / "certs"
        if args.certs is None and not (certs / certs_mod.CA_CERT).exists():
            certs_mod.write_all(certs, sans=certs_mod.DEFAULT_SANS, supernodes=args.supernodes)
    if why := reuse_refusal(args.run_dir.resolve(), certs, args.supernodes):
        print(why, file=sys.stderr)
        return 2
    if args.per_run_budget:
        print(f"WARNING: --per-run-budget: every SuperNode gets {PER_RUN_BUDGET_KEY}=true, so "
              "its ε starts again from 0 in every run and after every restart, on the same data",
              file=sys.stderr)
    deployment = LocalDeployment(args.run_dir, certs)
    with sigterm_raises_exit():  # a `kill` of this launcher still stops what it started
        try:
            deployment.start_superlink()
            start_supernodes(deployment, args.supernodes, per_run_budget=args.per_run_budget)
            if args.keep_running:
                print(f"SuperLink {deployment.address} and {args.supernodes} SuperNodes running; "
                      f"FLWR_HOME={deployment.run_dir / 'cli'} flwr run . {CONNECTION}; stop with: "
                      f"python -m deploy.local --stop --run-dir {args.run_dir}")
                deployment.processes.clear()  # hand them over to the PID files
                return 0
            code = deployment.run_app(args.app, run_config, timeout=args.timeout, echo=True)
            print(f"logs and results in {deployment.run_dir}")
            print("\n".join(deployment.failure) or "[run] completed", flush=True)
            return code
        finally:
            deployment.stop()


if __name__ == "__main__":
    sys.exit(main())
