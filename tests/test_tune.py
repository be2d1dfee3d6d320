"""fedsvd-tune: K learning-rate trials sharing ε, their composed ledgers, the choice, refusals."""

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from common.config import RUN_LEDGER_DIR
from common.run_config import override_text
from privacy import PrivacyLedger
from privacy.policy import plan_round
from simulations import tune
from simulations.experiments import tuning
from simulations.experiments.cells import cell_config
from tests.test_sweep import TINY_KEYS, write_run

PARTITIONS = {0: 400, 1: 650}  # training examples of each fake node
DELTA = 1e-5


def fake_runner(fail=(), accuracy=lambda cfg: 0.5):
    """Stands in for flwr: the run folder, and each node's ledger as its ClientApp would keep it.

    Every node is sampled in every round (the worst case σ is calibrated for): its ledger holds
    (σ, q, rounds × local steps), σ from the node's own policy (privacy.policy.plan_round).
    """
    calls = []

    def run(items, log):
        cfg = cell_config(items)
        calls.append(cfg)
        log.write_text("flwr output\n")
        if cfg.train.learning_rate in fail:
            log.write_text("ERROR: the ServerApp raised: boom\n")
            return 1
        folder = write_run(Path(cfg.output.dir), method=cfg.strategy.name,
                           epsilon=cfg.privacy.epsilon, alpha=cfg.data.dirichlet_alpha,
                           seed=cfg.seed, lr=cfg.train.learning_rate,
                           rounds=cfg.strategy.num_rounds, final=accuracy(cfg),
                           validation=cfg.data.validation_fraction,
                           **{"output.run-name": cfg.run_name,
                              "privacy.trials": cfg.privacy.trials})
        for node, n in PARTITIONS.items():
            planned = plan_round(cfg, PrivacyLedger(), num_examples=n, noise_multiplier=None,
                                 where=f"partition {node}")
            steps = cfg.strategy.num_rounds * cfg.train.local_steps
            ledger = PrivacyLedger("rdp", [(planned.noise_multiplier, planned.sample_rate, steps)])
            ledger.save(folder / RUN_LEDGER_DIR / f"partition-{node}.json",
                        noise_multiplier=planned.noise_multiplier)
        return 0
    run.calls = calls
    return run


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--method", "fedsvd", "--lrs", "0.125,0.5,2", "--epsilon", "6", "--out", str(out),
            "--num-supernodes", "3", "--run-config", "strategy.num-rounds=2", *extra]


def _peak(best: float):
    return lambda cfg: 0.8 - abs(math.log2(cfg.train.learning_rate / best)) / 10


# --- on the private federation ------------------------------------------------------------------


def test_k_trials_share_the_budget_and_every_nodes_ledger_is_composed(tmp_path, capsys):
    runner, out = fake_runner(accuracy=_peak(0.5)), tmp_path / "tune"
    assert tune.main(_argv(out), runner=runner) == 0
    # Every trial on the validation split, with the TOTAL ε and privacy.trials = K
    assert sorted(c.train.learning_rate for c in runner.calls) == [0.125, 0.5, 2.0]
    assert all(c.privacy.trials == 3 and c.privacy.epsilon == 6.0 and
               c.data.validation_fraction == 0.1 for c in runner.calls)
    result = json.loads((out / tuning.TUNE_FILE).read_text())["result"]
    assert result["learning-rate"] == 0.5
    # Each node's total ε against an accountant stepped once per step of every trial
    for node in PARTITIONS:
        stepped = RDPAccountant()
        for trial in (out / c.run_name for c in runner.calls):
            saved = json.loads((trial / RUN_LEDGER_DIR / f"partition-{node}.json").read_text())
            for entry in saved["history"]:
                for _ in range(entry["steps"]):
                    stepped.step(noise_multiplier=entry["noise-multiplier"],
                                 sample_rate=entry["sample-rate"])
        composed = result["privacy"]["nodes"][str(node)]
        assert composed == pytest.approx(stepped.get_epsilon(DELTA), rel=1e-9)
        assert 6.0 - 0.01 <= composed <= 6.0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "plain composition" in next(ln for ln in lines if ln.startswith("[tune] total ε"))
    assert any("not privatised" in ln for ln in lines)
    assert any("the budget is spent" in ln and "fedsvd-eps6-a0.5-seed0-lr0.5" in ln
               for ln in lines)
    assert lines[-1].startswith("[tune] chosen learning rate 0.5 (best final validation accuracy")


def test_a_tie_goes_to_the_sweeps_rule_the_smaller_rate(tmp_path, capsys):
    assert tune.main(_argv(tmp_path / "tune"), runner=fake_runner(accuracy=lambda c: 0.6)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "[tune] chosen learning rate 0.125")


def test_a_failed_trial_exits_1_with_the_reason_on_the_last_line(tmp_path, capsys):
    runner = fake_runner(fail={2.0})
    assert tune.main(_argv(tmp_path / "tune"), runner=runner) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[tune] FAILED: 1 of 3 trials did not complete, so no rate is chosen")
    assert "fedsvd-eps6-a0.5-seed0-lr2" in last and "exit code 1" in last
    assert "result" not in json.loads((tmp_path / "tune" / tuning.TUNE_FILE).read_text())


