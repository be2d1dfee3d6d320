"""A SuperNode's privacy ledger spans every run it serves; simulations keep one per run."""

import json
import logging
import math
import sys
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client import ledger as node_ledger
from client import training as t
from client.app import census, train
from common import contract
from common.config import AppConfig
from privacy import PrivacyLedger
from privacy.accounting import calibrate_noise, epsilon_of
from privacy.census import census_entry
from tests.helpers import global_arrays, train_message
from tests.test_client import NODE


def _context(run_config: dict, run_id: int, **node_config) -> Context:
    """A node's context in run ``run_id``, as a fresh (or restarted) SuperNode has it."""
    return Context(run_id=run_id, node_id=1, node_config={**NODE, **node_config},
                   state=RecordDict(), run_config=run_config)


def _train(run_config: dict, context: Context):
    cfg = AppConfig.from_run_config(run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    return train(train_message(arrays), context).content[contract.METRICS]


def _census_message() -> Message:
    return Message(RecordDict({contract.CONFIG: ConfigRecord({})}), dst_node_id=1,
                   message_type="query.census")


def _q(cfg: AppConfig) -> float:
    return 1 / math.ceil(len(t.load_local_data(cfg, 0, 2).train) / cfg.train.batch_size)


# --- which runtime calls the ClientApp ------------------------------------------------------


def test_a_clientapp_called_in_process_is_not_taken_for_a_supernode():
    assert node_ledger.flower_runtime() == node_ledger.IN_PROCESS


def test_the_supernode_clientapp_process_and_runner_are_a_deployment(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/flwr-clientapp", "--insecure"])
    assert node_ledger.flower_runtime() == node_ledger.DEPLOYMENT
    monkeypatch.setattr(sys, "argv", ["/usr/bin/python", "-m", "pytest"])
    # any process whose ClientApp is called by Flower's SuperNode runner
    runner = {"__name__": node_ledger.SUPERNODE_RUNNER, "runtime": node_ledger.flower_runtime}
    exec("def run_clientapp():\n    return runtime()", runner)
    assert runner["run_clientapp"]() == node_ledger.DEPLOYMENT


REPORTER, ASKER, SEEN = ClientApp(), ServerApp(), []  # apps of Flower's simulation runtime


@REPORTER.query()
def _report_runtime(msg: Message, context: Context) -> Message:
    runtime = ConfigRecord({"runtime": node_ledger.flower_runtime()})
    return Message(RecordDict({"runtime": runtime}), reply_to=msg)


@ASKER.main()
def _ask_runtime(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.2)  # the simulated nodes register while the ServerApp starts
    query = Message(RecordDict(), dst_node_id=nodes[0], message_type="query")
    SEEN.extend(str(r.content["runtime"]["runtime"]) for r in grid.send_and_receive([query]))


def test_a_clientapp_in_flowers_simulation_runtime_is_a_simulation():
    """Flower's simulation runtime (Ray actors) runs a ClientApp that reports its runtime."""
    from flwr.simulation import run_simulation

    SEEN.clear()
    run_simulation(server_app=ASKER, client_app=REPORTER, num_supernodes=1,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 1}})
    assert SEEN == [node_ledger.SIMULATION]


# --- where the ledger lives -------------------------------------------------------------------


def test_a_supernode_keeps_its_ledger_in_its_flwr_home_whatever_the_run_config(
        tiny_run_config, supernode, tmp_path):
    cfg = AppConfig.from_run_config(tiny_run_config)  # absolute output.dir: the server's choice
    place = node_ledger.ledger_place(_context(tiny_run_config, 1), cfg)
    assert place == node_ledger.LedgerPlace(supernode / "privacy-ledger.json", spans_runs=True)
    own = tmp_path / "mine.json"
    assert node_ledger.ledger_place(
        _context(tiny_run_config, 1, **{"privacy-state-file": str(own)}), cfg
    ) == node_ledger.LedgerPlace(own, spans_runs=True)
    per_run = node_ledger.ledger_place(
        _context(tiny_run_config, 1, **{"privacy-per-run-budget": True}), cfg)
    assert per_run == node_ledger.LedgerPlace(None, per_run_budget=True)
    with pytest.raises(ValueError, match="privacy-per-run-budget=true: a ledger file"):
        node_ledger.ledger_place(_context(tiny_run_config, 1, **{
            "privacy-state-file": str(own), "privacy-per-run-budget": True}), cfg)
    with pytest.raises(ValueError, match="privacy-per-run-budget='yes': expected true or false"):
        node_ledger.ledger_place(_context(tiny_run_config, 1,
                                          **{"privacy-per-run-budget": "yes"}), cfg)


