"""Loss and accuracy of a model on a tokenized dataset, as its task counts them (common.tasks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.batching import length_sorted_batches
from common.precision import autocast
from common.tasks import TASKS, Task


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 128,
             compute_dtype: torch.dtype = torch.float32,
             task: Task = TASKS["classification"]) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` on ``dataset`` (input_ids, mask, labels).

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
    for input_ids, mask, labels in length_sorted_batches(dataset, batch_size):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        loss, right, predicted = task.loss_sums(logits, labels)
        total_loss, correct, count = total_loss + loss, correct + right, count + predicted
    model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return total_loss / count, correct / count
