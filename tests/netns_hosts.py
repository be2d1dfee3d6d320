"""Hosts on one machine: Linux network namespaces joined by emulated links (tests only).

One :class:`Network` is a SuperLink namespace and one namespace per SuperNode. Node i's ``eth0``
(``10.77.0.<10+i>/24``) reaches the SuperLink namespace's bridge ``br0`` (``10.77.0.1/24``)
over a link of its own that delays every frame and drops some (:class:`LinkEmulation`):

- with ``sch_netem`` in the kernel, a veth pair ``eth0`` ⇄ ``p<i>`` with ``netem`` on both ends;
- without it, a *wire*: two veth pairs ``eth0`` ⇄ ``n<i>`` and ``s<i>`` ⇄ ``p<i>`` and, in a
  namespace of its own, a process (:class:`tests.netns_wire.Wire`) that copies Ethernet
  frames between ``n<i>`` and ``s<i>`` with ``AF_PACKET`` raw sockets, holding each one
  ``delay`` seconds and dropping it with probability ``loss``. The endpoints send finished
  frames (checksums and segmentation in software, see :func:`_plain_frames`), so the copies
  are valid as they are and a dropped frame is one packet.

:meth:`Network.cut` sets one link's loss to 100 % (and back) while everything runs. Processes
started with :meth:`Network.popen` run inside a namespace and are stopped, with their
descendants and anything else left in the namespaces, by :meth:`Network.down`, which then
deletes the namespaces (their veths go with them). Namespace names carry this process' PID;
:func:`remove_stale` deletes those of dead test processes.

The wire process is ``python tests/netns_wire.py CONFIG_JSON`` (:mod:`tests.netns_wire`).
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from deploy.processes import flower_env, stop_process_trees

WIRE_SCRIPT = Path(__file__).resolve().with_name("netns_wire.py")
PREFIX = "fsvdnet"  # every namespace of ours is PREFIX-<pid of the test process>-<n>-<role>
SUBNET = "10.77.0"
SUPERLINK_IP = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
_COUNTER = itertools.count()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def node_ip(index: int) -> str:
    """Address of SuperNode ``index``'s namespace."""
    return f"{SUBNET}.{10 + index}"


