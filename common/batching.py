"""Batches cut to their longest sequence: dynamic padding for training, length order for eval.

Examples are stored padded to ``model.max-length`` (:func:`common.data.encode`), as
``(input_ids, attention_mask, label)`` with the real tokens first. A batch needs only as many
columns as its longest example: the rest is padding that every layer would still compute on.
Under Poisson sampling (DP-SGD) a batch is a random set, so :func:`collate_trimmed` can only
trim what the longest member leaves; evaluation has no such constraint and visits examples in
length order (:func:`length_sorted_batches`), so each batch holds examples of similar length.
Only trailing columns that are padding in every row are cut: padded positions are masked out
of attention and the real tokens keep their positions, so no output changes (a left-padding
tokenizer leaves nothing to cut).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import TensorDataset

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels


def trim(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Batch:
    """Drop the trailing columns that are padding in every row ((N, T) → (N, T') , T' ≤ T).

    Token labels (N, T) (causal LM) lose the same columns; class labels (N,) stay.
    """
    if mask.numel() == 0:
        return input_ids, mask, labels
    used = mask.any(dim=0).nonzero()
    end = int(used.max()) + 1 if used.numel() else 1
    return input_ids[:, :end], mask[:, :end], labels[:, :end] if labels.ndim == 2 else labels


def collate_trimmed(rows: Sequence[tuple[torch.Tensor, ...]]) -> Batch:
    """``DataLoader`` ``collate_fn``: stack the rows, then :func:`trim` the padding columns."""
    input_ids, mask, labels = (torch.stack(column) for column in zip(*rows, strict=True))
    return trim(input_ids, mask, labels)


def length_sorted_batches(dataset: TensorDataset, batch_size: int) -> Iterator[Batch]:
    """The whole dataset in batches of similar length, each trimmed; every example once."""
    input_ids, mask, labels = dataset.tensors
    order = torch.argsort(mask.sum(dim=1), stable=True)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield trim(input_ids[index], mask[index], labels[index])
