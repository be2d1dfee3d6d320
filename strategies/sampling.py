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
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract

ROLL_CALL_TIMEOUT = 120.0  # seconds a roll call waits for the nodes' answers


class PartitionSampler:
    """Draw ``k`` partitions per round from ``(seed, round)``; map them to node ids."""

    def __init__(self, seed: int, timeout: float = ROLL_CALL_TIMEOUT) -> None:
        self.seed = seed
        self.timeout = timeout
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.silent: set[int] = set()  # asked, gave no partition id: not asked again

    def sample(self, grid: Grid, server_round: int, sample_size: int,
               min_available_nodes: int) -> list[int]:
        """Node ids of the partitions drawn for ``server_round`` (sorted by partition id).

        When fewer distinct partitions answered the roll call than are to be sampled (nodes
        whose ClientApp has no query handler), the round falls back to Flower's unseeded draw
        of node ids, with a WARNING: the run goes on, unpaired.
        """
        while len(nodes := sorted(grid.get_node_ids())) < max(min_available_nodes, sample_size):
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                len(nodes), max(min_available_nodes, sample_size))
            time.sleep(1)
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
        messages = [Message(RecordDict({contract.CONFIG: ConfigRecord({})}),
                            message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        found: dict[int, int] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            metrics = reply.content.metric_records.get(contract.METRICS, {})
            if contract.PARTITION_ID in metrics:
                found[reply.metadata.src_node_id] = int(metrics[contract.PARTITION_ID])
        if missing := sorted(set(node_ids) - set(found)):
            log(WARNING, "roll call: %d node(s) gave no partition id and are not sampled: %s",
                len(missing), missing)
        return found
