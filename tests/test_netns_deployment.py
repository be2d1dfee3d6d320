"""The app deployed over emulated links: a SuperLink and 3 SuperNodes in network namespaces.

Each scenario starts a SuperLink (TLS with its namespace's address in the certificate,
SuperNode authentication) and 3 registered SuperNodes, each in a namespace of its own behind a
link of 50 ms round trip and 1 % frame loss each way (tests/netns_hosts.py), runs the tiny
model, disturbs the deployment (cuts a link, kills a SuperNode, kills the SuperLink) and checks
the results folder, every node's ε against an accountant of its own, and that no process is
left. An undisturbed run has no scenario of its own: each of these completes its run, with
every round trained by every node once the disturbance is over. Each needs root and iproute2;
elsewhere it is skipped, saying why.

The steps a node took are counted from its SuperNode's log, not from its ledger: Flower logs
``Sending: train message`` once a ClientApp has produced a train reply, after its DP-SGD steps
(a ClientApp killed before that released nothing). No node may refuse a round here (every
row's ``clients-exhausted`` is 0), so each such line is ``train.local-steps`` steps.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from safetensors import safe_open

from client.ledger import NODE_LEDGER_FILE
from common.config import AppConfig
from common.data import load_partition
from common.run_config import override_text
from deploy import certificates
from deploy.processes import process_trees, stop_process_trees
from privacy.accounting import PrivacyLedger
from server.checkpoint import CHECKPOINT_FILE, METADATA_KEY
from tests import netns_hosts as hosts
from tests.conftest import ROOT
from tests.helpers import alive

NODES = 3
ECHO_PORT = 7000
ROUND_TIMEOUT = 45.0  # s: bounds a round that waits for a dead or cut-off node
RUN_KEYS = ("model.path", "model.max-length", "data.source", "data.text-column",
            "data.label-column", "data.max-eval-examples", "data.partitioner", "train.batch-size",
            "train.local-steps", "lora.r", "lora.alpha", "lora.train-head", "lora.head-init",
            "output.dir")
SENT_TRAIN = re.compile(r"Sending: train message")
RECEIVED_TRAIN = re.compile(r"Receiving: train message")
RUN_HEADER = re.compile(r"\[RUN (\d+)")
# Flower 1.41 and 1.42: a SuperNode whose TLS handshake times out (its link down) takes it for a
# certificate error and stops reconnecting for good; the process does not exit either (it
# waits for its Runtime API's thread), so it stays offline until it is restarted.
GAVE_UP = "SSL/TLS handshake error detected."


# --- fixtures: the network and the deployment on it ----------------------------------------

@pytest.fixture()
def network(tmp_path):
    if why := hosts.unavailable():
        pytest.skip(f"no network namespaces here: {why}")
    hosts.remove_stale()
    net = hosts.Network(tmp_path / "net", NODES)
    try:  # also when up() fails half way: down() removes what was made
        yield net.up()
    finally:
        net.down()


@pytest.fixture()
def deployment(network, tmp_path):
    certs = tmp_path / "certs"
    certificates.write_all(certs, sans=[hosts.SUPERLINK_IP], supernodes=NODES)
    dep = hosts.Deployment(network, tmp_path / "run", certs)
    dep.start_superlink()
    dep.node_ids = dep.register([certificates.supernode_key_paths(certs, i)[1]
                                 for i in range(NODES)])
    for i in range(NODES):
        start_supernode(dep, i)
    dep.wait_active([f"supernode-{i}" for i in range(NODES)])
    return dep


def start_supernode(dep: hosts.Deployment, index: int) -> subprocess.Popen:
    key, _ = certificates.supernode_key_paths(dep.certs, index)
    return dep.start_supernode(index, key, f"partition-id={index} num-partitions={NODES}")


def ledger_file(dep: hosts.Deployment, index: int) -> Path:
    """Where SuperNode ``index`` keeps its ledger by default: in its FLWR_HOME."""
    return dep.run_dir / f"supernode-{index}" / NODE_LEDGER_FILE


def run_overrides(tiny_run_config: dict, rounds: int, **extra) -> dict:
    overrides = {k: tiny_run_config[k] for k in RUN_KEYS} | {
        "strategy.num-rounds": rounds, "strategy.fraction-train": 1.0,
        "strategy.min-train-nodes": 2, "strategy.round-timeout": ROUND_TIMEOUT,
        # every node is asked every round (fraction 1.0): Flower's draw spares the seeded
        # sampler's roll call, one more ClientApp start per node (~20 s on 2 cores)
        "strategy.client-sampling": "random", "output.run-name": "netns"}
    return overrides | extra


# --- waiting and reading what happened -----------------------------------------------------

def wait_until(what: str, check: Callable[[], object], timeout: float, *,
               dep: hosts.Deployment, every: float = 0.2) -> object:
    """Poll ``check`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s; logs in {dep.run_dir / 'logs'}")
        time.sleep(every)
    return value


def count_lines(dep: hosts.Deployment, name: str, pattern: re.Pattern) -> int:
    return sum(len(pattern.findall(p.read_text())) for p in dep.logs(name) if p.exists())


def train_replies(dep: hosts.Deployment, index: int) -> list[str]:
    """The run id of every train reply SuperNode ``index`` produced, in order (all its logs)."""
    runs, run_id = [], ""
    for path in dep.logs(f"supernode-{index}"):
        for line in path.read_text().splitlines():
            if match := RUN_HEADER.search(line):
                run_id = match.group(1)
            elif SENT_TRAIN.search(line):
                runs.append(run_id)
    return runs


def checkpoint_round(folder: Path) -> int:
    """The last round the ServerApp checkpointed (-1: none yet)."""
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return -1
    with safe_open(path, framework="pt") as f:
        return int(json.loads(f.metadata()[METADATA_KEY])["round"])


def metrics_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics.csv").open()))


def sample_rate(cfg: AppConfig, index: int) -> float:
    """q = 1 / ⌈n / batch⌉ of node ``index``'s training partition, as Opacus samples it."""
    train, _ = load_partition(cfg.data, cfg.seed, index, NODES)
    return 1 / math.ceil(len(train) / cfg.train.batch_size)


def check_ledgers(dep: hosts.Deployment, cfg: AppConfig, rows: list[dict]) -> list[int]:
    """Every node's ledger file against an accountant of our own; returns each node's steps.

    The steps are counted from the node's logs (K per train reply; no node may have refused,
    rows say so); σ is the node's own, one per run; q is computed from its partition. The
    server's last round must have received the ledgers' ε.
    """
    assert all(int(r["clients-exhausted"] or 0) == 0 for r in rows[1:])
    steps_per_reply, delta = cfg.train.local_steps, cfg.privacy.delta
    totals, epsilons = [], []
    for i in range(NODES):
        replies = train_replies(dep, i)
        ledger, _ = PrivacyLedger.load(ledger_file(dep, i), cfg.privacy.accountant)
        per_step = [(sigma, q) for sigma, q, n in ledger.history for _ in range(n)]
        assert len(per_step) == steps_per_reply * len(replies), (i, replies, ledger.history)
        sigma_of_run: dict[str, float] = {}
        independent = RDPAccountant()
        for j, run_id in enumerate(replies):
            (sigma, q), = set(per_step[j * steps_per_reply:(j + 1) * steps_per_reply])
            assert sigma_of_run.setdefault(run_id, sigma) == sigma  # one σ per run
            assert q == pytest.approx(sample_rate(cfg, i), rel=1e-12)
            for _ in range(steps_per_reply):  # one accountant step per DP-SGD step taken
                independent.step(noise_multiplier=sigma, sample_rate=q)
        epsilon = independent.get_epsilon(delta) if replies else 0.0
        assert ledger.epsilon(delta) == pytest.approx(epsilon, rel=1e-9), i
        assert epsilon <= cfg.privacy.epsilon
        totals.append(len(per_step))
        epsilons.append(epsilon)
    last = rows[-1]
    if int(last["clients-trained"]) == NODES:  # every node reported its final ε
        assert float(last["epsilon-max"]) == pytest.approx(max(epsilons), rel=1e-9)
        assert float(last["epsilon-mean"]) == pytest.approx(sum(epsilons) / NODES, rel=1e-9)
    return totals


def stop_and_check_nothing_left(dep: hosts.Deployment) -> None:
    """SuperNodes, then the SuperLink, by SIGTERM; nothing of theirs may survive."""
    ours = process_trees(p.pid for p in dep.procs.values())
    stop_process_trees([p.pid for n, p in dep.procs.items() if n.startswith("supernode")])
    stop_process_trees([p.pid for n, p in dep.procs.items() if not n.startswith("supernode")])
    assert not [p for p in ours if alive(p)]  # SuperLink, SuperNodes, SuperExecs, apps
    inside = [pid for ns in [dep.net.superlink_ns, *dep.net.node_ns]
              for pid in hosts.ip("netns", "pids", ns).stdout.split()]
    assert not inside  # nor anything else in their namespaces


def wait_run(dep: hosts.Deployment, proc, timeout: float, *, revive: int | None = None
             ) -> str:
    """Wait for ``flwr run --stream`` to end; the run's status as the SuperLink says.

    ``revive``: a SuperNode to restart, as a watchdog would, whenever Flower has given up its
    connection (:data:`GAVE_UP`).
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"flwr run did not end within {timeout:.0f} s; logs in {dep.run_dir}")
        if revive is not None and GAVE_UP in dep.logs(f"supernode-{revive}")[-1].read_text():
            dep.kill(f"supernode-{revive}", signal.SIGTERM)
            dep.restart_until_active(f"supernode-{revive}",
                                     lambda: start_supernode(dep, revive))
        time.sleep(0.5)
    return dep.runs()[-1]["status"]


# --- the scenarios -------------------------------------------------------------------------

def test_netns_links_delay_and_drop_frames(network):
    # An echo server in the SuperLink's namespace, probed from node 0's: TCP connects take one
    # round trip (2 x 25 ms), UDP datagrams cross the link twice (1 - 0.99^2 = 2 % lost); a cut
    # link passes nothing, and nothing of it reaches the other links.
    server = hosts.in_netns(network.superlink_ns, EchoServer)
    try:
        rtts = hosts.in_netns(network.node_ns[0], connect_times, 21)
        lost = hosts.in_netns(network.node_ns[0], udp_round_trip_loss, 3000)
        network.cut(0)
        assert hosts.in_netns(network.node_ns[0], udp_round_trip_loss, 50, 0.5) == 1.0
        with pytest.raises(OSError):  # a timeout: no SYN gets through
            hosts.in_netns(network.node_ns[0], connect_times, 1, 1.0)
        assert len(hosts.in_netns(network.node_ns[1], connect_times, 3)) == 3
        network.cut(0, False)
        assert len(hosts.in_netns(network.node_ns[0], connect_times, 3)) == 3
    finally:
        server.close()
    rtts.sort()
    print(f"{network.kind}: TCP connect {rtts[len(rtts) // 2] * 1000:.1f} ms (median of "
          f"{len(rtts)}), UDP round-trip loss {lost:.2%}")
    assert 0.045 <= rtts[len(rtts) // 2] <= 0.080
    assert 0.008 <= lost <= 0.035
    if network.kind == "wire":
        stats = network.wire_stats()
        assert 0.005 <= stats["dropped"] / (stats["dropped"] + stats["forwarded"]) <= 0.02
        assert stats["cut-dropped"] > 0 and stats["send-errors"] == 0


class EchoServer:
    """TCP accept-and-close and UDP echo on SUPERLINK_IP, in the namespace it is made in."""

    def __init__(self) -> None:
        self.tcp = socket.create_server((hosts.SUPERLINK_IP, ECHO_PORT), backlog=64)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((hosts.SUPERLINK_IP, ECHO_PORT))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._tcp, self._udp)]
        for thread in self.threads:
            thread.start()

    def _tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.tcp.accept()[0].close()

    def _udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                data, peer = self.udp.recvfrom(64)
                self.udp.sendto(data, peer)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.tcp.close()
        self.udp.close()


def connect_times(count: int, timeout: float = 5.0) -> list[float]:
    times = []
    for _ in range(count):
        start = time.monotonic()
        socket.create_connection((hosts.SUPERLINK_IP, ECHO_PORT), timeout).close()
        times.append(time.monotonic() - start)
    return times


def udp_round_trip_loss(count: int, wait: float = 1.0) -> float:
    """Share of ``count`` numbered datagrams (sent at about 10,000/s) not echoed back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((hosts.SUPERLINK_IP, ECHO_PORT))
        sock.settimeout(0.1)
        got: set[int] = set()

        def receive(until: float) -> None:
            while time.monotonic() < until:
                with contextlib.suppress(TimeoutError):
                    got.add(int.from_bytes(sock.recv(64), "big"))

        receiver = threading.Thread(target=receive, args=(time.monotonic() + count / 1e4 + wait,))
        receiver.start()
        for i in range(count):
            sock.send(i.to_bytes(4, "big"))
            if i % 10 == 9:
                time.sleep(0.001)
        receiver.join()
    return 1 - len(got) / count


def test_netns_link_cut_for_a_round_then_restored(deployment, tiny_run_config):
    # Node 2's link drops every frame from before the run until round 1 is checkpointed. The
    # SuperLink still counts it online, so round 1 asks it and gives up on it at the round
    # timeout (its instruction expires unseen) or when the SuperLink marks it offline. With
    # min-train-nodes=3 the rounds after the restore wait for it (Flower's sampling would go on
    # without it), and a round with 2 of 3 replies is skipped: round 1, and round 2 too if the
    # node is not back in time for it (e.g. Flower gave its connection up: GAVE_UP).
    net, cut = deployment.net, 2
    overrides = run_overrides(tiny_run_config, rounds=3, **{"strategy.min-train-nodes": 3})
    cfg = AppConfig.from_run_config(tiny_run_config | overrides)
    net.cut(cut)
    proc = deployment.start_run(ROOT, override_text(overrides))
    wait_until("round 1 checkpointed", lambda: checkpoint_round(cfg.results_folder) >= 1,
               ROUND_TIMEOUT + 120, dep=deployment)
    assert count_lines(deployment, f"supernode-{cut}", RECEIVED_TRAIN) == 0
    net.cut(cut, False)
    assert wait_run(deployment, proc, 300, revive=cut) == "finished:completed"

    rows = metrics_rows(cfg.results_folder)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    trained = [int(r["clients-trained"]) for r in rows[1:]]
    assert trained[0] == 0 and trained[1] in (0, NODES) and trained[2] == NODES, trained
    assert int(rows[1]["replies-late"]) + int(rows[1]["replies-failed"]) == 1
    assert (cfg.results_folder / "adapter" / "adapter_model.safetensors").is_file()
    # the skipped rounds' steps count for the nodes that took them
    steps, local = check_ledgers(deployment, cfg, rows), cfg.train.local_steps
    assert steps[:2] == [3 * local] * 2 and steps[cut] in (local, 2 * local)  # round 3 (and 2)
    # its round-1 instruction expired unseen: it trained on every instruction it received
    assert count_lines(deployment, f"supernode-{cut}", RECEIVED_TRAIN) == steps[cut] // local
    if net.kind == "wire":
        assert net.wire_stats()["cut-dropped"] > 0
    print(f"rounds trained {trained}; node {cut} started {deployment.starts[f'supernode-{cut}']}"
          " time(s)")
    stop_and_check_nothing_left(deployment)


def test_netns_supernode_killed_mid_round_rejoins_with_its_ledger(deployment, tiny_run_config):
    # Node 1 is SIGKILLed (with its SuperExec and ClientApp) once it has received round 2's
    # instruction and before it trains (its ClientApp takes seconds to start). The SuperLink
    # refuses the restarted node until the dead one has missed its heartbeats, so it is started
    # again and again until it is let in (41-55 s after the kill here): 6 rounds, so that the
    # last ones start after that however fast the others go (round 2 waits for it no longer than
    # the round timeout; later rounds of the tiny model take 10-20 s).
    overrides = run_overrides(tiny_run_config, rounds=6)
    cfg = AppConfig.from_run_config(tiny_run_config | overrides)
    victim, name = 1, "supernode-1"
    proc = deployment.start_run(ROOT, override_text(overrides))
    wait_until("round 2's instruction received by the victim",
               lambda: count_lines(deployment, name, RECEIVED_TRAIN) >= 2, 240,
               dep=deployment, every=0.1)
    deployment.kill(name)
    assert len(train_replies(deployment, victim)) == 1  # killed before it trained round 2
    before = PrivacyLedger.load(ledger_file(deployment, victim), cfg.privacy.accountant)[0]
    tries = deployment.restart_until_active(name, lambda: start_supernode(deployment, victim))
    assert wait_run(deployment, proc, 300) == "finished:completed"

    rows = metrics_rows(cfg.results_folder)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    trained = [int(r["clients-trained"]) for r in rows[1:]]
    assert trained[:2] == [3, 2] and set(trained[2:]) <= {2, 3} and trained[-1] == 3, trained
    assert int(rows[2]["replies-late"]) + int(rows[2]["replies-failed"]) == 1
    took = float(rows[2]["wall-seconds"]) - float(rows[1]["wall-seconds"])
    assert took < ROUND_TIMEOUT + 30  # round 2 waited for the dead node no longer than that
    assert (cfg.results_folder / "adapter" / "adapter_model.safetensors").is_file()
    assert before.steps == cfg.train.local_steps  # round 1, on disk when it was killed
    steps = check_ledgers(deployment, cfg, rows)  # the restarted node went on from round 1
    rejoined = len(train_replies(deployment, victim)) - 1  # the rounds after it was let in
    assert rejoined >= 1 and steps[victim] == cfg.train.local_steps * (1 + rejoined)
    ids = {m for p in deployment.logs(name) for m in re.findall(r"SuperNode ID: (\d+)",
                                                                 p.read_text())}
    assert ids == {str(deployment.node_ids[victim])}  # its key keeps its node id
    print(f"restarted after {tries} tries; rounds trained {trained}")
    stop_and_check_nothing_left(deployment)


def test_netns_superlink_killed_mid_run_resumes_without_undercounting(deployment,
                                                                        tiny_run_config):
    # The SuperLink (with its SuperExec and ServerApp) is SIGKILLed once 2 nodes have replied in
    # round 2: round 1 is the last checkpoint, and the third node finishes its round 2 all the
    # same. Restarted on its database, the SuperLink knows the keys and the nodes reconnect
    # by themselves; `flwr run` with output.resume=true runs rounds 2 and 3. (With 2 rounds
    # the killed run would have spent the whole budget: the nodes would refuse the resumed one.)
    overrides = run_overrides(tiny_run_config, rounds=3)
    cfg = AppConfig.from_run_config(tiny_run_config | overrides)
    first = deployment.start_run(ROOT, override_text(overrides))

    def two_nodes_replied_twice() -> bool:
        return sum(len(train_replies(deployment, i)) >= 2 for i in range(NODES)) >= 2

    # Round 2 cannot be checkpointed before the third reply: the SuperLink dies mid-round 2
    wait_until("2 nodes replied in round 2", two_nodes_replied_twice, 300, dep=deployment,
               every=0.1)
    deployment.kill("superlink")  # SIGKILL: SuperLink, its SuperExec and the ServerApp
    with contextlib.suppress(subprocess.TimeoutExpired):
        first.wait(timeout=30)  # the CLI's stream ends with the SuperLink
    deployment.kill("flwr-run")  # if it did not
    assert checkpoint_round(cfg.results_folder) == 1
    deployment.start_superlink()  # on the same database
    stale = [(r["run-id"], r["status"]) for r in deployment.runs()]
    deployment.wait_online(set(deployment.node_ids))
    resumed = deployment.start_run(ROOT, override_text(overrides | {"output.resume": True}))
    assert wait_run(deployment, resumed, 300) == "finished:completed"

    rows = metrics_rows(cfg.results_folder)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert "resuming" in deployment.logs("flwr-run")[-1].read_text()
    assert (cfg.results_folder / "adapter" / "adapter_model.safetensors").is_file()
    assert [int(r["clients-trained"]) for r in rows[1:]] == [3, 3, 3]
    steps = check_ledgers(deployment, cfg, rows)  # every step, the killed round's included
    runs = [train_replies(deployment, i) for i in range(NODES)]
    killed_round = sum(r.count(runs[0][0]) - 1 for r in runs)  # run 1's replies after round 1
    assert killed_round >= 2  # the 2 nodes it waited for, maybe the third too
    # the ledgers hold more than the results show: the killed round's steps, which never
    # reached an aggregate, are spent all the same
    assert sum(steps) == cfg.train.local_steps * (3 * NODES + killed_round)
    print(f"runs after the SuperLink's restart: {stale}; replies by run: {runs}")
    stop_and_check_nothing_left(deployment)