@dataclass(frozen=True)
class LinkEmulation:
    """What each link does to a frame, in each direction (so a round trip takes 2 × delay)."""

    delay: float = 0.025  # seconds, one way: a TCP connect or ping takes 50 ms
    loss: float = 0.01  # probability that a frame is dropped, each way

    def netem(self, loss: float | None = None) -> list[str]:
        """``tc`` arguments of the same emulation by ``sch_netem``."""
        lost = self.loss if loss is None else loss
        return ["netem", "delay", f"{self.delay * 1000:g}ms", "loss", f"{lost * 100:g}%"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; raise with its error output if it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why this process cannot make network namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    name = f"{PREFIX}-{os.getpid()}-probe"
    done = ip("netns", "add", name, check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return None


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (probed once, in a throwaway namespace)."""
    if shutil.which("tc") is None:
        return False
    name = f"{PREFIX}-{os.getpid()}-netem"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "d0", "type", "dummy")
        done = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "d0",
                               "root", *LinkEmulation().netem()], capture_output=True,
                              timeout=30, check=False)
        return done.returncode == 0
    except RuntimeError:
        return False
    finally:
        ip("netns", "del", name, check=False)


def in_netns(namespace: str, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` in a thread that has entered network namespace ``namespace``.

    A network namespace belongs to a thread (``setns(2)``), so sockets the thread opens, and
    ``/proc/sys/net`` as it reads it, are the namespace's; the rest of the process is not
    moved. Raises what ``fn`` raised, or TimeoutError.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{namespace}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)  # exits with its namespace
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {namespace}: over {timeout} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _ethtool_off(ifname: str) -> None:
    """Turn off TX checksumming, TSO and GSO of ``ifname`` (ethtool's legacy ioctls)."""
    siocethtool, set_txcsum, set_tso, set_gso = 0x8946, 0x17, 0x1F, 0x24
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in (set_txcsum, set_tso, set_gso):
            value = array.array("I", [cmd, 0])  # struct ethtool_value {cmd, data}
            fcntl.ioctl(s, siocethtool, struct.pack("16sP", ifname.encode(),
                                                    value.buffer_info()[0]))


def _plain_frames(interfaces: Sequence[str]) -> None:
    """Make ``interfaces`` send finished frames, and this namespace speak IPv4 only.

    A veth hands its peer the sender's buffer as it is: a 64 kB TCP segment to be cut up later
    (TSO/GSO), with a checksum left for hardware to fill in. A frame the wire copies with a raw
    socket loses those marks, so the receiver would drop it; with the offloads off the kernel
    finishes every frame before it leaves. No IPv6: its router and neighbour solicitations
    are noise on the links.
    """
    Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").write_text("1\n")
    Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").write_text("1\n")
    for ifname in interfaces:
        _ethtool_off(ifname)


class Network:
    """A SuperLink namespace and ``nodes`` SuperNode namespaces, each on an emulated link."""

    def __init__(self, workdir: Path, nodes: int, emulation: LinkEmulation = LinkEmulation(),
                 *, kind: str | None = None) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_COUNTER)}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.emulation = emulation
        self.kind = kind or ("netem" if netem_available() else "wire")
        self.superlink_ns = f"{self.tag}-sl"
        self.node_ns = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.wire_ns = f"{self.tag}-wire"
        self.processes: list[subprocess.Popen] = []
        self.cut_links: set[int] = set()
        self.made: list[str] = []  # namespaces created, deleted by down()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this network (the wire's only with the wire)."""
        return [self.superlink_ns, *self.node_ns, *([self.wire_ns] if self.kind == "wire"
                                                     else [])]

    def up(self) -> Network:
        """Make the namespaces, links and bridge; start the wire (if no netem)."""
        for ns in self.namespaces:
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        link = self.superlink_ns
        ip("-n", link, "link", "add", "br0", "type", "bridge")
        ip("-n", link, "addr", "add", f"{SUPERLINK_IP}/24", "dev", "br0")
        ports = []
        for i, ns in enumerate(self.node_ns):
            port = f"p{i}"
            if self.kind == "netem":
                ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                   "netns", link)
            else:  # eth0 ⇄ n<i> ... wire ... s<i> ⇄ p<i>
                ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"n{i}",
                   "netns", self.wire_ns)
                ip("link", "add", port, "netns", link, "type", "veth", "peer", "name", f"s{i}",
                   "netns", self.wire_ns)
            ip("-n", link, "link", "set", port, "master", "br0")
            ip("-n", ns, "addr", "add", f"{node_ip(i)}/24", "dev", "eth0")
            in_netns(ns, _plain_frames, ["eth0"])
            ports.append(port)
        in_netns(link, _plain_frames, ports)
        for i, ns in enumerate(self.node_ns):
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", link, "link", "set", f"p{i}", "up")
        ip("-n", link, "link", "set", "br0", "up")
        if self.kind == "netem":
            for i, ns in enumerate(self.node_ns):
                self._netem(ns, "eth0", "add")
                self._netem(link, f"p{i}", "add")
        else:
            self._start_wire()
        return self

    def _netem(self, ns: str, dev: str, action: str, loss: float | None = None) -> None:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", action, "dev", dev, "root",
                        *self.emulation.netem(loss)], check=True, capture_output=True,
                       timeout=30)

    def _start_wire(self) -> None:
        interfaces = [name for i in range(len(self.node_ns)) for name in (f"n{i}", f"s{i}")]
        for name in interfaces:
            ip("-n", self.wire_ns, "link", "set", name, "up")
        in_netns(self.wire_ns, _plain_frames, [])
        config = {"pairs": [[f"n{i}", f"s{i}"] for i in range(len(self.node_ns))],
                  "delay": self.emulation.delay, "loss": self.emulation.loss,
                  "control": str(self.workdir / "wire-control.json"),
                  "stats": str(self.workdir / "wire-stats.json")}
        Path(config["control"]).write_text(json.dumps({"generation": 0, "cut": []}))
        with (self.workdir / "wire.log").open("w") as log:
            self.wire = self.popen(self.wire_ns, [sys.executable, str(WIRE_SCRIPT),
                                                  json.dumps(config)],
                                   stdout=log, stderr=subprocess.STDOUT)
        self._wait_wire_generation(0)

    def popen(self, namespace: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` inside ``namespace`` (in a session of its own); stopped by down()."""
        proc = subprocess.Popen(["ip", "netns", "exec", namespace, *cmd],
                                start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def cut(self, index: int, cut: bool = True) -> None:
        """Drop every frame of node ``index``'s link (``cut``), or go back to the emulation."""
        self.cut_links = (self.cut_links | {index}) if cut else (self.cut_links - {index})
        if self.kind == "netem":
            loss = 1.0 if cut else None
            self._netem(self.node_ns[index], "eth0", "change", loss)
            self._netem(self.superlink_ns, f"p{index}", "change", loss)
            return
        control = self.workdir / "wire-control.json"
        generation = json.loads(control.read_text())["generation"] + 1
        tmp = control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generation": generation, "cut": sorted(self.cut_links)}))
        tmp.replace(control)
        self._wait_wire_generation(generation)

    def _wait_wire_generation(self, generation: int, timeout: float = 15.0) -> None:
        """Block until the wire has applied control ``generation`` (it says so in its stats)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.wire.poll() is not None:
                raise RuntimeError(f"the wire exited ({self.wire.returncode}); see "
                                   f"{self.workdir / 'wire.log'}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                if self.wire_stats()["generation"] >= generation:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"the wire did not apply control generation {generation}")

    def wire_stats(self) -> dict:
        """The wire's counters: ``forwarded`` and ``dropped`` frames, ``generation`` applied."""
        return json.loads((self.workdir / "wire-stats.json").read_text())

    def leftovers(self) -> list[int]:
        """PIDs of processes still inside any of our namespaces."""
        pids: list[int] = []
        for ns in self.made:
            done = ip("netns", "pids", ns, check=False)
            pids += [int(p) for p in done.stdout.split()]
        return pids

    def down(self) -> None:
        """Stop every process started here (trees, by PID), then anything left inside; delete."""
        stop_process_trees(p.pid for p in self.processes)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _kill_pids(self.leftovers())  # orphans of ours that left their tree
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made.clear()


def _kill_pids(pids: Sequence[int]) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
            procs[-1].kill()
    psutil.wait_procs(procs, timeout=5)


def remove_stale() -> list[str]:
    """Delete our namespaces whose test process is gone (a crashed run); return their names."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or psutil.pid_exists(int(parts[1])):
            continue
        _kill_pids([int(p) for p in ip("netns", "pids", name, check=False).stdout.split()])
        ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


# --- Flower in the namespaces -----------------------------------------------------------------

class Deployment:
    """A SuperLink (TLS + SuperNode authentication) and SuperNodes on a :class:`Network`.

    Like :class:`deploy.local.LocalDeployment`, with every process in a namespace: the
    SuperLink (and the ``flwr`` CLI, over loopback) in ``net.superlink_ns`` listening on
    ``0.0.0.0:port``, SuperNode i in ``net.node_ns[i]`` reaching it at
    ``SUPERLINK_IP:port``. Each process has its own ``FLWR_HOME`` under ``run_dir`` and logs to
    ``run_dir/logs/<name>.<start>.log`` (``start``: 0, then 1 after a restart, ...).
    """

    CONNECTION = "netns"

    def __init__(self, net: Network, run_dir: Path, certs: Path, port: int = 9093) -> None:
        self.net, self.run_dir, self.certs, self.port = net, Path(run_dir), Path(certs), port
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: collections.Counter[str] = collections.Counter()
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "cli").mkdir(exist_ok=True)
        (self.run_dir / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{self.certs / CA_CERT}"\n')

    def logs(self, name: str) -> list[Path]:
        """The log files of process ``name``, first start first."""
        return [self.run_dir / "logs" / f"{name}.{k}.log" for k in range(self.starts[name])]

    def spawn(self, name: str, namespace: str, cmd: Sequence[str], home: str | None = None
              ) -> subprocess.Popen:
        """Start ``cmd`` as process ``name`` in ``namespace``; FLWR_HOME ``run_dir/home``.

        ``home`` defaults to ``name``: each process has its own.
        """
        home_dir = self.run_dir / (home or name)
        home_dir.mkdir(exist_ok=True)
        log_path = self.run_dir / "logs" / f"{name}.{self.starts[name]}.log"
        self.starts[name] += 1
        proc = self.net.popen(namespace, cmd, env=flower_env(home_dir), cwd=home_dir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_timestamped, args=(proc.stdout, log_path), daemon=True).start()
        self.procs[name] = proc
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink on its database (kept across restarts); wait for its port."""
        proc = self.spawn("superlink", self.net.superlink_ns, [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs / CA_CERT),
            "--ssl-certfile", str(self.certs / SERVER_CERT),
            "--ssl-keyfile", str(self.certs / SERVER_KEY), "--enable-supernode-auth",
            "--host", "0.0.0.0", "--port", str(self.port),
            "--database", str(self.run_dir / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + timeout
        while not in_netns(self.net.superlink_ns, _port_open, "127.0.0.1", self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not open port {self.port} (exit "
                                   f"{proc.poll()}); see {self.logs('superlink')[-1]}")
            time.sleep(0.2)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI in the SuperLink's namespace, connection ``netns``."""
        return subprocess.run(["ip", "netns", "exec", self.net.superlink_ns, "flwr", *args],
                              env=flower_env(self.run_dir / "cli"), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def flwr_json(self, *args: str) -> dict:
        """``flwr ARGS netns --format json``, parsed ({} when it printed no JSON)."""
        done = self.flwr(*args, self.CONNECTION, "--format", "json")
        try:
            return json.loads(done.stdout)
        except ValueError:
            return {}

    def register(self, public_keys: Sequence[Path]) -> list[int]:
        """Register SuperNodes' public keys (all at once); return their node ids."""
        with concurrent.futures.ThreadPoolExecutor(len(public_keys)) as pool:
            replies = list(pool.map(lambda key: self.flwr_json("supernode", "register",
                                                               str(key)), public_keys))
        if bad := [f"{key}: {r}" for key, r in zip(public_keys, replies, strict=True)
                   if "node-id" not in r]:
            raise RuntimeError(f"registering failed: {bad}")
        return [int(r["node-id"]) for r in replies]

    def online(self) -> set[int]:
        """Node ids the SuperLink sees online."""
        return {int(n["node-id"]) for n in self.flwr_json("supernode", "ls").get("nodes", [])
                if n.get("status") == "online"}

    def runs(self) -> list[dict]:
        """The SuperLink's runs (``flwr ls``), oldest first."""
        return sorted(self.flwr_json("ls").get("runs", []),
                      key=lambda r: str(r.get("pending-at", "")))

    def start_supernode(self, index: int, key: Path, node_config: str) -> subprocess.Popen:
        """Start SuperNode ``index`` in its namespace (its Runtime API on its own loopback)."""
        return self.spawn(f"supernode-{index}", self.net.node_ns[index], [
            "flower-supernode", "--superlink", f"{SUPERLINK_IP}:{self.port}",
            "--root-certificates", str(self.certs / CA_CERT),
            "--auth-supernode-private-key", str(key), "--node-config", node_config,
            "--host", "127.0.0.1", "--port", "9094"])

    def wait_online(self, node_ids: set[int], timeout: float = 120.0) -> None:
        """Block until every one of ``node_ids`` is online; raise if a process died."""
        deadline = time.monotonic() + timeout
        while not node_ids <= self.online() or self._dead():
            dead = self._dead()
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(node_ids - self.online())} not online "
                                   f"(exited: {dead or 'none'}); see {self.run_dir / 'logs'}")
            time.sleep(1.0)

    def wait_active(self, names: Sequence[str], timeout: float = 90.0) -> None:
        """Block until each SuperNode of ``names`` logs its node id (the SuperLink let it in)."""
        deadline = time.monotonic() + timeout
        while not all(_activated(self.logs(n)[-1]) for n in names):
            if (dead := [n for n in names if self.procs[n].poll() is not None]) or (
                    time.monotonic() > deadline):
                raise RuntimeError(f"SuperNodes not activated (exited: {dead or 'none'}); "
                                   f"see {self.run_dir / 'logs'}")
            time.sleep(0.2)

    def restart_until_active(self, name: str, start: Callable[[], subprocess.Popen],
                             timeout: float = 120.0, pause: float = 3.0) -> int:
        """Start a SuperNode with ``start()`` until the SuperLink activates it; return tries.

        A SuperNode that crashed stays "online" at the SuperLink until it misses its
        heartbeats (up to 2 x 30 s), and until then the SuperLink refuses to activate its key
        again: the new process exits at once ("Failed to activate SuperNode"). This starts it
        again every ``pause`` seconds, as a supervisor would, until its log names its node id.
        """
        deadline = time.monotonic() + timeout
        for tries in itertools.count(1):
            proc = start()
            while proc.poll() is None and time.monotonic() < deadline:
                if _activated(self.logs(name)[-1]):
                    return tries
                time.sleep(0.2)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{name} was not activated within {timeout:.0f} s")
            time.sleep(pause)  # it exited (reaped by poll(): its SuperExec sees it gone)
        raise AssertionError("unreachable")

    def _dead(self) -> list[str]:
        """SuperLink and SuperNode processes that have exited."""
        return [n for n, p in self.procs.items() if n != "flwr-run" and p.poll() is not None]

    def start_run(self, app_dir: Path, run_config: str) -> subprocess.Popen:
        """``flwr run APP netns --stream --run-config ...`` in the SuperLink's namespace."""
        return self.spawn("flwr-run", self.net.superlink_ns, [
            "flwr", "run", str(app_dir), self.CONNECTION, "--stream",
            "--run-config", run_config], home="cli")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop process ``name`` and its descendants (SuperExec, apps) with ``sig``."""
        stop_process_trees([self.procs[name].pid], sig=sig)
        self.procs[name].wait(timeout=10)


def _timestamped(stream: Any, path: Path) -> None:
    """Copy ``stream`` into ``path`` line by line, each after its wall-clock time (Flower's
    own lines have none), without Flower's colour codes."""
    with path.open("w") as log:
        for raw in stream:
            line = ANSI.sub("", raw.decode(errors="replace"))
            log.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} "
                      f"{line}")
            log.flush()


def _activated(log: Path) -> bool:
    """Whether a SuperNode's log says the SuperLink activated it."""
    return log.exists() and "SuperNode ID:" in log.read_text()


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False