def test_the_same_command_resumes_and_another_tuning_is_refused_unless_overwrite(tmp_path,
                                                                                  capsys):
    out, runner = tmp_path / "tune", fake_runner(accuracy=_peak(2.0))
    assert tune.main(_argv(out), runner=runner) == 0
    runner.calls.clear()
    assert tune.main(_argv(out), runner=runner) == 0  # complete trials are not run again
    assert runner.calls == []
    other = ["--method", "fedsvd", "--lrs", "0.25,1", "--epsilon", "6", "--out", str(out),
             "--num-supernodes", "3", "--run-config", "strategy.num-rounds=2"]
    capsys.readouterr()
    assert tune.main(other, runner=runner) == 2 and runner.calls == []
    err = capsys.readouterr().err
    assert "holds a tuning with other settings (lrs, trials" in err
    assert err.strip().endswith("refused before starting: nothing was run")
    assert tune.main([*other, "--overwrite"], runner=runner) == 0
    assert len(runner.calls) == 2
    assert not (out / "fedsvd-eps6-a0.5-seed0-lr0.125").exists()  # the earlier trials
    assert {p.name for p in out.iterdir() if p.name.startswith("fedsvd")} == {
        "fedsvd-eps6-a0.5-seed0-lr0.25", "fedsvd-eps6-a0.5-seed0-lr1"}


@pytest.mark.parametrize(("extra", "message"), [
    (["--lrs", "0.5"], "argument --lrs: '0.5': at least two rates"),
    (["--lrs", "0.5,0.5"], "argument --lrs: '0.5,0.5': a rate appears twice"),
    (["--lrs", "0.5,-1"], "argument --lrs: '0.5,-1': -1 is not a finite rate > 0"),
    (["--epsilon", "inf"], "argument --epsilon: inf: must be a finite ε > 0"),
    (["--epsilon", "0"], "argument --epsilon: 0: must be a finite ε > 0"),
    (["--method", "fedsgd"], "argument --method: 'fedsgd': one of fedsvd"),
])
def test_bad_flags_are_refused_by_the_parser(tmp_path, extra, message, capsys):
    runner = fake_runner()
    with pytest.raises(SystemExit) as refused:
        tune.main([*_argv(tmp_path / "tune"), *extra], runner=runner)
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert runner.calls == [] and not (tmp_path / "tune").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--run-config", "train.learning-rate=1"], "--run-config sets train.learning-rate=1"),
    (["--run-config", "privacy.trials=2"], "--run-config sets privacy.trials=2"),
    (["--run-config", 'output.dir="/tmp/x"'], "--run-config sets output.dir='/tmp/x'"),
    (["--proxy-run-config", "seed=3"], "--proxy-run-config sets seed=3: the tuning sets it"),
    (["--validation-fraction", "0"], "--validation-fraction 0: must be in (0, 1)"),
    (["--run-config", "privacy.delta=2"], "privacy.delta=2.0: must be in (0, 1)"),
    (["--proxy-run-config", "data.labels=\"comp*\""], "leaves data.source as --run-config"),
])
def test_bad_settings_are_refused_before_any_run(tmp_path, extra, message, capsys):
    runner = fake_runner()
    assert tune.main([*_argv(tmp_path / "tune"), *extra], runner=runner) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().endswith("refused before starting: nothing was run")
    assert runner.calls == [] and not (tmp_path / "tune" / tuning.TUNE_FILE).exists()


def test_a_folder_that_is_not_a_tunings_is_refused(tmp_path, capsys):
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "notes.txt").write_text("mine")
    assert tune.main(_argv(tmp_path / "tune"), runner=fake_runner()) == 2
    assert "holds files but no tune.json" in capsys.readouterr().err


# --- on a public proxy --------------------------------------------------------------------------


def test_tuning_on_a_public_proxy_spends_nothing_of_the_targets_budget(tiny_run_config, tmp_path,
                                                                       capsys):
    target = override_text({k: tiny_run_config[k] for k in TINY_KEYS})
    proxy = str(Path(tune.ROOT) / "simulations" / "conf" / "proxy_20newsgroups.toml")
    runner = fake_runner(accuracy=_peak(0.5))
    argv = ["--method", "fedsvd", "--lrs", "0.5,2", "--epsilon", "6", "--out",
            str(tmp_path / "tune"), "--num-supernodes", "3", "--run-config", target,
            "--run-config", "strategy.num-rounds=1", "--proxy-run-config", proxy]
    assert tune.main(argv, runner=runner) == 0
    # the trials read the proxy's data with the target's model, at one run's σ and full ε
    assert all(c.data.source == "20newsgroups" and c.model.path == tiny_run_config["model.path"]
               and c.privacy.trials == 1 and c.privacy.epsilon == 6.0 for c in runner.calls)
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(ln.startswith("[tune] total ε on the public proxy's data") for ln in lines)
    final = next(ln for ln in lines if "tuned on a public proxy" in ln)
    assert "the target federation spent nothing" in final
    assert "spends its whole ε = 6" in final and "train.learning-rate=0.5" in final
    assert lines[-1].startswith("[tune] chosen learning rate 0.5")


# --- through Flower ------------------------------------------------------------------------------


def test_tiny_tuning_through_flower_composes_the_nodes_ledgers(tiny_run_config, tmp_path,
                                                               capsys):
    out = tmp_path / "tune"
    overrides = override_text({k: tiny_run_config[k] for k in TINY_KEYS})
    argv = ["--method", "fedsvd", "--lrs", "0.5,2", "--epsilon", "6", "--out", str(out),
            "--num-supernodes", "3", "--validation-fraction", "0.2", "--run-config",
            overrides + " strategy.num-rounds=1", "--cell-timeout", "300"]
    assert tune.main(argv) == 0
    result = json.loads((out / tuning.TUNE_FILE).read_text())["result"]
    assert result["learning-rate"] in (0.5, 2.0)
    nodes = result["privacy"]["nodes"]
    assert nodes and all(0 < eps <= 6.0 for eps in nodes.values())
    sigmas = {t["noise-multiplier"] for t in result["privacy"]["trials"].values()}
    assert len(sigmas) == 1  # the same σ (the nodes have the same size under the iid split)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "[tune] chosen learning rate")
