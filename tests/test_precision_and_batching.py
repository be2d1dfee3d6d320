"""bfloat16 autocast keeps what trains in float32; padding trimmed per batch changes no output."""

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client import training as t
from common import environment, precision
from common.adapter import AdapterLayout
from common.batching import collate_trimmed, length_sorted_batches, split_batch, trim
from common.config import AppConfig
from common.evaluation import batch_logits, evaluate, evaluation
from common.model import build_model
from common.tasks import TASKS
from tests.helpers import private_sgd


def _model_and_data(run_config: dict):
    cfg = AppConfig.from_run_config(run_config)
    data = t.load_local_data(cfg, 0, 2)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    return cfg, model, AdapterLayout.from_model(model), data


def test_auto_takes_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)
    assert precision.resolve_compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    assert precision.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    assert precision.resolve_compute_dtype("float32", "cpu") == torch.float32
    assert precision.resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="model.compute-dtype"):
        precision.resolve_compute_dtype("float16", "cpu")


def test_a_pinned_bfloat16_without_hardware_support_is_called_slow(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)
    assert "emulated, about 100x slower" in precision.emulation_warning("bfloat16", "cpu")
    assert precision.emulation_warning("auto", "cpu") is None
    assert precision.emulation_warning("float32", "cpu") is None
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    assert precision.emulation_warning("bfloat16", "cpu") is None


def test_the_environment_names_the_resolved_precision_and_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(environment, "native_bfloat16", lambda device: True)
    described = environment.run_environment(torch.bfloat16, "cpu")
    assert described["compute-dtype"] == "bfloat16" and described["native-bfloat16"] is True
    assert described["device"] == "cpu"
    assert described["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert json.loads(json.dumps(described)) == described  # what environment.json holds
    assert environment.run_environment(torch.float32, "cpu")["compute-dtype"] == "float32"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: avx512_bf16\n")
    assert environment.cpu_model(cpuinfo) == "AMD EPYC 9R14"


def test_bfloat16_path_keeps_per_sample_gradients_in_float32(tiny_run_config):
    cfg, model, layout, data = _model_and_data(tiny_run_config)
    trainable = layout.set_trainable(model, ("B",), train_head=True)
    frozen_dtypes, island_dtypes = set(), set()
    frozen = model.base_model.model.bert.encoder.layer[0].intermediate.dense
    frozen.register_forward_hook(lambda m, a, out: frozen_dtypes.add(out.dtype))
    head = model.base_model.model.classifier.modules_to_save["default"]
    head.register_forward_hook(lambda m, a, out: island_dtypes.add((a[0].dtype, out.dtype)))
    before = [p.detach().clone() for p in trainable]
    loader = t.train_loader(data.train, cfg.train.batch_size, t.device(cfg.model))
    private = private_sgd(model, trainable, data.train, loader=loader)
    seen: list[torch.dtype] = []
    original = private.optimizer.clip_and_accumulate

    def record_then_clip():
        seen.extend(p.grad_sample.dtype for p in private.optimizer.params)
        original()

    private.optimizer.clip_and_accumulate = record_then_clip
    t.run_local_steps(private, 2, torch.bfloat16)
    assert frozen_dtypes == {torch.bfloat16}  # the frozen encoder ran in bfloat16
    assert island_dtypes == {(torch.float32, torch.float32)}  # the head in float32
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainable)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))


def test_float32_islands_do_nothing_outside_autocast(tiny_run_config):
    cfg, model, _, data = _model_and_data(tiny_run_config)
    inputs, _ = split_batch(data.test.tensors)
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).logits
        with precision.autocast("cpu", torch.bfloat16):
            mixed = model(**inputs).logits
        again = model(**inputs).logits
    assert not torch.is_autocast_enabled("cpu")
    assert torch.equal(plain, again)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=0.05, rtol=0.05)