def test_a_simulated_node_keeps_todays_per_run_ledger(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    place = node_ledger.ledger_place(_context(tiny_run_config, 1), cfg)
    assert place.path == cfg.results_folder / "privacy" / "partition-0.json"
    assert not place.spans_runs


# --- a ledger that spans runs -----------------------------------------------------------------


def test_a_second_run_counts_the_first_and_refuses_once_the_budget_is_spent(
        tiny_run_config, supernode):
    # Prepare: a 1-round run calibrated for ε = 6 spends 6 within Opacus' tolerance
    run_config = {**tiny_run_config, "strategy.num-rounds": 1}
    first = _train(run_config, _context(run_config, run_id=11))
    assert 6.0 - 0.01 <= first[contract.EPSILON] <= 6.0
    # Execute: the next flwr run, on a restarted SuperNode (fresh Context, another run id)
    second = _train({**run_config, "output.run-name": "again"}, _context(run_config, run_id=12))
    # Assert: refused, and the ε it reports counts the first run's steps
    assert second[contract.BUDGET_EXHAUSTED] == 1 and second[contract.STEPS] == 0
    assert second[contract.EPSILON] == first[contract.EPSILON]
    saved = json.loads((supernode / "privacy-ledger.json").read_text())
    assert sum(e["steps"] for e in saved["history"]) == 2  # the first run's 2 local steps only


def test_sigma_is_calibrated_per_run_after_every_earlier_step(tiny_run_config, supernode):
    run_config = {**tiny_run_config, "strategy.num-rounds": 3}
    cfg = AppConfig.from_run_config(run_config)
    q, total = _q(cfg), 3 * cfg.train.local_steps
    first = _train(run_config, _context(run_config, run_id=1))  # 1 of its 3 rounds
    sigma_1 = first[contract.NOISE_MULTIPLIER]
    assert sigma_1 == pytest.approx(calibrate_noise(target_epsilon=6.0, target_delta=1e-5,
                                                    sample_rate=q, steps=total))
    # a new run: σ for its own 3 rounds after the first run's 2 steps
    second = _train(run_config, _context(run_config, run_id=2))
    sigma_2 = second[contract.NOISE_MULTIPLIER]
    spent = [(sigma_1, q, cfg.train.local_steps)]
    assert sigma_2 == pytest.approx(calibrate_noise(target_epsilon=6.0, target_delta=1e-5,
                                                    sample_rate=q, steps=total, spent=spent))
    assert sigma_2 > sigma_1
    # the SuperNode restarts within run 2: its σ comes back from the file
    again = _train(run_config, _context(run_config, run_id=2))
    assert again[contract.NOISE_MULTIPLIER] == sigma_2
    history = [(sigma_1, q, 2), (sigma_2, q, 2), (sigma_2, q, 2)]
    assert again[contract.EPSILON] == pytest.approx(epsilon_of("rdp", history, 1e-5), rel=1e-9)
    saved = json.loads((supernode / "privacy-ledger.json").read_text())
    assert saved["run-id"] == "2" and saved["noise-multiplier"] == sigma_2


def test_a_node_that_cannot_write_its_ledger_refuses_unless_it_opts_into_a_per_run_budget(
        tiny_run_config, supernode, caplog):
    supernode.write_text("a file where the FLWR_HOME folder should be")
    with pytest.raises(node_ledger.LedgerUnavailable) as refused:
        _train(tiny_run_config, _context(tiny_run_config, 1))
    message = str(refused.value)
    assert str(supernode / "privacy-ledger.json") in message
    assert "privacy-per-run-budget=true" in message and "privacy-state-file" in message
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = _train(tiny_run_config, _context(tiny_run_config, 1,
                                                   **{"privacy-per-run-budget": True}))
    assert metrics[contract.STEPS] == 2
    assert "its ε starts again from 0 in every run" in caplog.text


def test_a_corrupt_ledger_refuses_with_the_path_and_the_opt_in(tiny_run_config, supernode):
    supernode.mkdir()
    (supernode / "privacy-ledger.json").write_text('{"history": [')
    with pytest.raises(node_ledger.LedgerUnavailable,
                       match=r"privacy-ledger.json is unreadable .*privacy-per-run-budget=true"):
        _train(tiny_run_config, _context(tiny_run_config, 1))


def test_a_run_without_noise_leaves_the_node_at_epsilon_inf(tiny_run_config, supernode):
    public = {**tiny_run_config, "privacy.epsilon": math.inf}
    assert _train(public, _context(public, run_id=1))[contract.STEPS] == 2
    refused = _train(tiny_run_config, _context(tiny_run_config, run_id=2))
    assert refused[contract.BUDGET_EXHAUSTED] == 1 and refused[contract.EPSILON] == math.inf


def test_max_epsilon_caps_what_the_run_config_may_spend(tiny_run_config, supernode):
    run_config = {**tiny_run_config, "strategy.num-rounds": 1}  # privacy.epsilon = 6
    capped = _train(run_config, _context(run_config, 1, **{"max-epsilon": 2}))
    assert 2.0 - 0.01 <= capped[contract.EPSILON] <= 2.0
    raised = {**run_config, "privacy.epsilon": 8.0}  # a new run asking for more
    refused = _train(raised, _context(raised, 2, **{"max-epsilon": 2}))
    assert refused[contract.BUDGET_EXHAUSTED] == 1
    public = {**run_config, "privacy.epsilon": math.inf}
    assert _train(public, _context(public, 3, **{"max-epsilon": 2}))[
        contract.BUDGET_EXHAUSTED] == 1
    with pytest.raises(ValueError, match=r"max-epsilon='2': expected a number > 0"):
        _train(run_config, _context(run_config, 4, **{"max-epsilon": "2"}))


def test_one_census_per_run_every_census_counted(tiny_run_config, supernode):
    run_config = {**tiny_run_config, "data.class-prior": "census", "strategy.num-rounds": 3}
    first = _context(run_config, run_id=1)
    census(_census_message(), first)
    _train(run_config, first)
    second = _context(run_config, run_id=2)  # the next run: its census is answered
    reply = census(_census_message(), second).content.metric_records[contract.METRICS]
    ledger = PrivacyLedger.load(supernode / "privacy-ledger.json", "rdp")[0]
    assert ledger.history[0] == ledger.history[2] == census_entry(10.0)
    assert reply[contract.EPSILON] == pytest.approx(ledger.epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="already holds a census of this run"):
        census(_census_message(), second)
    metrics = _train(run_config, second)
    assert metrics[contract.EPSILON] == pytest.approx(epsilon_of(
        "rdp", [*ledger.history, (metrics[contract.NOISE_MULTIPLIER], _q(
            AppConfig.from_run_config(run_config)), 2)], 1e-5), rel=1e-9)


def test_a_census_is_refused_once_earlier_runs_spent_the_budget(tiny_run_config, supernode):
    run_config = {**tiny_run_config, "strategy.num-rounds": 1}
    _train(run_config, _context(run_config, run_id=1))
    with_census = {**run_config, "data.class-prior": "census"}
    with pytest.raises(ValueError, match="refuses the census: its ledger holds ε = 5.99"):
        census(_census_message(), _context(with_census, run_id=2))


def test_a_node_with_a_per_run_budget_cannot_resume_a_private_run(tiny_run_config, supernode):
    resumed = {**tiny_run_config, "output.resume": True}
    with pytest.raises(ValueError, match="privacy-per-run-budget=true: this node cannot read"):
        _train(resumed, _context(resumed, 1, **{"privacy-per-run-budget": True}))


def test_exact_counts_leave_the_node_at_epsilon_inf_and_a_capped_node_refuses_them(
        tiny_run_config, supernode):
    public = {**tiny_run_config, "data.class-prior": "census", "privacy.epsilon": math.inf}
    with pytest.raises(ValueError, match="privacy.epsilon=inf .*caps ε at 3"):
        census(_census_message(), _context(public, 1, **{"max-epsilon": 3.0}))
    assert not (supernode / "privacy-ledger.json").exists()  # nothing released, nothing counted
    census(_census_message(), _context(public, 2))
    assert PrivacyLedger.load(supernode / "privacy-ledger.json", "rdp")[0].epsilon(1e-5) == \
        math.inf
