"""Seeded client sampling over partition ids: the same clients in the same round for every method.

Flower's ``sample_nodes`` draws node ids with Python's global ``random``. Node ids are random
per run (a simulation registers fresh ones), so even a seeded ``random`` draws different
*partitions* in two runs, and two methods compared on one seed train on different clients.
:class:`PartitionSampler` draws partition ids instead: round t trains the partitions
``numpy.random.default_rng((seed, t)).choice(sorted partition ids, k, replace=False)``. Which
node holds which partition is learned by a roll call, a QUERY message each node answers with
its node config's ``partition-id`` (:func:`client.app.query`), sent once per node id (a node
that does not answer is not sampled, and not asked again).

Client sampling is public: the server announces whom it asks. Seeding it costs no privacy (the
DP guarantee is each client's own DP-SGD, whose Poisson batches and noise stay OS-random).

Every wait on the nodes is bounded by ``strategy.round-timeout``: :func:`wait_for_nodes` for
enough of them to connect (Flower's ``sample_nodes`` waits forever), the roll call's replies, and
the TTL of each instruction (:func:`with_ttl`). :func:`split_late` names the nodes asked that
did not answer in time.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract
from common.config import StrategyConfig

# The SuperLink's error replies for an instruction whose TTL ran out before a reply came back
# (flwr.server.superlink.linkstate.utils): a late node, not a failed one.
EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
WAIT_LOG_SECONDS = 30.0  # how often a wait for nodes says how many are connected


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, *, what: str) -> list[int]:
    """The connected node ids, once ``minimum`` are connected or after ``timeout`` seconds.

    Returns fewer than ``minimum`` (with a WARNING) when they did not connect in time: the
    caller decides what that means (Flower's own wait, ``sample_nodes``, loops until they do,
    forever if they never do).
    """
    deadline = time.monotonic() + timeout
    next_log = 0.0
    while len(nodes := list(grid.get_node_ids())) < minimum:
        now = time.monotonic()
        if now >= deadline:
            log(WARNING, "%s: %d node(s) connected within strategy.round-timeout=%g s, %d "
                "needed", what, len(nodes), timeout, minimum)
            break
        if now >= next_log:
            log(INFO, "%s: waiting for nodes to connect: %d connected (minimum required: %d), "
                "for up to %.0f s more (strategy.round-timeout)", what, len(nodes), minimum,
                deadline - now)
            next_log = now + WAIT_LOG_SECONDS
        time.sleep(min(1.0, deadline - now))
    return nodes


def with_ttl(messages: list[Message], ttl: float) -> list[Message]:
    """``messages``, each to expire ``ttl`` seconds after it was made (here, the round timeout).

    In flwr 1.41 and 1.42 (``flwr.server.superlink.linkstate``) the SuperLink hands no node an
    expired instruction, so a node that comes back after its round never runs it nor spends
    privacy on it; it refuses a reply to it (a simulation logs ``Message TTL has expired`` and
    goes on); and it answers the server's next pull for it with an error reply
    (:data:`EXPIRED`). A reply already running on a node is not stopped: its privacy is spent,
    its update lost.
    """
    for message in messages:
        message.metadata.ttl = ttl
    return messages


def asked_nodes(sent: list[Message]) -> dict[str, int]:
    """The node each of ``sent`` went to, by message id (messages pushed through a grid)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def split_late(sent: list[Message], replies: list[Message]) -> tuple[list[int], list[Message]]:
    """(the node ids of ``sent`` without an answer in ``replies``, the answers).

    A reply answers the message whose id it names (``reply_to_message_id``) or, without one
    (a message never pushed through a grid), the node it comes from. The SuperLink's error
    reply for an expired instruction is no answer: it is left out of the answers.
    """
    node_of = asked_nodes(sent)
    answers, answered = [], set()
    for reply in replies:
        asked = node_of.get(reply.metadata.reply_to_message_id)
        if asked is not None and reply.has_error() and reply.error.code in EXPIRED:
            continue
        answers.append(reply)
        answered.add(reply.metadata.src_node_id if asked is None else asked)
    late = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
    return late, answers


def log_late(what: str, late: list[int], timeout: float) -> None:
    """One WARNING naming the nodes that did not reply within ``timeout`` (if any)."""
    if late:
        log(WARNING, "%s: %d node(s) sent no reply within strategy.round-timeout=%g s: %s; a "
            "reply that comes later is discarded", what, len(late), timeout,
            ", ".join(map(str, late)))


class PartitionSampler:
    """Draw ``k`` partitions per round from ``(seed, round)``; map them to node ids.

    ``timeout``: the seconds a roll call waits for the answers (``strategy.round-timeout``).
    """

    def __init__(self, seed: int, timeout: float = StrategyConfig.round_timeout) -> None:
        self.seed = seed
        self.timeout = timeout
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.silent: set[int] = set()  # asked, gave no partition id: not asked again

    def sample(self, grid: Grid, server_round: int, sample_size: int,
               nodes: list[int]) -> list[int]:
        """Node ids of the partitions drawn for ``server_round`` (sorted by partition id).

        ``nodes`` are the connected node ids, at least ``sample_size`` of them. When fewer
        distinct partitions answered the roll call than are to be sampled (nodes whose
        ClientApp has no query handler), the round falls back to Flower's unseeded draw of node
        ids, with a WARNING: the run goes on, unpaired.
        """
        nodes = sorted(nodes)
        unknown = [n for n in nodes if n not in self.partition_of and n not in self.silent]
        if unknown:
            found = self.roll_call(grid, unknown)
            self.partition_of.update(found)
            self.silent.update(set(unknown) - set(found))
        holders: dict[int, int] = {}  # partition id -> one node holding it (lowest node id)
        for node in sorted(n for n in nodes if n in self.partition_of):
            holders.setdefault(self.partition_of[node], node)
        if len(holders) < sample_size:
            log(WARNING, "round %d: %d distinct partition(s) answered the roll call, %d are to "
                "be sampled: this round's clients are drawn unseeded (Flower's draw), so runs "
                "of one seed are not paired", server_round, len(holders), sample_size)
            return random.sample(nodes, sample_size)
        rng = np.random.default_rng((self.seed, server_round))
        drawn = sorted(rng.choice(sorted(holders), size=sample_size, replace=False).tolist())
        log(INFO, "configure_train: partitions %s (seeded by seed=%d and the round)",
            ",".join(map(str, drawn)), self.seed)
        return [holders[p] for p in drawn]

    def roll_call(self, grid: Grid, node_ids: list[int]) -> dict[int, int]:
        """Ask each node its partition id; nodes that do not answer are left out (logged)."""
        messages = with_ttl([Message(RecordDict({contract.CONFIG: ConfigRecord({})}),
                                     message_type=MessageType.QUERY, dst_node_id=n)
                             for n in node_ids], self.timeout)
        found: dict[int, int] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            metrics = reply.content.metric_records.get(contract.METRICS, {})
            if contract.PARTITION_ID in metrics:
                found[reply.metadata.src_node_id] = int(metrics[contract.PARTITION_ID])
        if missing := sorted(set(node_ids) - set(found)):
            log(WARNING, "roll call: %d node(s) gave no partition id within "
                "strategy.round-timeout=%g s and are not sampled: %s", len(missing),
                self.timeout, missing)
        return found
