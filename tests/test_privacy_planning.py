"""The privacy planner against Opacus' own accountants and noise calibration."""

import math
import time

import pytest
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from common.config import AppConfig, ConfigError, PrivacyConfig
from privacy.accounting import calibrate_noise, epsilon_of
from privacy.planning import (
    ORDERS,
    Schedule,
    batch_options,
    epsilon_curve,
    main,
    plan_noise,
)
from privacy.policy import check_delta, sample_rate
from privacy.reach import LARGEST_NOISE, check_reachable, noise_above_bound, shortfall

DELTA = 1e-5


def test_sample_rate_is_the_rate_of_opacus_dp_data_loader():
    assert sample_rate(1885, 32) == 1 / 59
    assert sample_rate(32, 32) == 1.0
    with pytest.raises(ValueError, match="0 training examples"):
        sample_rate(0, 32)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_equals_opacus_get_noise_multiplier(accountant):
    s = Schedule(sample_rate(1885, 32), local_steps=10, rounds=10, accountant=accountant)
    want = get_noise_multiplier(target_epsilon=6.0, target_delta=DELTA, sample_rate=1 / 59,
                                steps=100, accountant=accountant)
    assert plan_noise(6.0, s, DELTA) == pytest.approx(want)


def test_curve_equals_an_independent_accountant_stepped_round_by_round():
    s = Schedule(1 / 59, local_steps=10, rounds=5)
    curve = epsilon_curve(1.1, s, DELTA)
    acc = RDPAccountant()
    for r in range(5):
        for _ in range(10):
            acc.step(noise_multiplier=1.1, sample_rate=1 / 59)
        assert curve[r] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert curve == sorted(curve)


def test_planned_sigma_meets_the_budget_at_the_last_round():
    s = Schedule(1 / 59, local_steps=10, rounds=10)
    sigma = plan_noise(3.0, s, DELTA)
    assert epsilon_curve(sigma, s, DELTA)[-1] <= 3.0
    assert epsilon_curve(sigma * 0.98, s, DELTA)[-1] > 3.0


def test_amplification_with_participation_one_is_the_plain_rdp_plan():
    plain = Schedule(1 / 59, 10, 10)
    amp = Schedule(1 / 59, 10, 10, participation=1.0, amplification=True)
    assert epsilon_curve(1.0, amp, DELTA) == pytest.approx(epsilon_curve(1.0, plain, DELTA))


def test_amplification_is_sound_and_helps():
    """One step per round: the round mechanism includes a record with probability p·q, whose
    exact RDP (Opacus' subsampled Gaussian) must lower-bound our convexity bound."""
    p, q, sigma = 0.3, 0.05, 1.0
    ours = epsilon_curve(sigma, Schedule(q, 1, 20, participation=p, amplification=True), DELTA)
    exact = get_privacy_spent(orders=ORDERS, delta=DELTA,
                              rdp=compute_rdp(q=p * q, noise_multiplier=sigma, steps=20,
                                              orders=ORDERS))[0]
    plain = epsilon_curve(sigma, Schedule(q, 1, 20), DELTA)
    assert exact <= ours[-1] < plain[-1]
    smaller = epsilon_curve(sigma, Schedule(q, 1, 20, participation=0.1, amplification=True),
                            DELTA)
    assert smaller[-1] < ours[-1]


def test_amplified_plan_needs_less_noise_and_meets_the_budget():
    s = Schedule(1 / 59, 10, 10, participation=0.5, amplification=True)
    sigma = plan_noise(6.0, s, DELTA)
    assert epsilon_curve(sigma, s, DELTA)[-1] <= 6.0
    assert sigma < plan_noise(6.0, Schedule(1 / 59, 10, 10), DELTA)


