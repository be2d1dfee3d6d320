"""Server checkpoints: atomic file, config check, RNG states, and the round offset on resume."""

import math
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from common.config import AppConfig, ConfigError, StrategyConfig
from server import checkpoint as ckpt
from server.resume import CheckpointedRun
from strategies import FedSVD
from tests.conftest import default_run_config
from tests.helpers import FakeGrid
from tests.test_strategy import MODULES, global_state, train_reply

ROWS = [{"round": 0, "wall-seconds": 1.5, "accuracy": 0.25, "loss": 1.1},
        {"round": 1, "wall-seconds": 3.0, "accuracy": 0.5, "loss": 0.9, "epsilon-max": math.inf,
         "bytes-up": 1234}]


def _cfg(**overrides) -> AppConfig:
    return AppConfig.from_run_config({**default_run_config(), **overrides})


def _arrays() -> ArrayRecord:
    g = torch.Generator().manual_seed(0)
    return ArrayRecord(torch_state_dict={"layer.lora_A": torch.randn(4, 6, generator=g),
                                         "layer.lora_B": torch.randn(5, 4, generator=g)})


def test_roundtrip_keeps_arrays_rows_round_and_random_states(tmp_path):
    cfg = _cfg()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path, server_round=1, arrays=_arrays(), cfg=cfg, rows=ROWS)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    loaded = ckpt.load_checkpoint(tmp_path, cfg)
    ckpt.restore_rng(loaded.rng)

    assert loaded.server_round == 1 and loaded.rows == ROWS
    original, restored = _arrays().to_torch_state_dict(), loaded.arrays.to_torch_state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_FILE]  # no temporary left


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg()
    ckpt.save_checkpoint(tmp_path, server_round=1, arrays=_arrays(), cfg=cfg, rows=ROWS)

    def torn_write(tensors, path, metadata):
        path.write_bytes(b"half a file")
        raise OSError("killed")

    monkeypatch.setattr(ckpt, "save_file", torn_write)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, server_round=2, arrays=_arrays(), cfg=cfg, rows=ROWS)
    assert ckpt.load_checkpoint(tmp_path, cfg).server_round == 1


def test_a_different_config_is_refused_naming_every_differing_key(tmp_path):
    ckpt.save_checkpoint(tmp_path, server_round=1, arrays=_arrays(), cfg=_cfg(), rows=ROWS)
    changed = _cfg(**{"strategy.name": "ffa", "strategy.num-rounds": 20, "lora.r": 4,
                      "model.max-length": 32})
    with pytest.raises(ckpt.CheckpointMismatch) as err:
        ckpt.load_checkpoint(tmp_path, changed)
    message = str(err.value)
    for line in ("strategy.name: checkpoint 'fedsvd', this run 'ffa'",
                 f"strategy.num-rounds: checkpoint {StrategyConfig().num_rounds}, this run 20",
                 "lora.r: checkpoint 8",
                 "model.max-length: checkpoint 64"):
        assert line in message
    assert "privacy.epsilon" not in message


def test_resume_flag_and_results_folder_may_change(tmp_path):
    ckpt.save_checkpoint(tmp_path, server_round=3, arrays=_arrays(), cfg=_cfg(), rows=ROWS)
    moved = _cfg(**{"output.resume": True, "output.dir": "/elsewhere"})
    assert ckpt.load_checkpoint(tmp_path, moved).server_round == 3


def test_a_key_added_after_the_checkpoint_counts_as_its_default():
    saved = {k: v for k, v in _cfg().to_dict().items() if k != "strategy.max-norm-ratio"}
    assert ckpt.config_differences(saved, _cfg().to_dict()) == []
    changed = _cfg(**{"strategy.max-norm-ratio": 3.0}).to_dict()
    assert ckpt.config_differences(saved, changed) == [
        "strategy.max-norm-ratio: checkpoint 10.0, this run 3.0"]
    assert ckpt.config_differences({**saved, "lora.gone": 1}, _cfg().to_dict()) == [
        "lora.gone: checkpoint 1, this run (absent)"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="output.resume=true but there is no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "no-run", _cfg(**{"output.resume": True}))


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, content):
    (tmp_path / ckpt.CHECKPOINT_FILE).write_bytes(content)
    with pytest.raises(ckpt.CheckpointMismatch, match="is not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path, AppConfig())


def test_deterministic_training_is_refused_with_a_finite_epsilon():
    with pytest.raises(ConfigError, match="train.deterministic=True with privacy.epsilon=6.0"):
        _cfg(**{"train.deterministic": True})
    assert _cfg(**{"train.deterministic": True, "privacy.epsilon": math.inf}).train.deterministic


class _Recorder:
    """A strategy stand-in that records the round numbers it is called with."""

    def __init__(self):
        self.calls = []

    def summary(self):
        pass

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure_train", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate_train", server_round))
        return ArrayRecord(torch_state_dict={"x": torch.full((1,), float(server_round))}), None

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.calls.append(("configure_evaluate", server_round))
        return []

    def aggregate_evaluate(self, server_round, replies):
        self.calls.append(("aggregate_evaluate", server_round))
        return None


class _Grid:
    def send_and_receive(self, messages, *, timeout=None):
        return []


def _run(done):
    inner, evaluated, saved = _Recorder(), [], []
    run = CheckpointedRun(inner, save=lambda r, a: saved.append((r, float(a["x"].numpy()[0]))),
                          done=done)

    def evaluate(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"accuracy": 0.0})

    start = ArrayRecord(torch_state_dict={"x": torch.zeros(1)})
    result = run.start(_Grid(), start, num_rounds=4, train_config=ConfigRecord(),
                       evaluate_fn=evaluate)
    return inner.calls, evaluated, saved, result


def test_a_fresh_run_saves_after_every_round_including_round_0():
    calls, evaluated, saved, _ = _run(done=None)
    assert [r for name, r in calls if name == "configure_train"] == [1, 2, 3, 4]
    assert evaluated == [0, 1, 2, 3, 4]
    assert saved == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


def test_a_resumed_run_sees_the_real_round_numbers_and_skips_the_restored_evaluation():
    calls, evaluated, saved, result = _run(done=2)
    assert calls == [(name, r) for r in (3, 4) for name in (
        "configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")]
    assert evaluated == [3, 4]
    assert saved == [(3, 3.0), (4, 4.0)]
    assert float(result.arrays["x"].numpy()[0]) == 4.0


def test_resuming_a_finished_run_runs_no_round():
    calls, evaluated, saved, result = _run(done=4)
    assert calls == [] and evaluated == [] and saved == []
    assert not result.arrays  # the app then saves the restored arrays


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    # A resumed (or repeated) run reproduces the global arrays only if the float sums do not
    # follow the arrival order of the replies.
    rng = np.random.default_rng(1)
    state = ArrayRecord(torch_state_dict=global_state(rng))
    replies = [train_reply(rng, n)[0] for n in (30, 41, 57, 90)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        strategy = FedSVD(MODULES, fraction_train=1.0, min_train_nodes=4, min_available_nodes=4)
        list(strategy.configure_train(1, state, ConfigRecord(), FakeGrid(4)))
        arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in order])
        results.append((arrays.to_torch_state_dict(), dict(metrics)))
    for arrays, metrics in results[1:]:
        assert all(torch.equal(arrays[k], results[0][0][k]) for k in arrays)
        assert metrics == results[0][1]
