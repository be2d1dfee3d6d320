"""The robustness bench pairs plain averaging and FedAdam on the same replies.

``benchmarks.robust_aggregation_bench`` on 4 LoRA layers (the NaN attack writes the fourth) of
128 × 8, one seed: its plain-averaging numbers are those of its computation before it
took a server optimizer; under FedAdam an honest round is its own reference; the two arms of a
pair step from equal copies of one optimizer state; one persistent round is the single round.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import fake_federation as ff
from benchmarks import robust_aggregation_bench as bench

SETTINGS = {name: bench.SETTINGS[name] for name in (bench.DEFAULTS,
                                                    "mean, screens and bounds off")}


def _small(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(ff, "LAYERS", ff.LAYERS[:4])
    patch.setattr(ff, "D", 128)


@pytest.fixture(autouse=True)
def small(monkeypatch):
    _small(monkeypatch)


@pytest.fixture(scope="module")
def measured():
    """One seed, both optimizers, the default mean and the unprotected one, both moments."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as conftest's
    with pytest.MonkeyPatch.context() as patch:
        _small(patch)
        rows, _ = bench.measure(0, ("none", "adam"), SETTINGS)
    return rows


def _old_one_round(setting, fake, arrays, sizes, honest, reference):
    """The bench's round before it took a server optimizer, as it was."""
    replies = [ff.reply(k + 1, a, n) for k, (a, n) in enumerate(zip(arrays, sizes, strict=True))]
    run = ff.fedsvd_round(fake, 5, **setting)
    rejected = {r.node_id for r in run.validator(run._global, 2).screen(replies).rejected}
    new, _ = run.aggregate_train(2, replies)
    honest_rejected = len(rejected & set(range(1, honest + 1)))
    if new is None:
        return 0.0, 0.0, honest_rejected
    got = bench.product_update(new.to_torch_state_dict(), fake)
    if not np.isfinite(got).all():
        return float("nan"), float("inf"), honest_rejected
    return (ff.cosine(got, reference), float(np.linalg.norm(got) / np.linalg.norm(reference)),
            honest_rejected)


def test_plain_averaging_numbers_are_the_old_computations(measured):
    for before in bench.MOMENTS:
        fake = ff.make_round(before, rounds_before=before)  # seed 0
        for name, (arrays, sizes, honest) in bench.scenarios(fake).items():
            reference = bench.honest_update(ff.weighted_mean(arrays[:honest], sizes[:honest]),
                                            fake)
            for setting, kwargs in SETTINGS.items():
                old = _old_one_round(kwargs, fake, arrays, sizes, honest, reference)
                new = measured[name, setting, "none", before][0]
                np.testing.assert_equal(new, old, err_msg=f"{name}, {setting}, round "
                                                          f"{before + 1}")


def test_fedadam_honest_round_is_its_own_reference(measured):
    for before in bench.MOMENTS:
        for name in ("honest only, 3", "honest only, 4"):
            cos, norm, rejected = measured[name, "mean, screens and bounds off", "adam",
                                           before][0]
            assert cos == pytest.approx(1, abs=1e-6), (name, before)
            assert norm == pytest.approx(1, abs=1e-5), (name, before)
            assert rejected == 0


def test_paired_arms_step_from_equal_copies_of_one_state():
    state, optimizer, first, _ = bench.warmed(3, 2, "adam")  # moments of 2 honest rounds
    frame = bench.Frame.of(state, first)
    honest = [frame.place(u) for u in bench.updates_of(bench.draw_honest(first)[:3], first)]
    sizes = list(bench.SIZES[:3])
    mean = ff.weighted_mean(honest, sizes)
    moments = copy.deepcopy((optimizer.first, optimizer.second))
    reference = bench.reference_update(mean, frame.fake, optimizer, 3)
    row, got = bench.one_round(bench.OFF, frame.fake, honest, sizes, 3, reference, optimizer, 3)
    again, _ = bench.one_round(bench.OFF, frame.fake, honest, sizes, 3, reference, optimizer, 3)
    assert row[0] == pytest.approx(1, abs=1e-6) and row[1] == pytest.approx(1, abs=1e-5)
    assert again == row
    for kept, now in zip(moments, (optimizer.first, optimizer.second), strict=True):
        assert kept.keys() == now.keys() and all(torch.equal(kept[k], now[k]) for k in kept)
    # what a shared state would give: the reference stepped from the moments after the round
    stepped = copy.deepcopy(optimizer)
    stepped.step(3, {k: torch.from_numpy(mean[k] - frame.fake.sent[k]) for k in first.trained})
    stale = bench.reference_update(mean, frame.fake, stepped, 3)
    assert abs(np.linalg.norm(got) / np.linalg.norm(stale) - 1) > 1e-2


def test_one_persistent_round_is_the_first_single_round(measured):
    for kind in ("none", "adam"):
        one = bench.persistent(0, (kind,), 1)
        for name in ("honest only, 3", bench.ONE_OF_THREE, bench.SHRINK, bench.TWO_OF_FIVE):
            cos, norm, rejected = one[name, kind]
            single = measured[name, bench.DEFAULTS, kind, 0][0]
            assert (cos, norm) == pytest.approx(single[:2], abs=1e-4), (name, kind)
            assert rejected == single[2]


def test_markdown_has_a_column_pair_per_optimizer(measured):
    multi = {(name, kind): [(0.5, 1.2, 0)] for name in (bench.ONE_OF_THREE, bench.TWO_OF_FIVE)
             for kind in ("none", "adam")}
    text = bench.markdown(bench.pooled(measured), multi, 5)
    tables = [part.splitlines() for part in text.split("\n\n")]
    assert len(tables) == 3
    assert tables[0][0] == ("| scenario (the mean with the default screens and bounds) "
                            "| cos, plain | norm, plain | cos, FedAdam | norm, FedAdam "
                            "| honest rejected |")
    assert "| mean, defaults, plain | mean, defaults, FedAdam |" in tables[1][0]
    assert tables[2][1:] == ["|---|---|---|---|---|---|",
                             f"| {bench.ONE_OF_THREE} | 0.50 [0.50] | 1.20 [1.20] | 0.50 [0.50] "
                             "| 1.20 [1.20] | 0 |",
                             f"| {bench.TWO_OF_FIVE} | 0.50 [0.50] | 1.20 [1.20] | 0.50 [0.50] "
                             "| 1.20 [1.20] | 0 |"]
    for table in tables:
        assert len({line.count("|") for line in table}) == 1


def test_server_optimizer_list():
    assert bench._kinds("none, adam") == ("none", "adam")
    assert bench._kinds("adam") == ("adam",)
    with pytest.raises(argparse.ArgumentTypeError):
        bench._kinds("none,yogi")
