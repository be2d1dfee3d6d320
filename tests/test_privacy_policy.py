"""privacy.policy: the decisions a node makes before a round, against an independent accountant."""

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import AppConfig, ConfigError
from privacy import PrivacyLedger
from privacy.policy import plan_round

RUN = {"privacy.epsilon": 3.0, "privacy.delta": 1e-5, "strategy.num-rounds": 4,
       "train.local-steps": 5, "train.batch-size": 32}


def test_sigma_is_calibrated_for_every_step_of_the_run_then_reused():
    cfg = AppConfig.from_run_config(RUN)
    first = plan_round(cfg, PrivacyLedger(), num_examples=1000, noise_multiplier=None,
                       where="partition 0")
    q = 1 / math.ceil(1000 / 32)
    assert first.sample_rate == q and first.steps == 5 and not first.exhausted
    assert first.noise_multiplier == pytest.approx(get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=20, accountant="rdp"))
    again = plan_round(cfg, PrivacyLedger(), num_examples=1000, noise_multiplier=1.23,
                       where="partition 0")
    assert again.noise_multiplier == 1.23  # σ from the node's ledger, never recomputed


def test_the_round_that_would_pass_the_budget_is_refused():
    cfg = AppConfig.from_run_config(RUN)
    ledger = PrivacyLedger()
    independent = RDPAccountant()
    rounds_trained = 0
    while True:
        budget = plan_round(cfg, ledger, num_examples=1000,
                            noise_multiplier=ledger.history[0][0] if ledger.history else None,
                            where="partition 0")
        if budget.exhausted:
            break
        ledger.history.append((budget.noise_multiplier, budget.sample_rate, budget.steps))
        for _ in range(budget.steps):
            independent.step(noise_multiplier=budget.noise_multiplier,
                             sample_rate=budget.sample_rate)
        rounds_trained += 1
        assert independent.get_epsilon(1e-5) <= 3.0
    assert rounds_trained == 4  # σ was planned for exactly the run's 4 rounds
    assert budget.epsilon_after > 3.0


def test_delta_must_be_below_one_over_n_for_private_runs_only():
    with pytest.raises(ConfigError, match=r"privacy.delta=0.01: must be < 1/n .*partition 3"):
        plan_round(AppConfig.from_run_config({**RUN, "privacy.delta": 0.01}), PrivacyLedger(),
                   num_examples=200, noise_multiplier=None, where="partition 3")
    open_run = AppConfig.from_run_config({**RUN, "privacy.epsilon": math.inf,
                                          "privacy.delta": 0.01})
    budget = plan_round(open_run, PrivacyLedger(), num_examples=200, noise_multiplier=None,
                        where="partition 3")
    assert budget.noise_multiplier == 0.0 and not budget.exhausted


def test_an_empty_partition_is_refused():
    with pytest.raises(ValueError, match="0 training examples"):
        plan_round(AppConfig.from_run_config(RUN), PrivacyLedger(), num_examples=0,
                   noise_multiplier=None, where="partition 1")
