"""privacy.trials = K: σ for one of K runs sharing ε, checked against independent accountants."""

import math
import re

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from common import contract
from common.config import AppConfig, ConfigError
from privacy import PrivacyLedger
from privacy.accounting import calibrate_noise, epsilon_of
from privacy.census import census_entry, check_census_budget
from privacy.planning import main as planner
from privacy.policy import SPENT_TOLERANCE, plan_round
from privacy.trials import calibrate_trials, earlier_trials, plan_trials
from tests.conftest import ROOT

DELTA, N, BATCH, ROUNDS, LOCAL = 1e-5, 1000, 32, 4, 5
Q, T = 1 / math.ceil(N / BATCH), ROUNDS * LOCAL
RUN = {"privacy.epsilon": 3.0, "privacy.delta": DELTA, "strategy.num-rounds": ROUNDS,
       "train.local-steps": LOCAL, "train.batch-size": BATCH}


def _sigma(trials: int, epsilon: float = 3.0, **kw) -> float:
    return calibrate_trials(history=kw.pop("history", []), target_epsilon=epsilon,
                            target_delta=DELTA, sample_rate=Q, steps=T, trials=trials, **kw)


# --- σ of K trials against Opacus, and against accountants that never saw our code -------------


@pytest.mark.parametrize("k", [2, 3, 8])
def test_sigma_of_k_trials_is_the_sigma_of_one_run_of_k_times_the_steps(k):
    # Opacus' own calibration for a single run of K · T steps, called directly
    assert _sigma(k) == get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA,
                                             sample_rate=Q, steps=k * T, accountant="rdp")
    assert _sigma(k) > _sigma(k - 1) > 0


@pytest.mark.parametrize("k", [2, 4])
def test_k_trials_compose_within_the_budget_under_independent_accountants(k):
    sigma = _sigma(k)
    # RDP curves added by hand: K identical (σ, q, T) runs, converted once
    rdp = k * compute_rdp(q=Q, noise_multiplier=sigma, steps=T, orders=RDPAccountant.DEFAULT_ALPHAS)
    by_hand, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=DELTA)
    # Opacus' RDP accountant stepped once per DP-SGD step of every trial
    stepped = RDPAccountant()
    for _ in range(k * T):
        stepped.step(noise_multiplier=sigma, sample_rate=Q)
    # another accountant: PRV (Gopi et al. 2021) over the K runs as K history entries
    prv = PRVAccountant()
    prv.history = [(sigma, Q, T)] * k
    for eps in (by_hand, stepped.get_epsilon(DELTA), prv.get_epsilon(DELTA)):
        assert eps <= 3.0
    assert by_hand >= 3.0 - 0.01  # calibrated to Opacus' tolerance: the budget is used
    # the smallest such σ: 2 % less noise passes the budget
    less = RDPAccountant()
    less.history = [(0.98 * sigma, Q, T)] * k
    assert less.get_epsilon(DELTA) > 3.0


def test_with_a_census_every_trial_counts_its_own_census():
    census = [census_entry(10.0)]
    sigma = _sigma(3, history=census, census=census)
    assert sigma == calibrate_noise(target_epsilon=3.0, target_delta=DELTA, sample_rate=Q,
                                    steps=3 * T, spent=census * 3)
    runs = (census + [(sigma, Q, T)]) * 3
    assert 3.0 - 0.01 <= epsilon_of("rdp", runs, DELTA) <= 3.0
    assert sigma > _sigma(3)


def test_one_trial_is_todays_calibration_exactly():
    earlier = [(1.3, 0.05, 40), census_entry(10.0)]
    for history in ([], earlier):
        assert _sigma(1, history=history) == calibrate_noise(
            target_epsilon=3.0, target_delta=DELTA, sample_rate=Q, steps=T, spent=history)
    cfg = AppConfig.from_run_config(RUN)
    assert cfg.privacy.trials == 1
    planned = plan_round(cfg, PrivacyLedger(), num_examples=N, noise_multiplier=None,
                         where="partition 0")
    assert planned.noise_multiplier == get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=Q, steps=T, accountant="rdp")