def test_no_noise_is_infinite_epsilon_and_inf_budget_is_no_noise():
    s = Schedule(0.1, 1, 3)
    assert epsilon_curve(0.0, s, DELTA) == [math.inf] * 3
    assert plan_noise(math.inf, s, DELTA) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"sample_rate": 0.0}, "sample_rate=0.0"),
    ({"participation": 1.5}, "participation=1.5"),
    ({"accountant": "prv", "amplification": True}, "only implemented for 'rdp'"),
    ({"rounds": 0}, "rounds=0"),
])
def test_bad_schedules_name_the_value(kwargs, match):
    args = {"sample_rate": 0.1, "local_steps": 1, "rounds": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        Schedule(**args)


def test_cli_prints_sigma_and_the_curve(capsys):
    main(["--epsilon", "6", "--examples", "1885", "--rounds", "3", "--participation", "0.5",
          "--batch-size", "32", "--local-steps", "10"])
    out = capsys.readouterr().out
    sigma = plan_noise(6.0, Schedule(1 / 59, 10, 3), DELTA)
    assert f"σ = {sigma:.4f}" in out
    assert out.count("\n") >= 6 and "expected rounds sampled" in out
    acc = create_accountant("rdp")
    acc.history = [(sigma, 1 / 59, 30)]
    assert f"{acc.get_epsilon(DELTA):.4f}" in out


@pytest.mark.parametrize("sigma", [-1.0, math.inf, math.nan])
def test_curve_refuses_a_sigma_opacus_cannot_account(sigma):
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        epsilon_curve(sigma, Schedule(0.1, 1, 1), DELTA)


def refusal(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(["--examples", "1885", *argv])
    captured = capsys.readouterr()
    assert captured.out == ""
    return exc.value.code, captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "6", "--delta", "0.5"],
     "--delta 0.5: must be < 1/n = 0.000531 (n = 1885 training examples of this client)"),
    (["--sigma", "1.1", "--delta", "0.001"], "--delta 0.001: must be < 1/n = 0.000531"),
    (["--epsilon", "0"], "--epsilon 0.0: must be > 0 (or inf)"),
    (["--epsilon", "-1"], "--epsilon -1.0: must be > 0"),
    (["--epsilon", "nan"], "--epsilon nan: must be > 0"),
    (["--epsilon", "6", "--delta", "0"], "--delta 0.0: must be in (0, 1)"),
    (["--epsilon", "inf", "--delta", "1"], "--delta 1.0: must be in (0, 1)"),
    (["--sigma", "inf"], "--sigma inf: must be finite and >= 0"),
    (["--sigma", "nan"], "--sigma nan: must be finite and >= 0"),
    (["--sigma", "-1"], "--sigma -1.0: must be finite and >= 0"),
    (["--epsilon", "6", "--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--epsilon", "6", "--local-steps", "0"], "--local-steps 0: must be >= 1"),
    (["--epsilon", "6", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--epsilon", "6", "--batch-size", "4000"], "--examples 1885: fewer than one batch "
     "(--batch-size 4000)"),
    (["--epsilon", "6", "--participation", "1.5"], "--participation 1.5: must be in (0, 1]"),
])
def test_cli_refuses_what_training_refuses_naming_flag_and_value(capsys, argv, message):
    code, last = refusal(capsys, *argv)
    assert code == 2
    assert last.startswith("python -m privacy.planning: error: ") and message in last, last


def test_cli_delta_rule_is_training_s_own(capsys):
    """The same δ as a client's check_delta: refused iff a client of n examples refuses it."""
    with pytest.raises(ConfigError):
        check_delta(1 / 1885, 1885, "partition 0")
    assert refusal(capsys, "--epsilon", "6", "--delta", str(1 / 1885))[0] == 2
    check_delta(0.0005, 1885, "partition 0")
    main(["--examples", "1885", "--epsilon", "6", "--delta", "0.0005", "--rounds", "1"])
    assert "σ = " in capsys.readouterr().out


def test_cli_delta_of_a_non_private_plan_is_not_held_to_one_over_n(capsys):
    # clients check δ < 1/n only with a finite ε: no noise, nothing for δ to bound
    for argv in (["--epsilon", "inf"], ["--sigma", "0"]):
        main(["--examples", "1885", *argv, "--delta", "0.5", "--rounds", "2"])
        assert "σ = 0.0000" in capsys.readouterr().out


def test_cli_lists_every_problem_on_the_last_line(capsys):
    code, last = refusal(capsys, "--epsilon", "-1", "--delta", "2", "--rounds", "0")
    assert code == 2
    assert all(f in last for f in ("--epsilon -1.0", "--delta 2.0", "--rounds 0")), last


def test_batch_options_keep_the_compute_and_the_budget():
    options = batch_options(3.0, 1700, [16, 32, 64], reference_batch=32, reference_steps=10,
                            rounds=30, delta=1e-5)
    assert [(o.batch_size, o.local_steps) for o in options] == [(16, 20), (32, 10), (64, 5)]
    for o in options:  # each σ is the plan of its own schedule, spent exactly to the budget
        assert o.sample_rate == sample_rate(1700, o.batch_size)
        assert o.noise_multiplier == pytest.approx(get_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-5, sample_rate=o.sample_rate,
            steps=30 * o.local_steps, accountant="rdp", epsilon_tolerance=0.01), rel=0.02)
        assert o.round_noise == o.noise_multiplier / (o.batch_size * math.sqrt(o.local_steps))
    # σ grows slower than B in this regime, so at equal compute larger batches cost less noise
    assert options[0].round_noise > options[1].round_noise > options[2].round_noise


