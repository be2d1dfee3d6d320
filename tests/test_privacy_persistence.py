"""A SuperNode's privacy ledger in a state file survives restarts (fresh Context, same file)."""

import json
import math

import pytest
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from client import training as t
from client.app import train
from client.ledger import PRIVACY_STATE_KEY, ledger_place
from common import contract
from common.config import AppConfig
from privacy import PrivacyLedger
from tests.helpers import global_arrays, train_message
from tests.test_client import NODE


def _fresh_context(run_config: dict, state_file) -> Context:
    """What a restarted SuperNode has: empty Context.state, the same node config."""
    return Context(run_id=1, node_id=1, node_config={**NODE, PRIVACY_STATE_KEY: str(state_file)},
                   state=RecordDict(), run_config=run_config)


def test_restarted_node_reports_cumulative_epsilon_and_refuses_past_budget(
        tiny_run_config, tmp_path):
    # Prepare: a budget that fits exactly three rounds.
    run_config = {**tiny_run_config, "strategy.num-rounds": 3, "privacy.epsilon": 4.0}
    cfg = AppConfig.from_run_config(run_config)
    data = t.load_local_data(cfg, 0, 2)
    arrays = global_arrays(cfg, data.num_labels)
    q = 1 / math.ceil(len(data.train) / cfg.train.batch_size)
    state_file = tmp_path / "node-0" / "privacy-state.json"
    independent = RDPAccountant()

    # Execute: every round on a "restarted" node (a fresh Context), sharing only the file.
    for _ in range(3):
        metrics = train(train_message(arrays), _fresh_context(run_config, state_file)
                        ).content[contract.METRICS]
        assert metrics[contract.BUDGET_EXHAUSTED] == 0
        for _ in range(cfg.train.local_steps):
            independent.step(noise_multiplier=metrics[contract.NOISE_MULTIPLIER], sample_rate=q)
        # Assert: ε covers the steps of earlier processes too.
        assert metrics[contract.EPSILON] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert metrics[contract.EPSILON] <= 4.0
    refused = train(train_message(arrays), _fresh_context(run_config, state_file)
                    ).content[contract.METRICS]
    assert refused[contract.BUDGET_EXHAUSTED] == 1 and refused[contract.STEPS] == 0
    assert refused[contract.EPSILON] == metrics[contract.EPSILON]

    saved = json.loads(state_file.read_text())
    assert saved["noise-multiplier"] == metrics[contract.NOISE_MULTIPLIER]
    assert sum(e["steps"] for e in saved["history"]) == 3 * cfg.train.local_steps
    assert all(e["sample-rate"] == q for e in saved["history"])
    assert sorted(p.name for p in state_file.parent.iterdir()) == [
        "privacy-state.json", "privacy-state.json.lock"]  # no temporary file left behind


def test_ledger_save_is_atomic_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    first = PrivacyLedger("rdp", [(1.1, 0.05, 10)])
    first.save(path, noise_multiplier=1.1)
    second = PrivacyLedger("rdp", [(1.1, 0.05, 10), (1.1, 0.05, 10)])

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr("privacy.accounting.os.replace", crash)
    with pytest.raises(OSError):
        second.save(path, noise_multiplier=1.1)
    assert PrivacyLedger.load(path, "rdp") == (first, 1.1)  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    monkeypatch.undo()
    second.save(path, noise_multiplier=1.1)
    assert PrivacyLedger.load(path, "prv") == (PrivacyLedger("prv", second.history), 1.1)


