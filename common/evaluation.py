"""Loss, accuracy and balanced accuracy of a model on tokenized data, as its task counts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.batching import length_sorted_batches
from common.precision import autocast
from common.tasks import TASKS, Task


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation measured.

    ``balanced_accuracy`` (classification): (1/|P|) Σ_{k ∈ P} correct_k / n_k over the classes
    P present among the examples (n_k > 0), i.e. the mean per-class recall, as scikit-learn's
    ``balanced_accuracy_score``. Chance is 1/|P| whatever the class shares, so on imbalanced
    data it shows learning that accuracy hides (predicting the majority class scores 1/|P|).
    None for a task without classes (causal LM).
    """

    loss: float
    accuracy: float
    balanced_accuracy: float | None


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
    class_right: torch.Tensor | None = None
    class_total: torch.Tensor | None = None
    for input_ids, mask, labels in length_sorted_batches(dataset, batch_size):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        loss, right, predicted = task.loss_sums(logits, labels)
        total_loss, correct, count = total_loss + loss, correct + right, count + predicted
        if (counts := task.class_counts(logits, labels)) is not None:
            class_right = counts[0] if class_right is None else class_right + counts[0]
            class_total = counts[1] if class_total is None else class_total + counts[1]
    model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    balanced = None
    if class_right is not None and class_total is not None:
        present = class_total > 0
        balanced = float((class_right[present] / class_total[present]).mean())
    return Evaluation(total_loss / count, correct / count, balanced)


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
             compute_dtype: torch.dtype = torch.float32,
             task: Task = TASKS["classification"]) -> tuple[float, float]:
    """(mean loss, accuracy) of :func:`evaluation`."""
    measured = evaluation(model, dataset, batch_size, compute_dtype, task)
    return measured.loss, measured.accuracy
