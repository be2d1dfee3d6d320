"""data.class-prior: a declared public prior moves the decisions, not the loss, AUC or training."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.class_prior import (
    adjusted_decisions,
    class_prior_problems,
    decision_offsets,
    log_prior,
    parse_class_prior,
)
from common.config import AppConfig, ConfigError
from common.data_files import DataError
from common.evaluation import evaluation
from server.preflight import check_class_prior, check_run


def test_a_prior_is_shares_or_counts_of_named_classes():
    prior, problems = parse_class_prior(("comp=0.87", " rec = 0.13 "))
    assert (prior, problems) == ({"comp": 0.87, "rec": 0.13}, [])
    assert parse_class_prior(("a=b=4777", "c=739")) == ({"a=b": 4777.0, "c": 739.0}, [])
    assert parse_class_prior(()) == ({}, [])
    for bad in ("comp", "comp=", "=0.5", "comp=abc", "comp=0", "comp=-1", "comp=nan",
                "comp=inf"):
        _, problems = parse_class_prior((bad, "rec=1"))
        assert problems == [f"data.class-prior: entry {bad!r} must be 'class name=share' with "
                            "a finite share > 0 (shares or counts; they are normalised)"], bad
    assert parse_class_prior(("comp=1", "comp=2"))[1] == [
        "data.class-prior: class 'comp' is given twice"]
    assert "two at least" in parse_class_prior(("comp=1",))[1][0]


def test_the_run_configuration_refuses_a_malformed_prior_naming_the_key():
    with pytest.raises(ConfigError, match=r"data.class-prior: entry 'rec=lots'"):
        AppConfig.from_run_config({"data.class-prior": "comp=0.9,rec=lots"})
    with pytest.raises(ConfigError, match=r"data.class-prior='a=1,b=1': must be empty with "
                                          r"model.task='causal-lm'"):
        AppConfig.from_run_config({"data.class-prior": "a=1,b=1", "model.task": "causal-lm",
                                   "lora.head-init": "random", "data.partitioner": "iid",
                                   "data.label-column": ""})
    cfg = AppConfig.from_run_config({"data.class-prior": "comp=0.9,rec=0.1"})
    assert cfg.data.declared_prior == {"comp": 0.9, "rec": 0.1}
    assert cfg.to_dict()["data.class-prior"] == "comp=0.9,rec=0.1"
    assert AppConfig().data.declared_prior == {}


def test_a_prior_must_name_every_class_of_the_data_once(tiny_run_config):
    names = ("space", "sport", "tech")
    assert class_prior_problems({"space": 1, "sport": 1, "tech": 2}, names) == []
    assert class_prior_problems({"space": 1, "sports": 1}, names) == [
        "data.class-prior: 'sports' is not a class of the data (classes: space, sport, tech)",
        "data.class-prior: no share for 'sport', 'tech': give every class of the data one "
        "(classes: space, sport, tech)"]
    check_class_prior({}, names)  # none declared: nothing to check
    with pytest.raises(DataError, match="'tec' is not a class"):
        check_class_prior({"space": 1, "sport": 1, "tec": 1}, names)
    # The run's own check, before any training, on the tiny data's classes
    with pytest.raises(DataError, match="no share for 'tech'"):
        check_run(AppConfig.from_run_config({**tiny_run_config,
                                             "data.class-prior": "space=1,sport=2"}))
    check_run(AppConfig.from_run_config({**tiny_run_config,
                                         "data.class-prior": "tech=1,space=1,sport=2"}))


def test_log_prior_is_normalised_and_in_the_order_of_the_classes():
    names = ("comp", "rec")
    shares = log_prior({"rec": 0.13, "comp": 0.87}, names)
    counts = log_prior({"comp": 870, "rec": 130}, names)
    assert shares.tolist() == pytest.approx([math.log(0.87), math.log(0.13)], abs=1e-6)
    assert counts.tolist() == pytest.approx(shares.tolist(), abs=1e-6)
    assert shares.dtype == torch.float32
    with pytest.raises(ValueError, match="no share for 'rec'"):
        log_prior({"comp": 1.0, "x": 1.0}, names)


def test_the_decision_divides_each_class_probability_by_its_share():
    logits = torch.tensor([[2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    assert adjusted_decisions(logits, None).tolist() == [0, 0, 1]
    prior = torch.tensor([0.9, 0.1]).log()  # log(0.9 / 0.1) = 2.197 moves the margin
    assert adjusted_decisions(logits, prior).tolist() == [1, 1, 1]
    probs = torch.softmax(logits, -1) / torch.tensor([0.9, 0.1])
    assert adjusted_decisions(logits, prior).tolist() == probs.argmax(-1).tolist()
    # A constant added to every log share changes no decision
    assert adjusted_decisions(logits, prior + 5.0).tolist() == [1, 1, 1]


def test_a_strength_moves_each_decision_part_of_the_way():
    """τ = 0: plain argmax; τ = 1: the full adjustment; τ between: margins moved by τ log π."""
    prior, names = {"ham": 0.9, "spam": 0.1}, ("ham", "spam")
    # spam − ham margins: −3, −1.5, −0.5, +1; log(0.9 / 0.1) = 2.197 lifts them by τ · 2.197
    logits = torch.tensor([[3.0, 0.0], [1.5, 0.0], [0.5, 0.0], [0.0, 1.0]])
    assert torch.equal(decision_offsets(prior, names), log_prior(prior, names))
    assert adjusted_decisions(logits, decision_offsets(prior, names, 0.0)).tolist() == [
        0, 0, 0, 1]
    assert adjusted_decisions(logits, decision_offsets(prior, names, 0.5)).tolist() == [
        0, 0, 1, 1]  # lift 1.10 moves the −0.5 margin only
    assert adjusted_decisions(logits, decision_offsets(prior, names, 1.0)).tolist() == [
        0, 1, 1, 1]
    assert adjusted_decisions(logits, decision_offsets(prior, names, 2.0)).tolist() == [
        1, 1, 1, 1]
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="data.class-prior-strength"):
            decision_offsets(prior, names, bad)


def test_the_run_configuration_refuses_a_strength_without_a_prior_or_below_zero():
    cfg = AppConfig.from_run_config({"data.class-prior": "ham=9,spam=1",
                                     "data.class-prior-strength": 0.5})
    assert cfg.data.class_prior_strength == 0.5
    assert cfg.to_dict()["data.class-prior-strength"] == 0.5
    assert AppConfig().data.class_prior_strength == 1.0
    with pytest.raises(ConfigError, match=r"data.class-prior-strength=0.5: scales a declared "
                                          r"prior: set data.class-prior too"):
        AppConfig.from_run_config({"data.class-prior-strength": 0.5})
    for bad in (-1.0, math.inf):
        with pytest.raises(ConfigError, match=r"data.class-prior-strength=.*: must be a finite "
                                              r"number >= 0"):
            AppConfig.from_run_config({"data.class-prior": "ham=9,spam=1",
                                       "data.class-prior-strength": bad})


class FixedLogits(nn.Module):
    """A 'model' whose logits for example i are row i of ``table`` (input_ids[:, 0] = i)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_a_ranking_model_that_answers_the_majority_decides_well_under_its_prior():
    """87 % comp: the model ranks every post right, argmax says comp to all, the prior fixes it."""
    labels = (torch.arange(100) >= 87).long()
    margin = torch.where(labels == 1, -1.0, -3.0)  # z_rec − z_comp < 0 everywhere
    model = FixedLogits(torch.stack([torch.zeros(100), margin], 1))
    data = TensorDataset(torch.arange(100)[:, None], torch.ones(100, 1, dtype=torch.long),
                         labels)
    plain = evaluation(model, data, batch_size=16)
    adjusted = evaluation(model, data, batch_size=16,
                          log_prior=log_prior({"comp": 87, "rec": 13}, ("comp", "rec")))
    assert (plain.accuracy, plain.balanced_accuracy, plain.most_predicted_share) == (
        0.87, 0.5, 1.0)
    # log(87 / 13) = 1.90 lifts rec's margin to +0.90 on rec posts, −1.10 on comp posts
    assert (adjusted.accuracy, adjusted.balanced_accuracy) == (1.0, 1.0)
    assert (adjusted.most_predicted, adjusted.most_predicted_share) == (0, 0.87)
    assert adjusted.loss == plain.loss and adjusted.auc == plain.auc == 1.0


