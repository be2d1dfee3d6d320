"""Loss, accuracy and balanced accuracy of a model on tokenized data, as its task counts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.batching import length_sorted_batches
from common.precision import autocast
from common.tasks import TASKS, ClassCounts, Task


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation measured.

    ``balanced_accuracy`` (classification): (1/|P|) Σ_{k ∈ P} correct_k / n_k over the classes
    P present among the examples (n_k > 0), i.e. the mean per-class recall, as scikit-learn's
    ``balanced_accuracy_score``. Chance is 1/|P| whatever the class shares, so on imbalanced
    data it shows learning that accuracy hides (predicting the majority class scores 1/|P|).
    ``most_predicted`` and ``most_predicted_share`` (classification): the class the model
    predicted for the most examples and the share of the examples given it (1.0: one answer
    for every example, whatever it reads). All three None for a task without classes (causal LM).
    """

    loss: float
    accuracy: float
    balanced_accuracy: float | None
    most_predicted: int | None = None
    most_predicted_share: float | None = None


@torch.no_grad()
def evaluation(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
               compute_dtype: torch.dtype = torch.float32,
               task: Task = TASKS["classification"]) -> Evaluation:
    """Mean loss, accuracy and balanced accuracy of ``model`` on ``dataset`` (ids, mask, labels).

    Classification: loss per example and the share of correct labels; causal LM: loss per
    predicted token and the share of correct next tokens (:meth:`common.tasks.Task.loss_sums`).
    Examples are visited in length order with each batch cut to its longest example
    (:func:`common.batching.length_sorted_batches`); the model runs under ``compute_dtype``
    autocast (:mod:`common.precision`), the loss is summed in float32.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    classes: ClassCounts | None = None
    for input_ids, mask, labels in length_sorted_batches(dataset, batch_size):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        loss, right, predicted = task.loss_sums(logits, labels)
        total_loss, correct, count = total_loss + loss, correct + right, count + predicted
        if (counts := task.class_counts(logits, labels)) is not None:
            classes = counts if classes is None else classes + counts
    model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if classes is None:
        return Evaluation(total_loss / count, correct / count, None)
    present = classes.examples > 0
    balanced = float((classes.right[present] / classes.examples[present]).mean())
    most = int(classes.predicted.argmax())
    return Evaluation(total_loss / count, correct / count, balanced, most,
                      int(classes.predicted[most]) / int(classes.predicted.sum()))


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
             compute_dtype: torch.dtype = torch.float32,
             task: Task = TASKS["classification"]) -> tuple[float, float]:
    """(mean loss, accuracy) of :func:`evaluation`."""
    measured = evaluation(model, dataset, batch_size, compute_dtype, task)
    return measured.loss, measured.accuracy
