"""The planner's --recommend: the defaults fitted to a client's size and budget."""

import math
import time

import pytest
from opacus.accountants import RDPAccountant

from common.config import AppConfig, PrivacyConfig, StrategyConfig, TrainConfig
from common.run_config import parse_override_text
from privacy.planning import main
from privacy.policy import sample_rate
from privacy.recommend import NOISY, REFERENCE_EXAMPLES, fitted_batch, recommend


def test_the_default_task_keeps_the_defaults_at_the_reference_noise():
    rec = recommend(REFERENCE_EXAMPLES, 3.0)
    train = TrainConfig()
    assert (rec.batch_size, rec.local_steps, rec.learning_rate, rec.rounds) == (
        train.batch_size, train.local_steps, train.learning_rate, StrategyConfig().num_rounds)
    assert rec.reasons == ()
    assert rec.relative_noise == pytest.approx(1.0)


@pytest.mark.parametrize("examples", [8, 20, 31, 200, 5000])
def test_a_batch_fits_the_client_and_the_examples_per_round_stay(examples):
    default = TrainConfig()
    rec = recommend(examples, 3.0)
    assert rec.batch_size <= examples
    assert rec.batch_size * rec.local_steps == default.batch_size * default.local_steps
    assert rec.batch_size == (default.batch_size if examples >= default.batch_size
                              else fitted_batch(examples, default.batch_size))
    assert bool(rec.reasons) == (rec.batch_size != default.batch_size)


def test_fewer_examples_than_the_smallest_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one batch"):
        recommend(5, 3.0)


@pytest.mark.parametrize("examples, epsilon", [(200, 3.0), (1445, 1.0), (20, 6.0)])
def test_sigma_meets_the_budget_by_an_independent_accountant(examples, epsilon):
    """Every step of the run at the recommended σ, counted by Opacus' RDP accountant."""
    rec = recommend(examples, epsilon)
    accountant = RDPAccountant()
    q = sample_rate(examples, rec.batch_size)
    for _ in range(rec.rounds * rec.local_steps):
        accountant.step(noise_multiplier=rec.noise_multiplier, sample_rate=q)
    spent = accountant.get_epsilon(delta=PrivacyConfig().delta)
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=0.02)  # and not far below: σ is the smallest


def test_no_noise_without_a_budget():
    rec = recommend(500, math.inf)
    assert rec.noise_multiplier == 0 and rec.relative_noise == 0


def test_the_run_config_line_builds_a_valid_config_with_the_schedule():
    rec = recommend(20, 3.0)
    cfg = AppConfig.from_run_config(parse_override_text(rec.run_config()))
    assert (cfg.train.batch_size, cfg.train.local_steps) == (rec.batch_size, rec.local_steps)
    assert (cfg.train.batch_size, cfg.train.local_steps) == (16, 20)
    assert cfg.privacy.epsilon == 3.0 and cfg.strategy.num_rounds == rec.rounds


def test_cli_prints_the_schedule_sigma_and_the_noise_warning(capsys):
    main(["--recommend", "--epsilon", "1", "--examples", "200"])
    out = capsys.readouterr().out
    rec = recommend(200, 1.0)
    assert rec.relative_noise > NOISY
    assert f"σ = {rec.noise_multiplier:.4f}" in out
    assert f"noisier than {NOISY:g}×" in out
    assert out.strip().splitlines()[-1] == f"run config: --run-config '{rec.run_config()}'"
    main(["--recommend", "--epsilon", "3", "--examples", str(REFERENCE_EXAMPLES)])
    assert "noisier" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--examples", "200"], "--recommend: needs --epsilon"),
    (["--examples", "200", "--epsilon", "3", "--batch-size", "16"],
     "--batch-size: --recommend chooses it"),
    (["--examples", "200", "--epsilon", "3", "--rounds", "4"], "--rounds: --recommend chooses it"),
    (["--examples", "200", "--epsilon", "3", "--local", "20"],  # an abbreviation of the flag
     "--local-steps: --recommend chooses it"),
    (["--examples", "200", "--epsilon", "3", "--batch-size=32"],  # its default, still refused
     "--batch-size: --recommend chooses it"),
    (["--examples", "5", "--epsilon", "3"], "--examples 5: fewer than one batch"),
    (["--examples", "200", "--epsilon", "3", "--delta", "0.01"], "--delta 0.01: must be < 1/n"),
    (["--examples", "200", "--epsilon", "0"], "--epsilon 0.0: must be > 0"),
])
def test_cli_refuses_naming_the_flag(capsys, argv, message):
    argv = ["--recommend", *argv]
    if "--epsilon" not in argv:
        argv += ["--sigma", "1"]  # the mutually exclusive group needs one of the two
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert message in last, last


def test_an_unreachable_budget_is_refused_fast_saying_what_the_schedule_reaches(capsys):
    """Before any calibration (which doubled σ for 35 s, then raised with a traceback)."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as caught:
        main(["--recommend", "--epsilon", "0.0001", "--examples", "10"])
    assert caught.value.code == 2
    assert time.perf_counter() - start < 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--epsilon 0.0001 is out of reach of --rounds 5 × --local-steps 40" in last
    assert "raise --epsilon above 0.1029" in last