def test_the_evaluator_decides_with_the_declared_prior_and_says_so_when_there_is_none(
        monkeypatch):
    from flwr.app import ArrayRecord

    from common.evaluation import Evaluation
    from common.schema import RoundTrainingMetrics
    from server import evaluation as server_evaluation

    seen = {}

    def fake_evaluation(model, data, **kw):
        seen.update(kw)
        return Evaluation(0.3, 0.87, 0.5, 0, 1.0, 0.9)

    monkeypatch.setattr(server_evaluation, "evaluation", fake_evaluation)
    layout = SimpleNamespace(load=lambda state: None)

    def final_warning(prior):
        evaluator = server_evaluation.GlobalEvaluator(
            None, layout, subset=[0] * 5, full=[0] * 200, final_round=1,
            training=RoundTrainingMetrics(), label_names=("comp", "rec"), log_prior=prior)
        said = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: said.append(record.getMessage())
        logging.getLogger("flwr").addHandler(handler)
        try:
            evaluator(1, ArrayRecord())
        finally:
            logging.getLogger("flwr").removeHandler(handler)
        return said[0]

    assert "declare the classes' public shares (data.class-prior)" in final_warning(None)
    assert seen["log_prior"] is None
    prior = log_prior({"comp": 0.87, "rec": 0.13}, ("comp", "rec"))
    assert "data.class-prior" not in final_warning(prior)
    assert seen["log_prior"] is prior


def test_balanced_accuracy_is_exact_in_double_precision():
    """15 of 22 and 11 of 11 right: (15/22 + 1) / 2, which float32 misses in the 8th digit."""
    labels = torch.tensor([0] * 22 + [1] * 11)
    predicted = torch.tensor([0] * 15 + [1] * 7 + [1] * 11)
    model = FixedLogits(torch.nn.functional.one_hot(predicted, 2).float())
    data = TensorDataset(torch.arange(33)[:, None], torch.ones(33, 1, dtype=torch.long), labels)
    assert evaluation(model, data, batch_size=8).balanced_accuracy == (15 / 22 + 1) / 2