def test_unreadable_state_file_refuses_to_train(tiny_run_config, tmp_path):
    state_file = tmp_path / "privacy-state.json"
    state_file.write_text("{not json")
    cfg = AppConfig.from_run_config(tiny_run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    with pytest.raises(ValueError, match="unreadable"):
        train(train_message(arrays), _fresh_context(tiny_run_config, state_file))
    assert state_file.read_text() == "{not json"  # never overwritten


def test_relative_state_file_is_rejected(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    with pytest.raises(ValueError, match="absolute path"):
        train(train_message(arrays), _fresh_context(tiny_run_config, "state.json"))


def _sim_context(run_config: dict) -> Context:
    """A simulated SuperNode as a (re)started federation has it: no node file, empty state."""
    return Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(),
                   run_config=run_config)


def test_resumed_simulation_reports_the_uninterrupted_epsilon(tiny_run_config, tmp_path):
    # Prepare: the same run twice; absolute output.dir (simulations.run passes one)
    def config(name: str) -> dict:
        return {**tiny_run_config, "strategy.num-rounds": 3, "output.run-name": name,
                "output.dir": str(tmp_path / "results")}

    cfg = AppConfig.from_run_config(config("straight"))
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    straight = _sim_context(config("straight"))
    # Execute: 3 rounds in one federation; 2 rounds, a crash (the federation and its
    # Context.state are gone), then round 3 in a new federation
    eps_straight = [train(train_message(arrays), straight).content[contract.METRICS]
                    [contract.EPSILON] for _ in range(3)]
    before_crash = _sim_context(config("resumed"))
    eps_resumed = [train(train_message(arrays), before_crash).content[contract.METRICS]
                   [contract.EPSILON] for _ in range(2)]
    after_crash = _sim_context({**config("resumed"), "output.resume": True})
    eps_resumed.append(train(train_message(arrays), after_crash).content[contract.METRICS]
                       [contract.EPSILON])
    # Assert: the same ε every round, from the ledger kept in the run's folder
    assert eps_resumed == pytest.approx(eps_straight, rel=1e-12)
    assert eps_straight[0] < eps_straight[1] < eps_straight[2]
    ledger = tmp_path / "results" / "resumed" / "privacy" / "partition-0.json"
    assert sum(e["steps"] for e in json.loads(ledger.read_text())["history"]) == 3 * 2


def test_a_stale_ledger_file_never_lowers_what_the_context_counts(tiny_run_config, tmp_path):
    # Prepare: a node's rounds on two machines of a Ray cluster (each has its own disk): round
    # 1 writes the file on machine A, rounds 2 and 3 run on machine B (file copy B)
    run_config = {**tiny_run_config, "strategy.num-rounds": 4, "output.run-name": "ray",
                  "output.dir": str(tmp_path / "results")}
    cfg = AppConfig.from_run_config(run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    ledger = tmp_path / "results" / "ray" / "privacy" / "partition-0.json"
    context = _sim_context(run_config)  # the simulation engine carries it between rounds
    train(train_message(arrays), context)
    stale = ledger.read_bytes()  # machine A's copy after round 1
    eps = [train(train_message(arrays), context).content[contract.METRICS][contract.EPSILON]
           for _ in range(2)]
    # Execute: round 4 lands on machine A again, whose file only knows round 1
    ledger.write_bytes(stale)
    last = train(train_message(arrays), context).content[contract.METRICS]
    # Assert: ε goes on from the 3 rounds the context counts, not from the file's 1
    assert last[contract.EPSILON] > eps[-1]
    assert sum(e["steps"] for e in json.loads(ledger.read_text())["history"]) == \
        4 * cfg.train.local_steps


def test_with_a_relative_output_dir_the_ledger_stays_in_the_context(tiny_run_config):
    cfg = AppConfig.from_run_config({**tiny_run_config, "output.dir": "results"})
    assert ledger_place(_sim_context(tiny_run_config), cfg).path is None


def test_a_resumed_private_run_without_a_ledger_file_refuses_to_train(tiny_run_config):
    # a relative output.dir and no node state file: the steps before the crash are unknown here
    run_config = {**tiny_run_config, "output.dir": "results", "output.resume": True}
    cfg = AppConfig.from_run_config(run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    with pytest.raises(ValueError, match="cannot read the privacy ledger"):
        train(train_message(arrays), _sim_context(run_config))
    public = {**run_config, "privacy.epsilon": math.inf}  # nothing to count: trains
    metrics = train(train_message(arrays), _sim_context(public)).content[contract.METRICS]
    assert metrics[contract.STEPS] == AppConfig.from_run_config(public).train.local_steps
