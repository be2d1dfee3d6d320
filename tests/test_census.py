"""The DP label census (data.class-prior = "census"): mechanism, accounting, the node's answer."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.optimize import brentq
from scipy.stats import norm

from client import training as t
from client.app import census, train
from common import contract
from common.config import AppConfig, ConfigError
from common.data import load_partition
from privacy.accounting import calibrate_noise, epsilon_of
from privacy.census import (
    CENSUS_RECORD,
    NOISY_COUNTS,
    census_entry,
    census_prior,
    check_census_budget,
    noisy_label_counts,
)
from tests.helpers import global_arrays, train_message
from tests.test_client import NODE

ORDERS = RDPAccountant.DEFAULT_ALPHAS


def _census_message() -> Message:
    return Message(RecordDict({contract.CONFIG: ConfigRecord({})}), dst_node_id=1,
                   message_type="query.census")


def test_the_census_entry_is_the_gaussian_mechanism_in_the_accountant():
    """(σ_c, q = 1, 1 step) is Rényi DP α / (2 σ_c²) (Mironov 2017), composed by addition."""
    sigma_c, sigma, q, steps, delta = 10.0, 0.9, 1 / 59, 300, 1e-5
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma_c, steps=1, orders=ORDERS)
    np.testing.assert_allclose(rdp, np.asarray(ORDERS) / (2 * sigma_c**2), rtol=1e-12)

    # An independent composition: closed form + Opacus' subsampled Gaussian, converted once.
    total = np.asarray(ORDERS) / (2 * sigma_c**2) + compute_rdp(
        q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    expected, _ = get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    history = [census_entry(sigma_c), (sigma, q, steps)]
    assert epsilon_of("rdp", history, delta) == pytest.approx(expected, rel=1e-12)
    assert epsilon_of("rdp", history, delta) > epsilon_of("rdp", history[1:], delta)
    # the PRV accountant takes the q = 1 entry too: tighter than RDP, and more than without it
    assert epsilon_of("prv", history[1:], delta) < epsilon_of("prv", history, delta) < expected


@pytest.mark.parametrize("sigma_c", [1.0, 10.0])
def test_the_census_alone_is_the_exact_epsilon_of_the_gaussian_mechanism(sigma_c):
    """Against Balle & Wang (2018): δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ), Δ = 1."""
    delta = 1e-5

    def exact_delta(eps: float) -> float:
        return (norm.cdf(1 / (2 * sigma_c) - eps * sigma_c)
                - math.exp(eps) * norm.cdf(-1 / (2 * sigma_c) - eps * sigma_c))

    exact = brentq(lambda e: exact_delta(e) - delta, 1e-9, 50)
    assert epsilon_of("prv", [census_entry(sigma_c)], delta) == pytest.approx(exact, abs=0.02)
    assert epsilon_of("rdp", [census_entry(sigma_c)], delta) >= exact  # RDP: an upper bound


def test_noisy_counts_are_the_counts_plus_gaussian_noise_of_std_sigma():
    labels = [0, 0, 2, 2, 2]
    assert noisy_label_counts(labels, 4, 0.0).tolist() == [2.0, 0.0, 3.0, 0.0]  # no DP: exact
    rng = np.random.default_rng(0)
    draws = np.stack([noisy_label_counts(labels, 4, 5.0, rng) for _ in range(20_000)])
    np.testing.assert_allclose(draws.mean(0), [2, 0, 3, 0], atol=0.15)  # 4 standard errors
    np.testing.assert_allclose(draws.std(0), 5.0, rtol=0.03)
    with pytest.raises(ValueError, match="outside"):
        noisy_label_counts([0, 4], 4, 1.0)
    with pytest.raises(ValueError, match="finite"):
        noisy_label_counts([0], 4, -1.0)


def test_the_noise_comes_from_the_operating_system_not_from_a_seed():
    np.random.seed(0)
    first = noisy_label_counts([0, 1, 1], 2, 10.0)
    np.random.seed(0)  # numpy's global seed (and the run's seed) does not decide it
    assert not np.array_equal(first, noisy_label_counts([0, 1, 1], 2, 10.0))


def test_the_prior_is_the_floored_normalised_sum_of_the_answers():
    shares = census_prior([[30.0, -4.0, 10.0], [10.0, 2.5, 9.0]], ["a", "b", "c"])
    # sums 40, −1.5 → floored at 1, 19
    assert shares == pytest.approx({"a": 40 / 60, "b": 1 / 60, "c": 19 / 60})
    with pytest.raises(ValueError, match="no node"):
        census_prior([], ["a", "b"])
    with pytest.raises(ValueError, match="2 counts for 3 classes"):
        census_prior([[1.0, 2.0]], ["a", "b", "c"])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_sigma_is_calibrated_after_the_census_for_the_census_and_every_step(accountant):
    q, steps, delta, target = 1 / 59, 300, 1e-5, 3.0
    spent = [census_entry(10.0)]
    plain = calibrate_noise(target_epsilon=target, target_delta=delta, sample_rate=q,
                            steps=steps, accountant=accountant)
    after = calibrate_noise(target_epsilon=target, target_delta=delta, sample_rate=q,
                            steps=steps, accountant=accountant, spent=spent)
    assert after > plain
    reached = epsilon_of(accountant, spent + [(after, q, steps)], delta)
    assert target - 0.01 <= reached <= target  # Opacus' tolerance, never above
    assert epsilon_of(accountant, spent + [(0.98 * after, q, steps)], delta) > target
    with pytest.raises(ValueError, match="already spends"):
        calibrate_noise(target_epsilon=0.1, target_delta=delta, sample_rate=q, steps=steps,
                        accountant=accountant, spent=[census_entry(1.0)])


def test_config_takes_census_and_refuses_a_census_that_leaves_no_budget(tiny_run_config):
    cfg = AppConfig.from_run_config({**tiny_run_config, "data.class-prior": "census"})
    assert cfg.data.class_prior_census and cfg.data.declared_prior == {}
    check_census_budget(cfg.privacy)  # σ_c = 10 at ε = 6: about 0.4 alone
    with pytest.raises(ConfigError, match="privacy.census-noise-multiplier"):
        AppConfig.from_run_config({**tiny_run_config, "privacy.census-noise-multiplier": 0.0})
    greedy = AppConfig.from_run_config({**tiny_run_config, "data.class-prior": "census",
                                        "privacy.census-noise-multiplier": 0.5,
                                        "privacy.epsilon": 1.0})
    with pytest.raises(ConfigError, match=r"census alone spends ε = .* of privacy.epsilon=1.0"):
        check_census_budget(greedy.privacy)


def test_a_node_answers_one_census_counts_it_and_trains_within_the_budget_after_it(
        tiny_run_config):
    run_config = {**tiny_run_config, "data.class-prior": "census"}
    cfg = AppConfig.from_run_config(run_config)
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=run_config)
    reply = census(_census_message(), context)
    counts = reply.content.config_records[CENSUS_RECORD][NOISY_COUNTS]
    train_split, _ = load_partition(cfg.data, cfg.seed, 0, 2)
    true = np.bincount(train_split["label"], minlength=3)
    assert len(counts) == 3 and not np.array_equal(counts, true)  # noised
    assert np.abs(np.asarray(counts) - true).max() < 6 * 10.0  # σ_c = 10
    ledger, sigma = t.load_ledger(context, cfg.privacy.accountant)
    assert ledger.history == [census_entry(10.0)] and sigma is None
    census_eps = reply.content.metric_records[contract.METRICS][contract.EPSILON]
    assert census_eps == pytest.approx(epsilon_of("rdp", [census_entry(10.0)], 1e-5))

    with pytest.raises(ValueError, match="refuses the census: its privacy ledger already"):
        census(_census_message(), context)  # a second release could average the noise away

    # Every round trains, and the last stays within ε with the census counted.
    data = t.load_local_data(cfg, 0, 2)
    arrays = global_arrays(cfg, data.num_labels)
    q = 1 / math.ceil(len(data.train) / cfg.train.batch_size)
    total = cfg.strategy.num_rounds * cfg.train.local_steps
    for _ in range(cfg.strategy.num_rounds):
        metrics = train(train_message(arrays), context).content[contract.METRICS]
        assert metrics[contract.BUDGET_EXHAUSTED] == 0
    noise = metrics[contract.NOISE_MULTIPLIER]
    assert noise == pytest.approx(calibrate_noise(
        target_epsilon=6.0, target_delta=1e-5, sample_rate=q, steps=total,
        spent=[census_entry(10.0)]))
    expected = epsilon_of("rdp", [census_entry(10.0), (noise, q, total)], 1e-5)
    assert metrics[contract.EPSILON] == pytest.approx(expected, rel=1e-9)
    assert 6.0 - 0.01 <= metrics[contract.EPSILON] <= 6.0
    with pytest.raises(ValueError, match="already holds"):
        census(_census_message(), context)


def test_a_run_without_census_or_without_dp(tiny_run_config):
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=tiny_run_config)
    with pytest.raises(ValueError, match="this run has no census"):
        census(_census_message(), context)
    public = {**tiny_run_config, "data.class-prior": "census", "privacy.epsilon": math.inf}
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=public)
    reply = census(_census_message(), context).content
    counts = reply.config_records[CENSUS_RECORD][NOISY_COUNTS]
    assert reply.metric_records[contract.METRICS][contract.EPSILON] == math.inf  # as train's
    cfg = AppConfig.from_run_config(public)
    train_split, _ = load_partition(cfg.data, cfg.seed, 0, 2)
    assert counts == np.bincount(train_split["label"], minlength=3).astype(float).tolist()


def test_a_resumed_run_reads_back_the_prior_of_its_census(tiny_run_config, tmp_path):
    import json

    from server.census import CensusFailed, take_census

    cfg = AppConfig.from_run_config({**tiny_run_config, "data.class-prior": "census",
                                     "output.resume": True})

    def resumed_census() -> dict[str, float]:
        return take_census(None, cfg.strategy, ["space", "sport", "tech"],  # type: ignore[arg-type]
                           tmp_path, resume=cfg.output.resume,
                           noise_multiplier=cfg.privacy.census_noise)

    with pytest.raises(CensusFailed, match="class-prior.json is missing"):
        resumed_census()
    shares = {"space": 0.2, "sport": 0.3, "tech": 0.5}
    (tmp_path / "class-prior.json").write_text(json.dumps({"shares": shares}))
    assert resumed_census() == shares


def test_census_spread_simulates_the_prior_of_a_file_and_refuses_bad_config(tiny_run_config,
                                                                           capsys):
    from common.run_config import override_text
    from simulations.census_spread import main

    keys = ("data.source", "data.text-column", "data.label-column", "data.partitioner")
    overrides = override_text({k: tiny_run_config[k] for k in keys})
    assert main(["--run-config", overrides, "--num-nodes", "3", "--draws", "200"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| s")
            or line.startswith("| t")]
    assert [r[0].strip("| ") for r in rows] == ["space", "sport", "tech"]
    assert sum(float(r[1]) for r in rows) == pytest.approx(1.0, abs=1e-3)  # true shares
    assert "ε = 0.375 at δ = 1e-05 alone" in out  # σ_c = 10, rdp (test above: exact 0.35)
    assert main(["--run-config", "privacy.census-noise-multiplier=-1"]) == 2
    assert "privacy.census-noise-multiplier=-1.0" in capsys.readouterr().err


def test_a_node_refuses_a_census_that_alone_would_spend_its_budget(tiny_run_config):
    greedy = {**tiny_run_config, "data.class-prior": "census",
              "privacy.census-noise-multiplier": 0.5, "privacy.epsilon": 1.0}
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=greedy)
    with pytest.raises(ConfigError, match="census alone spends"):
        census(_census_message(), context)
    assert t.load_ledger(context, "rdp")[0].history == []  # nothing released, nothing counted
