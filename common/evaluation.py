"""Accuracy and mean cross-entropy of a classifier on a tokenized dataset."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset,
             batch_size: int = 128) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` on ``dataset`` (input_ids, mask, labels)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for input_ids, mask, labels in DataLoader(dataset, batch_size=batch_size):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return total_loss / count, correct / count