def test_cli_compares_batch_sizes_and_refuses_them_without_a_budget(capsys):
    main(["--epsilon", "3", "--examples", "1700", "--rounds", "30", "--batch-sizes", "16,32,64",
          "--batch-size", "32", "--local-steps", "10"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()[:2].isdigit()]
    assert [row[:3] for row in rows] == [["16", "20", "320"], ["32", "10", "320"],
                                        ["64", "5", "320"]]
    assert rows[1][6] == "1.00x" and rows[2][-3:] == ["<-", "least", "noise"]
    with pytest.raises(SystemExit) as refused:
        main(["--sigma", "1", "--examples", "1700", "--batch-sizes", "16,32"])
    assert refused.value.code == 2
    assert "--batch-sizes: needs --epsilon" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["--epsilon", "3", "--examples", "100", "--batch-sizes", "16,512"])
    assert "--batch-sizes 512: more than --examples 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--epsilon", "3", "--examples", "1700", "--batch-sizes", "16,32", "--amplification",
              "--participation", "0.5"])
    assert "--batch-sizes: compares plans without amplification" in capsys.readouterr().err
    main(["--epsilon", "3", "--examples", "1700", "--batch-sizes", "64,128",
          "--batch-size", "32", "--local-steps", "10"])  # the reference, 32, not listed
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()[:2].isdigit()]
    assert [row[0] for row in rows] == ["64", "128"] and float(rows[0][6][:-1]) < 1


def test_a_census_plan_is_what_a_client_calibrates_after_its_census(capsys):
    """σ after a census = the client's own calibration (privacy.policy.plan_round) with the
    census in its ledger; the curve composes the census with every round's steps."""
    from common.config import AppConfig
    from privacy.accounting import PrivacyLedger, epsilon_of
    from privacy.census import census_entry
    from privacy.policy import plan_round

    q = sample_rate(1885, 32)
    plain = Schedule(q, local_steps=10, rounds=30)
    census = Schedule(q, local_steps=10, rounds=30, census_noise=10.0)
    sigma = plan_noise(3.0, census, 1e-5)
    assert sigma > plan_noise(3.0, plain, 1e-5)
    cfg = AppConfig.from_run_config({"privacy.epsilon": 3.0, "train.batch-size": 32,
                                     "train.local-steps": 10, "strategy.num-rounds": 30,
                                     "data.class-prior": "census"})
    client = plan_round(cfg, PrivacyLedger("rdp", [census_entry(10.0)]), num_examples=1885,
                        noise_multiplier=None, where="a node")
    assert client.noise_multiplier == sigma
    curve = epsilon_curve(sigma, census, 1e-5)
    assert curve[-1] == pytest.approx(epsilon_of("rdp", [census_entry(10.0), (sigma, q, 300)],
                                                 1e-5), rel=1e-12)
    assert 2.99 <= curve[-1] <= 3.0 and curve[0] > epsilon_curve(sigma, plain, 1e-5)[0]

    main(["--epsilon", "3", "--examples", "1885", "--batch-size", "32", "--local-steps", "10",
          "--rounds", "30", "--census-noise-multiplier", "10"])
    out = capsys.readouterr().out
    assert "after a label census at σ_c = 10" in out and f"σ = {sigma:.4f}" in out


@pytest.mark.parametrize(("extra", "message"), [
    (["--census-noise-multiplier", "-1"], "--census-noise-multiplier -1.0: must be finite"),
    (["--census-noise-multiplier", "10", "--amplification"], "not combined with amplification"),
    (["--census-noise-multiplier", "10", "--batch-sizes", "16,32"], "without a census"),
    (["--census-noise-multiplier", "10", "--recommend"], "plans without a census"),
])
def test_cli_refuses_a_census_it_cannot_plan(capsys, extra, message):
    code, last = refusal(capsys, "--epsilon", "3", "--examples", "1885", *extra)
    assert code == 2 and message in last, last


def test_a_budget_below_what_any_sigma_reaches_is_refused_in_seconds_with_what_it_reaches(capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["--epsilon", "0.0001", "--examples", "10", "--batch-size", "5"])
    assert exc.value.code == 2 and time.monotonic() - start < 5  # Opacus alone: about 70 s
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "python -m privacy.planning: error: --epsilon 0.0001 is out of reach of --rounds 5 × "
        "--local-steps 5 steps at q = 0.5 (this client, 10 training examples, --batch-size 5): "
        f"even σ = {LARGEST_NOISE:g}, the most noise calibration tries, spends ε = 0.1029 "
        "(rdp, δ = 1e-05): no σ at all spends less than 0.1029 under rdp at δ = 1e-05; raise "
        "--epsilon above 0.1029 (or --delta), or use --accountant 'prv'")