def test_trimmed_batches_give_the_same_logits(tiny_run_config):
    cfg, model, _, data = _model_and_data(tiny_run_config)
    inputs, _ = split_batch(data.test.tensors)
    short, _ = split_batch(trim(data.test.tensors))
    assert set(short) == set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    width = int(inputs["attention_mask"].sum(1).max())
    assert all(x.shape[1] == width <= inputs["input_ids"].shape[1] for x in short.values())
    model.eval()
    with torch.no_grad():
        full = model(**inputs).logits
        cut = model(**short).logits
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_trim_cuts_only_columns_that_are_padding_in_every_row():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = (ids != 0).long()
    cut_ids, cut_mask, _ = trim((ids, mask, torch.tensor([0, 1])))
    assert cut_ids.tolist() == [[5, 6], [7, 0]] and cut_mask.tolist() == [[1, 1], [1, 0]]
    left = torch.tensor([[0, 0, 5, 6]])  # a left-padding tokenizer: nothing may be cut
    assert trim((left, (left != 0).long(), torch.tensor([0])))[0].shape == (1, 4)
    rows = list(zip(ids, mask, torch.tensor([0, 1]), strict=True))
    assert collate_trimmed(rows)[0].shape == (2, 2)
    segments = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])  # a pair's segment ids go with them
    rows = list(zip(ids, mask, segments, torch.tensor([0, 1]), strict=True))
    assert [x.tolist() for x in collate_trimmed(rows)] == [
        [[5, 6], [7, 0]], [[1, 1], [1, 0]], [[0, 1], [0, 0]], [0, 1]]


def test_length_sorted_evaluation_visits_every_example_once_and_matches(tiny_run_config):
    cfg, model, _, data = _model_and_data(tiny_run_config)
    labels = torch.cat([b[-1] for b in length_sorted_batches(data.test, 7)])
    assert sorted(labels.tolist()) == sorted(data.test.tensors[-1].tolist())
    model.eval()
    with torch.no_grad():
        correct, total = 0, 0.0
        for batch in DataLoader(data.test, batch_size=128):
            inputs, y = split_batch(batch)
            logits = model(**inputs).logits
            correct += int((logits.argmax(-1) == y).sum())
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    loss, accuracy = evaluate(model, data.test, batch_size=7)
    n = len(data.test)
    assert accuracy == correct / n
    assert loss == pytest.approx(total / n, rel=1e-5)
    assert isinstance(data.test, TensorDataset)


def test_balanced_accuracy_is_scikit_learns_over_the_classes_present(tiny_run_config):
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    cfg, model, _, data = _model_and_data(tiny_run_config)
    keep = data.test.tensors[-1] != 2  # a class absent from the examples counts for nothing
    subset = TensorDataset(*(x[keep] for x in data.test.tensors))
    inputs, labels = split_batch(subset.tensors)
    model.eval()
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1)
    measured = evaluation(model, subset, batch_size=7)
    want = balanced_accuracy_score(labels.numpy(), predicted.numpy())
    assert measured.balanced_accuracy == pytest.approx(want, abs=1e-12)
    right = int((predicted == labels).sum())
    assert measured.accuracy == pytest.approx(right / len(subset), abs=1e-12)
    most = torch.bincount(predicted, minlength=3)
    assert measured.most_predicted == int(most.argmax())
    assert measured.most_predicted_share == pytest.approx(int(most.max()) / len(subset))
    # The AUC against scikit-learn's one-vs-rest over the classes present, on the very logits
    # the evaluation scores (its trimmed batches change a random model's near-tied
    # probabilities in the last bits, enough to swap ranks)
    with torch.no_grad():
        batches = list(batch_logits(model, subset, batch_size=7))
    probs = torch.softmax(torch.cat([z for z, _ in batches]).double(), -1).numpy()
    y = torch.cat([labels for _, labels in batches]).numpy()
    want_auc = sum(roc_auc_score(y == k, probs[:, k]) for k in set(y)) / len(set(y))
    assert measured.auc == pytest.approx(want_auc, abs=1e-12)
    # All one class predicted: accuracy is that class's share, balanced accuracy 1/|classes|
    always_first = TASKS["classification"].class_counts(
        torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1), torch.tensor([0, 0, 0, 1]))
    assert always_first.right.tolist() == [3, 0, 0]
    assert always_first.examples.tolist() == [3, 1, 0]
    assert always_first.predicted.tolist() == [4, 0, 0]


