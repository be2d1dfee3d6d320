"""strategy.round-timeout: no wait on the nodes outlasts it; late nodes are named and counted.

The fake federation answers through Flower's own ``send_and_receive`` pull loop (InMemoryGrid's),
so a node that never answers holds a round as it would on a SuperLink. The last test
runs a real simulation in which one client replies after the round timeout.
"""

import csv
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import contract
from common.config import AppConfig
from server.census import CensusFailed, take_census
from server.resume import CheckpointedRun
from simulations.launch.superlink import flwr_run
from strategies import FedSVD
from strategies.outcome import RoundFailed
from strategies.sampling import PartitionSampler, wait_for_nodes
from tests.test_fault_tolerance import RUN_TIMEOUT, app_with_client_app, faulty_run_config

TIMEOUT = 0.5
MODULE = "l0.query"
B_KEY = contract.lora_key(MODULE, "B")


class Federation:
    """Nodes 1..n behind Flower's own ``send_and_receive`` loop; each answers as it is told.

    ``behaviour[node]``: ``"train"`` (a valid reply), ``"hang"`` (never), ``"error"`` (its
    ClientApp raised) or ``"expired"`` (the SuperLink's error reply for an instruction whose TTL
    ran out, from the SuperLink's node id). A roll call is answered with partition node - 1, an
    evaluation with its metrics. Only the first ``connected`` nodes are connected.
    """

    pull_interval = 0.01  # InMemoryGrid's attribute

    def __init__(self, behaviour: dict[int, str], *, connected: int | None = None) -> None:
        self.behaviour = behaviour
        self.connected = len(behaviour) if connected is None else connected
        self.timeouts: list[tuple[str, float | None]] = []  # (message type, timeout) per call
        self.pushed: list[Message] = []
        self._pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.behaviour)[:self.connected]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            self.timeouts.append((messages[0].metadata.message_type, timeout))
        return InMemoryGrid.send_and_receive(self, messages, timeout=timeout)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}"  # as a grid does
            self.pushed.append(msg)
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = [self._answer(self._pending[i]) for i in message_ids if i in self._pending]
        return [r for r in replies if r is not None]

    def _answer(self, msg: Message) -> Message | None:
        how = self.behaviour[msg.metadata.dst_node_id]
        kind = msg.metadata.message_type
        if how == "hang":
            return None
        del self._pending[msg.metadata.message_id]
        if how == "error":
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "RuntimeError: boom"),
                           reply_to=msg)
        if how == "expired":
            reply = Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, "expired"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as the SuperLink's
            return reply
        if kind == MessageType.QUERY:
            metrics = {contract.PARTITION_ID: msg.metadata.dst_node_id - 1}
            return Message(RecordDict({contract.METRICS: MetricRecord(metrics)}), reply_to=msg)
        if kind == MessageType.EVALUATE:
            metrics = {contract.NUM_EXAMPLES: 10, contract.LOSS: 1.0}
            return Message(RecordDict({contract.METRICS: MetricRecord(metrics)}), reply_to=msg)
        return Message(_trained(msg.metadata.dst_node_id), reply_to=msg)


def _trained(node: int) -> RecordDict:
    rng = np.random.default_rng(node)
    b = (1 + 0.1 * rng.normal(size=(4, 2))).astype(np.float32)
    metrics = {contract.NUM_EXAMPLES: 10, contract.TRAIN_LOSS: 1.0, contract.EPSILON: 1.0,
               contract.NOISE_MULTIPLIER: 1.0, contract.BUDGET_EXHAUSTED: 0}
    return RecordDict({contract.ARRAYS: ArrayRecord({B_KEY: Array(b)}),
                       contract.METRICS: MetricRecord(metrics)})


def _initial() -> ArrayRecord:
    return ArrayRecord(torch_state_dict={contract.lora_key(MODULE, "A"): torch.eye(2, 3),
                                         B_KEY: torch.zeros(4, 2)})


def _strategy(**kwargs) -> FedSVD:
    settings = {"train_head": False, "round_timeout": TIMEOUT, "fraction_train": 1.0,
                "min_train_nodes": 2, "min_available_nodes": 2, "fraction_evaluate": 0.0,
                **kwargs}
    return FedSVD([MODULE], **settings)


def _start(strategy: FedSVD, grid: Federation, num_rounds: int = 1):
    run = CheckpointedRun(strategy, save=lambda server_round, arrays: None)
    return run.start(grid, _initial(), num_rounds=num_rounds, timeout=strategy.round_timeout)