def test_the_reach_of_a_schedule_is_where_opacus_calibration_gives_up():
    # Opacus tries σ = 20, 40, ..., 655360 and gives up past MAX_SIGMA = 1e6
    assert LARGEST_NOISE == 655360.0
    steps = 5 * 10**9  # at q = 1: the Gaussian bound is exact, and well above the floor
    short = shortfall(0.2, delta=DELTA, sample_rate=1.0, steps=steps)
    assert short is not None and not short.no_sigma
    assert short.least == pytest.approx(epsilon_of("rdp", [(LARGEST_NOISE, 1.0, steps)], DELTA))
    assert short.reason().endswith(f"it would need σ > {LARGEST_NOISE:g}")
    with pytest.raises(ValueError, match="The privacy budget is too low"):
        get_noise_multiplier(target_epsilon=0.2, target_delta=DELTA, sample_rate=1.0,
                             steps=steps)
    reachable = short.least * 1.01
    assert shortfall(reachable, delta=DELTA, sample_rate=1.0, steps=steps) is None
    assert get_noise_multiplier(target_epsilon=reachable, target_delta=DELTA, sample_rate=1.0,
                                steps=steps) <= LARGEST_NOISE
    # ten million rounds of the default schedule are within reach: σ is large, not infinite
    assert shortfall(6.0, delta=DELTA, sample_rate=1 / 24, steps=5 * 10**7) is None


def test_a_run_whose_budget_no_sigma_meets_is_refused_naming_the_keys():
    cfg = AppConfig.from_run_config({"privacy.epsilon": 0.05})
    with pytest.raises(ConfigError) as caught:
        check_reachable(cfg, 1598, "partition 1 of 6, the smallest")
    assert caught.value.problems == [
        "privacy.epsilon=0.05 is out of reach of strategy.num-rounds=5 × train.local-steps=5 "
        "steps at q = 0.04 (partition 1 of 6, the smallest, 1598 training examples, "
        f"train.batch-size=64): even σ = {LARGEST_NOISE:g}, the most noise calibration tries, "
        "spends ε = 0.1029 (rdp, δ = 1e-05): no σ at all spends less than 0.1029 under rdp at "
        "δ = 1e-05; raise privacy.epsilon above 0.1029 (or privacy.delta), or use "
        "privacy.accountant='prv'"]
    check_reachable(AppConfig(), 1598, "partition 1 of 6")  # the default run: fine
    check_reachable(AppConfig.from_run_config({"privacy.epsilon": math.inf}), 1, "any")


def _needs(rounds: int, q: float = 0.04) -> float:
    return calibrate_noise(target_epsilon=6.0, target_delta=DELTA, sample_rate=q,
                           steps=5 * rounds)


def test_a_schedule_needing_more_noise_than_the_bound_is_refused_with_its_sigma():
    cfg = AppConfig.from_run_config({"strategy.num-rounds": 10**9})
    with pytest.raises(ConfigError) as caught:
        check_reachable(cfg, 1598, "partition 1 of 6, the smallest")
    [problem] = caught.value.problems
    assert problem.startswith("strategy.num-rounds=1000000000 × train.local-steps=5 steps at "
                              "q = 0.04 (partition 1 of 6, the smallest")
    assert f"need σ = {_needs(10**9):.4g} for privacy.epsilon=6.0" in problem
    assert "above privacy.max-noise-multiplier=50.0" in problem
    unbounded = AppConfig.from_run_config({"strategy.num-rounds": 10**9,
                                           "privacy.max-noise-multiplier": math.inf})
    check_reachable(unbounded, 1598, "partition 1 of 6")  # inf: no bound


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_noise_bound_sits_where_the_needed_sigma_crosses_it(accountant):
    """The adaptive case: a bound just above the σ a schedule needs passes, just below refuses."""
    rounds = 200_000
    sigma = _needs(rounds)
    for bound, refused in ((sigma * 1.01, False), (sigma * 0.99, True)):
        privacy = PrivacyConfig(accountant=accountant, max_noise_multiplier=bound)
        assert (noise_above_bound(privacy, sample_rate=0.04, steps=5 * rounds) is not None) \
            == refused
    assert noise_above_bound(PrivacyConfig(epsilon=math.inf, max_noise_multiplier=1e-3),
                             sample_rate=0.04, steps=5) is None  # no DP: no noise at all
