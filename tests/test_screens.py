"""The outlier screens reject at most f replies and never a majority; the bounds cap the rest."""

import math

import numpy as np
import pytest

from benchmarks import fake_federation as ff
from common import contract
from strategies.aggregation import bound_units, bound_updates, cap_weights
from strategies.screens import UpdateScreens
from strategies.validation import ArraySpec, ReplyValidator

SPECS = {k: ArraySpec(shape, "float32") for k, shape in
         [*((ff.b_key(m), (ff.D, ff.R)) for m in ff.LAYERS), (ff.HEAD_W, (ff.CLASSES, ff.D)),
          (ff.HEAD_B, (ff.CLASSES,))]}


def _validator(fake: ff.FakeRound, **kwargs) -> ReplyValidator:
    return ReplyValidator(SPECS, sent={k: fake.sent[k].astype(np.float64) for k in SPECS},
                          **kwargs)


def _replies(arrays: list[dict], sizes: list[int]) -> list:
    return [ff.reply(k + 1, a, n) for k, (a, n) in enumerate(zip(arrays, sizes, strict=True))]


@pytest.mark.parametrize("scale", [3.0, 5.0])
@pytest.mark.parametrize("rounds_before", [0, 5])
def test_two_colluders_among_five_never_get_an_honest_reply_rejected(scale, rounds_before):
    # Prepare: three honest DP-noised replies, two identical colluders flipping their mean
    fake = ff.make_round(seed=int(scale) + rounds_before, rounds_before=rounds_before)
    honest = [fake.honest(n) for n in (2046, 1598, 1911)]
    hostile = ff.colluders(honest, fake, scale)
    # Execute
    screening = _validator(fake).screen(_replies([*honest, *hostile],
                                                 [2046, 1598, 1911, 1912, 1912]))
    # Assert: one colluder rejected (f = 1; as a twin, or as erasing the head), no honest reply
    [rejection] = screening.rejected
    assert rejection.node_id == 4
    assert any(why in rejection.reason for why in ("is a twin of", "erases the global model"))
    assert {m.metadata.src_node_id for m in screening.valid} == {1, 2, 3, 5}


def test_identical_colluders_are_twins_and_one_is_rejected():
    fake = ff.make_round(seed=9, rounds_before=0)
    honest = [fake.honest(n) for n in (2046, 1598, 1911)]
    hostile = ff.colluders(honest, fake, 3.0)
    for pair in (hostile, [{k: v for k, v in hostile[0].items()}] * 2):
        screening = ReplyValidator(
            {k: v for k, v in SPECS.items() if not contract.is_head_key(k)},
            sent={k: fake.sent[k].astype(np.float64) for k in SPECS
                  if not contract.is_head_key(k)}).screen(_replies(
                [*({k: v for k, v in a.items() if not contract.is_head_key(k)}
                   for a in [*honest, *pair])], [2046, 1598, 1911, 1912, 1912]))
        [rejection] = screening.rejected
        assert rejection.node_id == 4
        assert rejection.reason.startswith("its update of the LoRA factors is a twin of another "
                                           "reply's (cosine 1.000 > 0.5")


def test_the_mean_of_the_others_would_have_rejected_the_honest_replies():
    """Why the reference is the coordinate-wise median: against the mean of the others, two
    colluders at −3× make each honest update look opposed (cosine below −0.5)."""
    fake = ff.make_round(seed=3, rounds_before=5)
    honest = [fake.honest(n) for n in (2046, 1598, 1911)]
    hostile = ff.colluders(honest, fake, 3.0)
    updates = [ff.stacked_update(a, fake, [ff.b_key(m) for m in ff.LAYERS])
               for a in [*honest, *hostile]]
    for i in range(3):
        others = np.mean([u for j, u in enumerate(updates) if j != i], axis=0)
        assert ff.cosine(updates[i], others) < -0.5
        median = np.median(np.stack(updates), axis=0)
        assert ff.cosine(updates[i], median) > -0.5


def test_the_screens_reject_at_most_f_and_list_the_suspects_they_keep():
    fake = ff.make_round(seed=4, rounds_before=5)
    honest = [fake.honest(n) for n in (2046, 1598, 1911)]
    blown = [{k: (fake.sent[k] + factor * (v - fake.sent[k])).astype(np.float32)
              for k, v in fake.honest(2000).items()} for factor in (100.0, 1000.0)]
    screening = _validator(fake).screen(_replies([*honest, *blown], [2000] * 5))
    assert [r.node_id for r in screening.rejected] == [5]  # the worst first, then the budget
    assert [r.node_id for r in screening.suspects_kept] == [4]
    assert "changes by" in screening.suspects_kept[0].reason
    two = _validator(fake, num_malicious=2).screen(_replies([*honest, *blown], [2000] * 5))
    assert sorted(r.node_id for r in two.rejected) == [4, 5] and two.suspects_kept == []


def test_never_more_than_half_even_when_f_allows_it():
    fake = ff.make_round(seed=5, rounds_before=5)
    honest = fake.honest(2000)
    erased = {k: np.zeros_like(fake.sent[k]) for k in fake.trained}
    screening = _validator(fake, num_malicious=5).screen(
        _replies([honest, erased, erased, erased], [2000] * 4))
    assert len(screening.rejected) == 2 and len(screening.suspects_kept) == 1  # ⌊4 / 2⌋
    assert 1 not in {r.node_id for r in [*screening.rejected, *screening.suspects_kept]}
    blown = {k: (fake.sent[k] + 100 * (v - fake.sent[k])).astype(np.float32)
             for k, v in honest.items()}
    two = _validator(fake, num_malicious=5).screen(_replies([honest, blown], [2000] * 2))
    assert [r.node_id for r in two.rejected] == [2]  # one of two is not a majority