def test_the_timeout_reaches_every_send_and_receive_and_every_message_ttl():
    # Prepare: seeded sampling (a roll call first) and federated evaluation
    grid = Federation({1: "train", 2: "train", 3: "train"})
    strategy = _strategy(fraction_evaluate=1.0, min_evaluate_nodes=1,
                         sampler=PartitionSampler(0, timeout=TIMEOUT))
    # Execute
    result = _start(strategy, grid, num_rounds=2)
    # Assert
    assert grid.timeouts == [("query", TIMEOUT), ("train", TIMEOUT), ("evaluate", TIMEOUT),
                             ("train", TIMEOUT), ("evaluate", TIMEOUT)]
    assert {m.metadata.ttl for m in grid.pushed} == {TIMEOUT}
    assert len(result.arrays) and strategy.training_metrics.of(2)["replies-late"] == 0


def test_a_node_that_never_answers_ends_the_round_at_the_timeout_named_and_counted(caplog):
    # Prepare
    grid = Federation({1: "train", 2: "train", 3: "hang"})
    strategy = _strategy()
    # Execute
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _start(strategy, grid)
    elapsed = time.monotonic() - began
    # Assert: the round waited out the timeout, no more; the two in time updated the adapter
    assert TIMEOUT <= elapsed < TIMEOUT + 4
    assert ("round 1: 1 node(s) sent no reply within strategy.round-timeout=0.5 s: 3; a reply "
            "that comes later is discarded") in caplog.text
    metrics = strategy.training_metrics.of(1)
    assert (metrics["replies-late"], metrics["replies-failed"], metrics["clients-trained"]) == \
        (1, 0, 2)
    assert len(result.arrays)  # updated


def test_a_node_that_never_answers_an_evaluation_is_named_and_the_others_are_averaged(caplog):
    strategy = _strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _start(strategy, Federation({1: "train", 2: "train", 3: "hang"}))
    assert caplog.text.count("round 1: 1 node(s) sent no reply within strategy.round-timeout"
                             "=0.5 s: 3") == 2  # its train and its evaluate instruction
    assert result.evaluate_metrics_clientapp[1][contract.LOSS] == 1.0


def test_the_superlinks_reply_for_an_expired_instruction_is_late_not_failed():
    # Node 3's instruction expired; the SuperLink's error reply comes from node id 1, which here
    # is also a node that trained: replies are matched by the message they answer.
    strategy = _strategy()
    _start(strategy, Federation({1: "train", 2: "train", 3: "expired"}))
    metrics = strategy.training_metrics.of(1)
    assert (metrics["replies-late"], metrics["replies-failed"], metrics["clients-trained"]) == \
        (1, 0, 2)


def test_a_short_round_is_skipped_with_its_reasons_and_the_run_goes_on(caplog):
    # Prepare: of 3 sampled, 1 valid, 1 failed, 1 late; 2 valid needed
    strategy = _strategy(short_round="skip")
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _start(strategy, Federation({1: "train", 2: "error", 3: "hang"}), num_rounds=2)
    # Assert
    assert not len(result.arrays)  # no round updated the adapter
    assert ("round 1: 1 valid trained repl(ies), fewer than strategy.min-train-nodes=2 (3 "
            "sampled: 1 failed, 1 late, 0 rejected, 0 with their privacy budget spent): no "
            "update, the global adapter is unchanged (strategy.short-round='skip')") in caplog.text
    for server_round in (1, 2):
        metrics = strategy.training_metrics.of(server_round)
        assert (metrics["clients-trained"], metrics["replies-failed"],
                metrics["replies-late"]) == (0, 1, 1)


def test_a_short_round_stops_the_run_when_so_configured():
    strategy = _strategy(short_round="fail")
    with pytest.raises(RoundFailed, match=r"^round 1: 1 valid trained repl\(ies\), fewer than "
                       r"strategy.min-train-nodes=2 \(3 sampled: 1 failed, 1 late, .*\); "
                       r"strategy.short-round='fail' stops the run"):
        _start(strategy, Federation({1: "train", 2: "error", 3: "hang"}))


def test_a_round_where_every_client_failed_or_was_late_stops_the_run_even_when_skipping():
    grid = {1: "error", 2: "hang"}
    with pytest.raises(RoundFailed, match=r"round 1: all 2 sampled client\(s\) failed, so nothing "
                       r"can be trained: Flower error reply \(code 2\): RuntimeError: boom; no "
                       r"reply within strategy.round-timeout=0.5 s \(node\(s\) 2\)"):
        _start(_strategy(short_round="skip"), Federation(grid))
    lenient = _strategy(short_round="skip", stop_on_failed_round=False)
    assert not len(_start(lenient, Federation(grid)).arrays)
    assert lenient.training_metrics.of(1)["replies-late"] == 1


