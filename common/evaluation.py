"""Loss, accuracy, balanced accuracy and ROC AUC of a model on tokenized data, by its task."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import TensorDataset

from common.batching import length_sorted_batches, split_batch
from common.precision import autocast
from common.task_kinds import CLASSIFICATION
from common.tasks import TASKS, BatchSums, Task


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation measured.

    ``balanced_accuracy`` (classification): (1/|P|) Σ_{k ∈ P} correct_k / n_k over the classes
    P present among the examples (n_k > 0), i.e. the mean per-class recall, as scikit-learn's
    ``balanced_accuracy_score``. Chance is 1/|P| whatever the class shares, so on imbalanced
    data it shows learning that accuracy hides (predicting the majority class scores 1/|P|).
    ``most_predicted`` and ``most_predicted_share`` (classification): the class the model
    predicted for the most examples and the share of the examples given it (1.0: one answer
    for every example, whatever it reads). ``auc`` (classification): :func:`one_vs_rest_auc`,
    which no decision threshold decides: a model that ranks the classes well but gives the
    majority class to every example (its logits lean on the class prior) has a high AUC and a
    chance balanced accuracy. All four None for a task without classes (causal LM).
    """

    loss: float
    accuracy: float
    balanced_accuracy: float | None
    most_predicted: int | None = None
    most_predicted_share: float | None = None
    auc: float | None = None


def one_vs_rest_auc(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean over the classes k present of the one-vs-rest ROC AUC of p_k = softmax(z)_k.

    logits (N, K), labels (N,) in [0, K). For class k with n_k examples among N, by the rank
    (Mann–Whitney) form, ties counted ½ as scikit-learn's ``roc_auc_score``:
    AUC_k = (Σ_{i: y_i = k} rank_i(p_k) − n_k (n_k + 1) / 2) / (n_k (N − n_k)), the probability
    that an example of class k gets a higher p_k than one of another class (0.5: chance,
    whatever the class shares). Two classes: the AUC of z_1 − z_0. None when fewer than two
    classes are present.
    """
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    y = labels.numpy()
    per_class = []
    for k in range(probs.shape[1]):
        positive = y == k
        n_k = int(positive.sum())
        if 0 < n_k < len(y):
            ranks = rankdata(probs[:, k])
            per_class.append((ranks[positive].sum() - n_k * (n_k + 1) / 2)
                             / (n_k * (len(y) - n_k)))
    return float(sum(per_class) / len(per_class)) if len(per_class) >= 2 else None


def batch_logits(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
                 compute_dtype: torch.dtype = torch.float32,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, labels) of each batch of ``dataset`` (a task's tensors), on its device.

    Examples in length order, each batch cut to its longest example
    (:func:`common.batching.length_sorted_batches`); the model runs under ``compute_dtype``
    autocast (:mod:`common.precision`). The caller sets eval mode and ``torch.no_grad``.
    """
    device = next(model.parameters()).device
    for batch in length_sorted_batches(dataset, batch_size):
        inputs, labels = split_batch(batch, device)
        with autocast(device, compute_dtype):
            logits = model(**inputs).logits.float()
        yield logits, labels


@torch.no_grad()
def evaluation(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
               compute_dtype: torch.dtype = torch.float32,
               task: Task = TASKS[CLASSIFICATION.name],
               log_prior: torch.Tensor | None = None) -> Evaluation:
    """Loss, accuracy, balanced accuracy and AUC of ``model`` on ``dataset`` (a task's tensors).

    Classification: loss per example and the share of correct labels; causal LM: loss per
    predicted token and the share of correct next tokens (:meth:`common.tasks.Task.batch_sums`).
    ``log_prior`` (K,) (classification, ``data.class-prior``): each example's decision is
    argmax_k (z_k − log π_k) (:mod:`common.class_prior`) instead of argmax_k z_k; it moves
    accuracy, balanced accuracy and the most predicted class, not the loss or the AUC.
    Examples are visited in length order with each batch cut to its longest example
    (:func:`common.batching.length_sorted_batches`); the model runs under ``compute_dtype``
    autocast (:mod:`common.precision`), the loss is summed in float32.
    """
    was_training = model.training
    model.eval()
    sums = BatchSums(0.0, 0, 0)
    class_logits: list[torch.Tensor] = []  # classification: each batch's (B, K), for the AUC
    class_labels: list[torch.Tensor] = []
    for logits, labels in batch_logits(model, dataset, batch_size, compute_dtype):
        batch = task.batch_sums(logits, labels, log_prior)
        sums = sums + batch
        if batch.classes is not None:
            class_logits.append(logits.cpu())
            class_labels.append(labels.cpu())
    model.train(was_training)
    if sums.units == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    loss, accuracy, classes = sums.loss / sums.units, sums.right / sums.units, sums.classes
    if classes is None:
        return Evaluation(loss, accuracy, None)
    present = classes.examples > 0
    # float64: int64 / int64 gives float32 in torch, off in the 8th digit
    balanced = float((classes.right[present].double() / classes.examples[present]).mean())
    most = int(classes.predicted.argmax())
    return Evaluation(loss, accuracy, balanced, most,
                      int(classes.predicted[most]) / int(classes.predicted.sum()),
                      one_vs_rest_auc(torch.cat(class_logits), torch.cat(class_labels)))


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
             compute_dtype: torch.dtype = torch.float32,
             task: Task = TASKS[CLASSIFICATION.name]) -> tuple[float, float]:
    """(mean loss, accuracy) of :func:`evaluation` (argmax decisions)."""
    measured = evaluation(model, dataset, batch_size, compute_dtype, task)
    return measured.loss, measured.accuracy