def test_two_replies_that_oppose_each_other_are_both_kept():
    fake = ff.make_round(seed=6, rounds_before=0)
    honest = fake.honest(2000)
    flipped = {k: (fake.sent[k] - (v - fake.sent[k])).astype(np.float32)
               for k, v in honest.items()}
    screening = _validator(fake).screen(_replies([honest, flipped], [2000, 2000]))
    assert screening.rejected == [] and len(screening.valid) == 2


@pytest.mark.parametrize(("share", "flagged"), [(1.0, True), (0.999, True), (0.6, True),
                                                (0.45, False), (0.2, False)])
def test_an_update_that_erases_half_of_the_sent_state_is_rejected(share, flagged):
    fake = ff.make_round(seed=7, rounds_before=5)
    honest = [fake.honest(n) for n in (2046, 1598, 1911)]
    shrunk = {k: ((1 - share) * fake.sent[k]).astype(np.float32) for k in fake.trained}
    screening = _validator(fake).screen(_replies([*honest, shrunk], [2046, 1598, 1911, 1912]))
    reasons = [r.reason for r in screening.rejected if r.node_id == 4]
    assert bool(reasons) == flagged
    if flagged:
        assert f"removes {share:.0%} of the state it was sent" in reasons[0]
        assert reasons[0].endswith("the reply erases the global model")


@pytest.mark.parametrize("rounds_before", [0, 1, 5])
def test_honest_dp_replies_are_never_flagged(rounds_before):
    for seed in range(10):
        fake = ff.make_round(seed=100 + seed, rounds_before=rounds_before)
        sizes = [2046, 1598, 1911, 1912, 1929]
        screening = _validator(fake).screen(_replies([fake.honest(n) for n in sizes], sizes))
        assert screening.rejected == [] and screening.suspects_kept == []


def test_a_private_run_refuses_a_reply_that_claims_infinite_epsilon():
    fake = ff.make_round(seed=8)
    reply = ff.reply(1, fake.honest(2000), 2000)
    reply.content[contract.METRICS][contract.EPSILON] = math.inf
    [rejection] = _validator(fake).screen([reply]).rejected
    assert rejection.reason == ("metric 'epsilon' is inf in a private run: a client of this run "
                                "must report the finite ε its DP-SGD spent")
    assert _validator(fake, private=False).screen([reply]).rejected == []


def test_weights_are_capped_at_the_lower_median_of_the_others():
    replies = _replies([{}, {}, {}], [2046, 1598, 10_000_000])
    capped, count = cap_weights(replies, 1.0)
    assert [m.content[contract.METRICS][contract.NUM_EXAMPLES] for m in capped] == [1598] * 3
    assert count == 2 and capped[1] is replies[1]
    four = _replies([{}] * 4, [2046, 1598, 1911, 1912])
    capped, count = cap_weights(four, 1.0)
    assert [m.content[contract.METRICS][contract.NUM_EXAMPLES] for m in capped] == [
        1911, 1598, 1911, 1911]
    assert cap_weights(four, math.inf) == (four, 0)


def test_updates_are_scaled_to_the_lower_median_norm_per_unit():
    # Prepare: one large array (8 x 8) and, in the head, two small ones pooled together
    sent = {"l.lora_B": np.ones((8, 8)), contract.head_key("w"): np.zeros(3),
            contract.head_key("b"): np.zeros(2)}
    sizes = {k: v.size for k, v in sent.items()}
    units = bound_units(list(sent), sizes)
    assert units == [["l.lora_B"], [contract.head_key("w"), contract.head_key("b")]]
    direction = np.full((8, 8), 1 / 8)  # unit norm
    replies = _replies([{"l.lora_B": (1 + norm * direction).astype(np.float32),
                         contract.head_key("w"): np.full(3, norm, np.float32),
                         contract.head_key("b"): np.zeros(2, np.float32)}
                        for norm in (1.0, 2.0, 10.0, 3.0)], [10] * 4)
    # Execute
    bounded, count = bound_updates(replies, sent, units)
    # Assert: the lower median of (1, 2, 10, 3) is 2; replies under it are left as they are
    assert count == 2 and bounded[:2] == replies[:2]
    for k in (2, 3):
        arrays = bounded[k].content[contract.ARRAYS]
        b = arrays["l.lora_B"].numpy()
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, 1 + 2.0 * direction, rtol=1e-6)
        np.testing.assert_allclose(arrays[contract.head_key("w")].numpy(), np.full(3, 2.0),
                                   rtol=1e-6)
    assert replies[2].content[contract.ARRAYS]["l.lora_B"].numpy()[0, 0] == pytest.approx(
        1 + 10 / 8)  # the original reply is untouched


def test_screens_need_three_replies_to_judge_direction():
    screens = UpdateScreens(sizes={"x.lora_B": 100}, sent={}, max_norm_ratio=10.0,
                            min_update_cosine=-0.5, num_malicious=1)
    u = np.ones(100)
    assert screens.judge([{"x.lora_B": u}, {"x.lora_B": -3 * u}]).rejected == {}
    rng = np.random.default_rng(0)
    noisy = [0.3 * u + rng.normal(size=100) for _ in range(2)]  # honest: signal + noise
    verdicts = screens.judge([{"x.lora_B": noisy[0]}, {"x.lora_B": noisy[1]},
                              {"x.lora_B": -(noisy[0] + noisy[1])}])
    assert list(verdicts.rejected) == [2]
    assert "coordinate-wise median update" in verdicts.rejected[2]