def test_earlier_trials_are_the_trailing_entries_of_this_sample_rate():
    c = census_entry(10.0)
    prior = [(2.0, Q, 7), (1.1, 0.5, 3)]
    assert earlier_trials(prior, census=[], sample_rate=Q) == (prior, None)
    assert earlier_trials([*prior, (0.9, Q, 40)], census=[], sample_rate=Q) == (prior, 0.9)
    assert earlier_trials([*prior, c, (0.9, Q, 20), c, (0.9, Q, 15), c], census=[c],
                          sample_rate=Q) == (prior, 0.9)
    assert earlier_trials([], census=[c], sample_rate=Q) == ([], None)


# --- the node ledger: K trials one after another, then one too many ----------------------------


def _run_trial(cfg: AppConfig, ledger: PrivacyLedger, independent: RDPAccountant,
               census: bool = False) -> float | None:
    """One run of every round on ``ledger``; its σ, or None if refused before training."""
    if census:
        ledger.history.append(census_entry(cfg.privacy.census_noise))
        independent.history.append(census_entry(cfg.privacy.census_noise))
    sigma = None
    for _ in range(cfg.strategy.num_rounds):
        budget = plan_round(cfg, ledger, num_examples=N, noise_multiplier=sigma,
                            where="partition 0")
        if budget.exhausted:
            assert sigma is None, "a trial was cut short: σ did not leave room for all K"
            return None
        sigma = budget.noise_multiplier
        acc = ledger.make_accountant()
        for _ in range(budget.steps):  # Opacus merges the steps of one σ into one entry
            acc.step(noise_multiplier=sigma, sample_rate=budget.sample_rate)
            independent.step(noise_multiplier=sigma, sample_rate=budget.sample_rate)
        ledger.history = list(acc.history)
    return sigma


@pytest.mark.parametrize(("k", "census", "prior"), [
    (3, False, []),
    (2, True, []),
    (3, False, [(2.0, 0.1, 10)]),  # an earlier run of another schedule (ε 0.94) on the ledger
])
def test_k_trials_on_one_ledger_all_train_at_one_sigma_and_the_next_is_refused(k, census, prior):
    keys = {**RUN, "privacy.trials": k, **({"data.class-prior": "census"} if census else {})}
    cfg = AppConfig.from_run_config(keys)
    ledger, independent = PrivacyLedger("rdp", list(prior)), RDPAccountant()
    independent.history = list(prior)
    sigmas = [_run_trial(cfg, ledger, independent, census) for _ in range(k)]
    assert None not in sigmas and len(set(sigmas)) == 1  # every trial at the same σ
    spent = independent.get_epsilon(DELTA)
    assert spent == pytest.approx(ledger.epsilon(DELTA), rel=1e-9)
    assert 3.0 - SPENT_TOLERANCE < spent <= 3.0
    # the (K+1)-th, on the same ledger, is refused by the budget rule before it calibrates
    if census:  # its census is refused first: no room is left for it
        ledger.history.append(census_entry(cfg.privacy.census_noise))
    refused = plan_round(cfg, ledger, num_examples=N, noise_multiplier=None, where="partition 0")
    assert refused.exhausted and math.isinf(refused.noise_multiplier)


def test_a_run_of_another_schedule_between_trials_gets_more_noise_never_more_epsilon():
    cfg = AppConfig.from_run_config({**RUN, "privacy.trials": 3})
    ledger, independent = PrivacyLedger(), RDPAccountant()
    first = _run_trial(cfg, ledger, independent)
    ledger.history.append((2.5, 0.5, 3))  # another run on the node between the trials
    independent.history.append((2.5, 0.5, 3))
    second = _run_trial(cfg, ledger, independent)
    assert second is not None and second > first
    assert independent.get_epsilon(DELTA) <= 3.0