@pytest.mark.parametrize("seeded", [False, True])
def test_too_few_nodes_connected_by_the_timeout_make_a_short_round(seeded, caplog):
    # Prepare: 1 of the 2 nodes needed is connected, and stays so
    grid = Federation({1: "train", 2: "train"}, connected=1)
    sampler = PartitionSampler(0, timeout=TIMEOUT) if seeded else None
    # Execute
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _start(_strategy(sampler=sampler), grid)
    elapsed = time.monotonic() - began
    # Assert: nothing was sent; the wait ended at the timeout
    assert grid.pushed == [] and TIMEOUT <= elapsed < TIMEOUT + 4
    assert ("round 1: 1 node(s) connected within strategy.round-timeout=0.5 s, 2 needed, so no "
            "client was asked: no update") in caplog.text
    with pytest.raises(RoundFailed, match="1 node.s. connected within strategy.round-timeout"):
        _start(_strategy(sampler=sampler, short_round="fail"), grid)


def test_the_wait_for_nodes_returns_once_enough_are_connected_or_at_the_timeout():
    began = time.monotonic()
    assert wait_for_nodes(Federation({7: "train", 8: "train"}), 2, 60, what="test") == [7, 8]
    assert time.monotonic() - began < 1  # no wait when they are there
    began = time.monotonic()
    assert wait_for_nodes(Federation({7: "train"}), 2, TIMEOUT, what="test") == [7]
    assert TIMEOUT <= time.monotonic() - began < TIMEOUT + 1


def _take_census(grid: Federation, folder: Path) -> dict[str, float]:
    cfg = AppConfig.from_run_config({"strategy.round-timeout": TIMEOUT,
                                     "output.dir": str(folder)})
    return take_census(grid, cfg.strategy, ["a", "b"], folder, resume=cfg.output.resume,
                       noise_multiplier=cfg.privacy.census_noise)


def test_the_census_waits_for_its_answers_no_longer_than_the_timeout(tmp_path, caplog):
    # Prepare: both nodes hang
    grid = Federation({1: "hang", 2: "hang"})
    # Execute
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(CensusFailed) as failed:
        _take_census(grid, tmp_path)
    # Assert
    assert time.monotonic() - began < TIMEOUT + 4
    assert grid.timeouts == [("query.census", TIMEOUT)]
    assert {m.metadata.ttl for m in grid.pushed} == {TIMEOUT}
    assert str(failed.value) == ("no node answered the census (2 asked): there is no prior to "
                                 "decide by (no answer within strategy.round-timeout=0.5 s)")
    assert "census: 2 node(s) sent no reply within strategy.round-timeout=0.5 s: 1, 2" \
        in caplog.text


def test_the_census_fails_when_too_few_nodes_connect_in_time(tmp_path):
    grid = Federation({1: "train", 2: "train"}, connected=1)
    began = time.monotonic()
    with pytest.raises(CensusFailed, match=r"^1 node\(s\) connected within strategy.round-timeout"
                       r"=0.5 s, strategy.min-train-nodes=2 needed for the census: start the "
                       r"SuperNodes, or raise strategy.round-timeout$"):
        _take_census(grid, tmp_path)
    assert time.monotonic() - began < TIMEOUT + 2 and grid.pushed == []


def test_a_reply_after_the_round_timeout_is_left_out_in_a_real_simulation(tiny_run_config,
                                                                          tmp_path, capfd):
    # Prepare: in round 2 partition 0 replies 5 s after the round timeout (faulty_clients.py).
    # The timeout leaves room for the first messages, which wait for the simulation's workers.
    timeout = 30
    app = app_with_client_app(tmp_path / "app", "faulty_clients:late_in_round_2")
    run_config = faulty_run_config(tiny_run_config, {
        "strategy.num-rounds": 3, "strategy.round-timeout": float(timeout),
        "output.run-name": "late", "strategy.max-norm-ratio": 0})
    # Execute
    code = flwr_run(app, run_config=run_config, num_supernodes=3, flwr_home=tmp_path / "home",
                    timeout=RUN_TIMEOUT)
    # Assert: round 2 went on with the two in time; the late reply reached no round
    assert code == 0
    folder = Path(tiny_run_config["output.dir"]) / "late"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["replies-late"]) for r in rows[1:]] == [0, 1, 0]
    assert [int(r["replies-failed"]) for r in rows[1:]] == [0, 0, 0]
    assert [int(r["clients-trained"]) for r in rows[1:]] == [3, 2, 3]
    assert "sent no reply within strategy.round-timeout=30 s" in capfd.readouterr().out
