import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy import PrivacyLedger, calibrate_noise


def test_calibrated_noise_meets_the_budget_at_the_planned_steps():
    sigma = calibrate_noise(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200)
    acc = RDPAccountant()
    for _ in range(200):
        acc.step(noise_multiplier=sigma, sample_rate=0.05)
    assert 2.9 < acc.get_epsilon(1e-5) <= 3.0


def test_calibration_matches_opacus():
    ours = calibrate_noise(target_epsilon=6.0, target_delta=1e-5, sample_rate=1 / 32, steps=150)
    theirs = get_noise_multiplier(target_epsilon=6.0, target_delta=1e-5, sample_rate=1 / 32,
                                  steps=150, accountant="rdp")
    assert ours == pytest.approx(theirs)


def test_infinite_epsilon_needs_no_noise():
    assert calibrate_noise(target_epsilon=math.inf, target_delta=1e-5, sample_rate=0.1,
                           steps=10) == 0.0


def test_invalid_sample_rate_names_the_value():
    with pytest.raises(ValueError, match="sample_rate=2"):
        calibrate_noise(target_epsilon=1.0, target_delta=1e-5, sample_rate=2, steps=10)


def test_regression_pinned_epsilon():
    # σ = 1.0, q = 0.01, 1000 steps, δ = 1e-5 under Opacus 1.6 RDP (pinned on 2026-11-23).
    ledger = PrivacyLedger("rdp", [(1.0, 0.01, 1000)])
    assert ledger.epsilon(1e-5) == pytest.approx(2.10137, abs=1e-4)


def test_ledger_round_trip_and_cumulative_epsilon():
    ledger = PrivacyLedger("rdp", [(0.8, 0.03, 10), (0.8, 0.03, 10)])
    again = PrivacyLedger.from_dict("rdp", ledger.to_dict())
    assert again.history == ledger.history and again.steps == 20
    after = ledger.epsilon_after(noise_multiplier=0.8, sample_rate=0.03, steps=10, delta=1e-5)
    assert after == pytest.approx(PrivacyLedger("rdp", [(0.8, 0.03, 30)]).epsilon(1e-5))
    assert after > ledger.epsilon(1e-5) > 0
    assert PrivacyLedger().epsilon(1e-5) == 0.0