def test_trials_must_be_a_positive_integer_and_k_censuses_must_leave_room():
    with pytest.raises(ConfigError, match=r"privacy.trials=0: must be an integer >= 1"):
        AppConfig.from_run_config({"privacy.trials": 0})
    with pytest.raises(ConfigError, match=r"privacy.trials=2.5: expected int"):
        AppConfig.from_run_config({"privacy.trials": 2.5})
    census = {"data.class-prior": "census", "privacy.census-noise-multiplier": 2.0}
    check_census_budget(AppConfig.from_run_config({**census, "privacy.epsilon": 3.0}).privacy)
    with pytest.raises(ConfigError, match=r"censuses of the privacy.trials=4 runs alone spend"):
        check_census_budget(AppConfig.from_run_config({**census, "privacy.epsilon": 3.0,
                                                       "privacy.trials": 4}).privacy)


# --- the planner's table, and the docs' table against it ---------------------------------------


def test_the_planner_prints_sigma_for_k_trials(capsys):
    planner(["--epsilon", "3", "--examples", str(N), "--batch-size", str(BATCH),
             "--rounds", str(ROUNDS), "--local-steps", str(LOCAL), "--trials", "1,4"])
    out = capsys.readouterr().out
    assert "plain composition" in out
    row = re.search(r"^\s+4\s+(\S+)\s+(\S+)x", out, re.M)
    assert float(row[1]) == pytest.approx(_sigma(4), abs=1e-4)
    assert float(row[2]) == pytest.approx(_sigma(4) / _sigma(1), abs=0.01)


@pytest.mark.parametrize(("argv", "message"), [
    (["--sigma", "1", "--trials", "2"], "--trials: needs --epsilon"),
    (["--epsilon", "3", "--trials", "2", "--amplification"], "--trials: plans without"),
    (["--epsilon", "3", "--trials", "0"], "each number of trials must be >= 1"),
    (["--epsilon", "3", "--trials", "2", "--recommend"], "--trials: --recommend plans one run"),
])
def test_the_planner_refuses_trials_where_they_do_not_apply(argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        planner([*argv, "--examples", "1885"])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_documented_sigma_multipliers_are_the_planners():
    text = (ROOT / "docs" / "tuning.md").read_text()
    table = re.search(r"<!-- trials-table -->\n(.*?)\n\n", text, re.S)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    q = 1 / math.ceil(1697 / 64)
    for epsilon, column in ((3.0, 1), (6.0, 3)):
        plans = plan_trials([int(r[0]) for r in rows], epsilon=epsilon, delta=DELTA,
                            sample_rate=q, steps=25)
        for row, plan in zip(rows, plans, strict=True):
            assert float(row[column]) == pytest.approx(plan.noise_multiplier, abs=5e-5)
            assert float(row[column + 1].strip(" ×")) == pytest.approx(plan.multiplier,
                                                                        abs=5e-3)


# --- through the ClientApp: a SuperNode's ledger file spans the K trials -----------------------


def test_k_trials_on_a_supernode_share_its_budget_and_the_next_run_is_refused(
        tiny_run_config, supernode):
    from tests.test_node_ledger import _context, _q, _train

    k = 3
    run_config = {**tiny_run_config, "strategy.num-rounds": 1, "privacy.trials": k}
    cfg = AppConfig.from_run_config(run_config)
    steps, q = cfg.train.local_steps, _q(cfg)
    replies = [_train(run_config, _context(run_config, run_id=40 + i)) for i in range(k)]
    assert [r[contract.STEPS] for r in replies] == [steps] * k
    sigmas = {r[contract.NOISE_MULTIPLIER] for r in replies}
    assert sigmas == {get_noise_multiplier(target_epsilon=6.0, target_delta=1e-5,
                                           sample_rate=q, steps=k * steps, accountant="rdp")}
    assert 6.0 - SPENT_TOLERANCE < replies[-1][contract.EPSILON] <= 6.0
    extra = _train(run_config, _context(run_config, run_id=50))
    assert extra[contract.BUDGET_EXHAUSTED] == 1 and extra[contract.STEPS] == 0
