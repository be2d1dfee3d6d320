"""One attacker among three cannot steer the aggregate; two colluders cannot inflate it.

Fake replies of :mod:`benchmarks.fake_federation`: the default run's shapes, honest updates
with the DP noise a client of the default run adds (ε = 6), at round 1 (B = 0) and after 5
rounds. The sizes of the honest clients are those of the default Dirichlet(0.5) split.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from benchmarks import fake_federation as ff
from common import contract
from common.config import DataConfig
from strategies import FedSVD, FFALoRA
from tests.helpers import FakeGrid

ROUNDS_BEFORE = (0, 5)  # round 1 (B = 0), and after 5 rounds of training


@pytest.fixture(scope="module")
def dirichlet_sizes() -> list[int]:
    """Training examples of partitions 0..3 of the default split (6 partitions, seed 0)."""
    from common.data import load_partition

    return [len(load_partition(DataConfig(), 0, i, 6)[0]) for i in range(4)]


def _run_round(strategy, fake: ff.FakeRound, replies: list, server_round: int = 2):
    record = ArrayRecord({k: Array(v) for k, v in fake.sent.items()})
    list(strategy.configure_train(server_round, record, ConfigRecord(), FakeGrid(len(replies))))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict(), metrics


def _product_update(state: dict, fake: ff.FakeRound) -> np.ndarray:
    """ΔW of every layer, B′A′ − B_sent A_sent, flattened (what the model function sees)."""
    parts = []
    for m in ff.LAYERS:
        new = state[ff.b_key(m)].double() @ state[ff.a_key(m)].double()
        old = torch.from_numpy(fake.sent[ff.b_key(m)]).double() @ torch.from_numpy(
            fake.sent[ff.a_key(m)]).double()
        parts.append((new - old).ravel().numpy())
    return np.concatenate(parts)


def _honest_product_update(honest: list, sizes: list[int], fake: ff.FakeRound) -> np.ndarray:
    mean = ff.weighted_mean(honest, sizes)
    return np.concatenate([((mean[ff.b_key(m)] - fake.sent[ff.b_key(m)])
                            @ fake.sent[ff.a_key(m)].astype(np.float64)).ravel()
                           for m in ff.LAYERS])


def _head_update(arrays: dict, fake: ff.FakeRound) -> np.ndarray:
    return np.concatenate([(np.asarray(arrays[k], dtype=np.float64) - fake.sent[k]).ravel()
                           for k in (ff.HEAD_W, ff.HEAD_B)])


def _default_fedsvd() -> FedSVD:
    return FedSVD(ff.LAYERS, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)


@pytest.mark.parametrize("rounds_before", ROUNDS_BEFORE)
@pytest.mark.parametrize("claim", ["own", "1e7"])
@pytest.mark.parametrize("attack", sorted(ff.ATTACKS))
def test_one_attacker_among_three_cannot_steer_the_default_aggregate(attack, claim,
                                                                      rounds_before,
                                                                      dirichlet_sizes):
    # Prepare: two honest DP-noised replies and one attacker (adaptive ones search the screens)
    fake = ff.make_round(seed=len(attack) + rounds_before, rounds_before=rounds_before)
    sizes = dirichlet_sizes[:2]
    honest = [fake.honest(n) for n in sizes]
    n_hostile = dirichlet_sizes[2] if claim == "own" else 10_000_000
    hostile = ff.ATTACKS[attack](honest, fake, ff.screen_oracle(fake, honest,
                                                                 [*sizes, n_hostile]))
    replies = [ff.reply(k + 1, arrays, n) for k, (arrays, n) in
               enumerate(zip([*honest, hostile], [*sizes, n_hostile], strict=True))]
    # Execute: FedSVD with every default
    state, metrics = _run_round(_default_fedsvd(), fake, replies)
    # Assert: the model's update points where the honest clients' does, at no larger a norm
    got, want = _product_update(state, fake), _honest_product_update(honest, sizes, fake)
    assert ff.cosine(got, want) >= 0.7
    assert np.linalg.norm(got) / np.linalg.norm(want) <= 1.5
    got_head = _head_update({k: state[k].numpy() for k in (ff.HEAD_W, ff.HEAD_B)}, fake)
    want_head = _head_update(ff.weighted_mean(honest, sizes), fake)
    assert ff.cosine(got_head, want_head) >= 0.7
    assert np.linalg.norm(got_head) / np.linalg.norm(want_head) <= 1.5
    assert metrics["clients-trained"] + metrics["replies-rejected"] == 3


@pytest.mark.parametrize("rounds_before", ROUNDS_BEFORE)
@pytest.mark.parametrize("claim", ["own", "1e7"])
@pytest.mark.parametrize("kind", ["identical -3x", "identical -5x", "adaptive"])
def test_two_colluders_among_five_reject_no_honest_reply_and_cannot_inflate_the_update(
        kind, claim, rounds_before, dirichlet_sizes):
    # Prepare: three honest replies, two colluders
    fake = ff.make_round(seed=len(kind) + rounds_before, rounds_before=rounds_before)
    sizes = dirichlet_sizes[:3]
    honest = [fake.honest(n) for n in sizes]
    n_hostile = dirichlet_sizes[3] if claim == "own" else 10_000_000
    all_sizes = [*sizes, n_hostile, n_hostile]
    if kind == "adaptive":
        hostile = ff.adaptive_colluders(honest, fake, ff.screen_oracle(fake, honest, all_sizes))
    else:
        hostile = ff.colluders(honest, fake, float(kind.split()[1].strip("-x")))
    replies = [ff.reply(k + 1, arrays, n) for k, (arrays, n) in
               enumerate(zip([*honest, *hostile], all_sizes, strict=True))]
    strategy = _default_fedsvd()
    # Execute
    state, metrics = _run_round(strategy, fake, replies)
    # Assert: no honest reply rejected; the update no larger than the honest one's
    screening = strategy.validator(strategy._global, 2).screen(replies)
    assert not {r.node_id for r in screening.rejected} & {1, 2, 3}
    got, want = _product_update(state, fake), _honest_product_update(honest, sizes, fake)
    assert np.linalg.norm(got) / np.linalg.norm(want) <= 1.5


@pytest.mark.parametrize("rounds_before", ROUNDS_BEFORE)
@pytest.mark.parametrize("count", [3, 4])
def test_honest_replies_keep_the_plain_weighted_mean_direction(count, rounds_before,
                                                               dirichlet_sizes):
    fake = ff.make_round(seed=11 + count, rounds_before=rounds_before)
    sizes = dirichlet_sizes[:count]
    honest = [fake.honest(n) for n in sizes]
    replies = [ff.reply(k + 1, arrays, n) for k, (arrays, n) in
               enumerate(zip(honest, sizes, strict=True))]
    state, metrics = _run_round(_default_fedsvd(), fake, replies)
    got, want = _product_update(state, fake), _honest_product_update(honest, sizes, fake)
    assert metrics["replies-rejected"] == 0 and metrics["clients-trained"] == count
    assert ff.cosine(got, want) >= 0.99
    assert 0.95 <= np.linalg.norm(got) / np.linalg.norm(want) <= 1.05


def test_with_bounds_off_honest_replies_are_exactly_the_weighted_mean(dirichlet_sizes):
    fake = ff.make_round(seed=11, rounds_before=5)
    honest = [fake.honest(n) for n in dirichlet_sizes]
    replies = [ff.reply(k + 1, arrays, n) for k, (arrays, n) in
               enumerate(zip(honest, dirichlet_sizes, strict=True))]
    state, metrics = _run_round(FFALoRA(ff.LAYERS, fraction_train=1.0, min_train_nodes=1,
                                        min_available_nodes=1, max_weight_ratio=0.0,
                                        bound_updates=False), fake, replies)
    mean = ff.weighted_mean(honest, dirichlet_sizes)
    assert metrics["replies-rejected"] == 0 and metrics["weights-capped"] == 0
    assert max(float(np.abs(state[k].double().numpy() - mean[k]).max()) for k in mean) <= 1e-6


def test_two_honest_replies_of_unequal_partitions_are_both_kept(dirichlet_sizes):
    """Different n give different σ and noise; neither is judged an outlier of the other."""
    fake = ff.make_round(seed=3, rounds_before=5)
    sizes = [min(dirichlet_sizes), 2 * max(dirichlet_sizes)]
    replies = [ff.reply(k + 1, fake.honest(n), n) for k, n in enumerate(sizes)]
    _, metrics = _run_round(FedSVD(ff.LAYERS, fraction_train=1.0, min_train_nodes=1,
                                   min_available_nodes=1), fake, replies)
    assert metrics["replies-rejected"] == 0 and metrics["clients-trained"] == 2


FLOWER = {"trimmed-mean": lambda: FedTrimmedAvg(beta=0.25), "median": FedMedian,
          "krum": lambda: Krum(num_malicious_nodes=1),
          "multi-krum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4)}


@pytest.mark.parametrize("aggregation", sorted(FLOWER))
def test_robust_aggregators_are_flowers_own_and_fedsvd_stays_exact(aggregation,
                                                                   dirichlet_sizes):
    # Prepare: five honest replies (multi-krum keeps 5 − f = 4 of them)
    fake = ff.make_round(seed=5, rounds_before=5)
    sizes = [*dirichlet_sizes, dirichlet_sizes[0]]
    honest = [fake.honest(n) for n in sizes]
    replies = [ff.reply(k + 1, arrays, n) for k, (arrays, n) in
               enumerate(zip(honest, sizes, strict=True))]
    strategy = FedSVD(ff.LAYERS, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                      aggregation=aggregation, trim_fraction=0.25, num_malicious=1,
                      max_weight_ratio=0.0, bound_updates=False)
    # Execute
    state, _ = _run_round(strategy, fake, replies)
    flower, _ = FLOWER[aggregation]().aggregate_train(2, [ff.reply(k + 1, a, n) for k, (a, n) in
                                                         enumerate(zip(honest, sizes,
                                                                       strict=True))])
    # Assert: B′A′ = B̄ A_sent for Flower's B̄, and the head is Flower's; the replies are intact
    for m in ff.LAYERS:
        expected = flower[ff.b_key(m)].numpy().astype(np.float64) @ fake.sent[ff.a_key(m)]
        got = state[ff.b_key(m)].double().numpy() @ state[ff.a_key(m)].double().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(state[ff.HEAD_W].numpy(), flower[ff.HEAD_W].numpy(), atol=1e-6)
    assert all(len(r.content[contract.ARRAYS]) == len(fake.trained) for r in replies)


def test_robust_aggregation_is_refused_for_methods_that_need_every_product():
    from common.config import AppConfig, ConfigError

    with pytest.raises(ConfigError, match="strategy.aggregation='median'"):
        AppConfig.from_run_config({"strategy.name": "flora", "strategy.aggregation": "median"})


def test_the_direction_screen_is_for_private_runs_only(tiny_run_config):
    """Without DP noise honest clients may disagree in earnest (seen: head updates at cosine
    −0.73 on the tiny IID task at ε = inf), so the ServerApp turns the screen off there."""
    from common.adapter import AdapterLayout
    from common.config import AppConfig
    from common.model import build_model
    from strategies.registry import build_strategy

    for epsilon, expected in ((6.0, -0.5), (math.inf, -1.0)):
        cfg = AppConfig.from_run_config({**tiny_run_config, "privacy.epsilon": epsilon,
                                         "train.deterministic": math.isinf(epsilon)})
        layout = AdapterLayout.from_model(build_model(cfg.model, cfg.lora, num_labels=3,
                                                      seed=0))
        assert build_strategy(cfg, layout).min_update_cosine == expected