def test_a_final_model_with_one_answer_for_everything_is_reported(monkeypatch):
    """Accuracy 0.86 that is the share of 'ham' must not read as learning: a WARNING says so."""
    from flwr.app import ArrayRecord

    from common.evaluation import Evaluation
    from common.schema import RoundTrainingMetrics
    from server import evaluation as server_evaluation

    measured = {"share": 1.0}
    monkeypatch.setattr(server_evaluation, "evaluation", lambda model, data, **kw: Evaluation(
        0.33, 0.8611, 0.5, 0, measured["share"], measured.get("auc")))

    class Layout:
        def load(self, state):
            pass

    def warnings_of(final_round, server_round, share, names=("ham", "spam")):
        measured["share"] = share
        evaluator = server_evaluation.GlobalEvaluator(
            None, Layout(), subset=[0] * 5, full=[0] * 1159, final_round=final_round,
            training=RoundTrainingMetrics(), label_names=names)
        said = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: said.append(record.getMessage())
        logger = logging.getLogger("flwr")
        logger.addHandler(handler)
        try:
            evaluator(server_round, ArrayRecord())
        finally:
            logger.removeHandler(handler)
        return said

    (said,) = warnings_of(final_round=5, server_round=5, share=0.999)
    assert "predicts class 'ham' for 99.9% of the 1159 test examples" in said
    assert "accuracy 0.8611" in said and "balanced accuracy 0.5000 is chance" in said
    assert "strategy.num-rounds" in said and "AUC" not in said  # none measured
    measured["auc"] = 0.987  # ranks the classes, answers with the majority: the AUC shows it
    (said,) = warnings_of(final_round=5, server_round=5, share=0.999)
    assert "Its ROC AUC, which no decision threshold decides, is 0.9870 (0.5: chance)" in said
    assert warnings_of(final_round=5, server_round=5, share=0.98) == []  # it tells classes apart
    assert warnings_of(final_round=5, server_round=3, share=1.0) == []  # not the final model
    assert "predicts class '0'" in warnings_of(5, 5, 1.0, names=None)[0]


def test_auc_is_scikit_learns_one_vs_rest_and_needs_no_threshold():
    from sklearn.metrics import roc_auc_score

    from common.evaluation import one_vs_rest_auc

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=gen)
    logits = torch.randn(300, 4, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    want = roc_auc_score(labels.numpy(), torch.softmax(logits.double(), -1).numpy(),
                         multi_class="ovr", average="macro")
    assert one_vs_rest_auc(logits, labels) == pytest.approx(want, abs=1e-12)
    # A binary model that ranks every example right but answers the majority for all of them
    binary = (torch.arange(100) < 13).long()
    margin = binary.double() - 5.0  # z_1 − z_0 < 0 everywhere: argmax is class 0 throughout
    shifted = torch.stack([torch.zeros(100, dtype=torch.float64), margin], 1)
    assert one_vs_rest_auc(shifted, binary) == 1.0
    assert one_vs_rest_auc(torch.zeros(100, 2), binary) == 0.5  # all tied: chance
    assert one_vs_rest_auc(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)) is None


def test_batch_sums_add_and_count_a_classifiers_decisions_once():
    """A classifier's right count is its class counts' (adjusted by a prior); an LM refuses one."""
    from common.tasks import BatchSums

    task = TASKS["classification"]
    logits, labels = torch.tensor([[2.0, 1.5], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([1, 1, 0])
    plain = task.batch_sums(logits, labels)
    assert (plain.right, plain.units) == (2, 3)  # argmax: 0, 1, 0
    leaning = torch.log(torch.tensor([0.9, 0.1]))  # subtracting log π moves example 0 to class 1
    adjusted = task.batch_sums(logits, labels, leaning)
    assert adjusted.right == int(adjusted.classes.right.sum()) == 3
    assert adjusted.loss == pytest.approx(plain.loss)  # the prior moves decisions, not the loss
    both = plain + adjusted
    assert (both.right, both.units) == (5, 6)
    assert both.classes.examples.tolist() == [2, 4]
    assert (BatchSums(1.0, 1, 2) + BatchSums(2.0, 0, 3)) == BatchSums(3.0, 1, 5)
    with pytest.raises(ValueError, match="classification only"):
        TASKS["causal-lm"].batch_sums(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                                      leaning)
