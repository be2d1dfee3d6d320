"""Threshold-free scores: a model that ranks well but answers with the prior is told apart."""

import numpy as np
import pytest

from simulations import threshold_free
from simulations.threshold_free import scores, strength_scores


def test_a_model_that_ranks_perfectly_but_leans_on_the_prior_is_recovered_by_adjustment():
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.13).astype(int)
    prior = np.bincount(labels) / len(labels)
    # margin z_1 − z_0 = 1.5 · (y − ½) + log(π_1 / π_0) − 0.5: ordered by class, shifted so
    # far toward the majority that argmax gives every example class 0
    margin = 1.5 * (labels - 0.5) + np.log(prior[1] / prior[0]) - 0.5 + rng.normal(0, 0.05, 2000)
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    s = scores(logits, labels, prior)
    assert s.auc == pytest.approx(1.0)
    assert s.balanced_accuracy == 0.5 and s.most_predicted_share == 1.0
    assert s.adjusted_balanced_accuracy == pytest.approx(1.0, abs=0.01)


def test_random_logits_score_chance_on_three_classes():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 3000)
    s = scores(rng.normal(size=(3000, 3)), labels, np.full(3, 1 / 3))
    assert s.auc == pytest.approx(0.5, abs=0.03)
    assert s.balanced_accuracy == pytest.approx(1 / 3, abs=0.03)
    assert s.adjusted_balanced_accuracy == s.balanced_accuracy  # a flat prior moves nothing


def test_a_prior_without_a_share_for_every_class_is_refused():
    with pytest.raises(ValueError, match="needs 2 shares"):
        scores(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.array([1.0, 0.0]))


def test_a_folder_without_a_saved_run_is_refused_before_any_model_loads(tmp_path, capsys):
    assert threshold_free.main([str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_strengths_run_from_argmax_to_the_full_adjustment():
    rng = np.random.default_rng(2)
    labels = (rng.random(3000) < 0.13).astype(int)
    prior = np.bincount(labels) / len(labels)
    margin = 1.5 * (labels - 0.5) + np.log(prior[1] / prior[0]) + rng.normal(0, 1.0, 3000)
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    full = scores(logits, labels, prior)
    rows = strength_scores(logits, labels, prior * 7, [0, 0.5, 1])  # counts work as shares
    assert [r.strength for r in rows] == [0, 0.5, 1]
    assert rows[0].balanced_accuracy == pytest.approx(full.balanced_accuracy)
    assert rows[2].balanced_accuracy == pytest.approx(full.adjusted_balanced_accuracy)
    assert rows[0].accuracy == pytest.approx(float(((margin > 0) == labels).mean()))  # argmax
    # each larger τ gives the minority more decisions: its share of them only grows
    minority = [1 - r.most_predicted_share for r in rows]
    assert minority[0] <= minority[1] <= minority[2]
    with pytest.raises(ValueError, match="finite number >= 0"):
        strength_scores(logits, labels, prior, [-1])


def test_negative_strengths_are_refused_before_any_model_loads(tmp_path, capsys):
    assert threshold_free.main(["--strengths", "0,-1", str(tmp_path)]) == 2
    assert "--strengths" in capsys.readouterr().err


def test_the_prior_of_a_run_is_the_declared_one_or_its_census_shares(tmp_path):
    import json

    import numpy as np

    from common.config import AppConfig
    from simulations.threshold_free import run_prior

    names = ["ham", "spam"]
    declared = AppConfig.from_run_config({"data.class-prior": "ham=3,spam=1"})
    prior, source = run_prior(tmp_path, declared.data, names)
    np.testing.assert_allclose(prior, [0.75, 0.25], rtol=1e-6)
    assert source == "declared"
    assert run_prior(tmp_path, AppConfig().data, names) == (None, "")
    census = AppConfig.from_run_config({"data.class-prior": "census"})
    with pytest.raises(FileNotFoundError, match="class-prior.json"):
        run_prior(tmp_path, census.data, names)
    (tmp_path / "class-prior.json").write_text(json.dumps({"shares": {"spam": 0.2, "ham": 0.8}}))
    prior, source = run_prior(tmp_path, census.data, names)
    np.testing.assert_allclose(prior, [0.8, 0.2], rtol=1e-6)  # in the order of the names
    assert source == "census"
