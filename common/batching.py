"""A batch's tensors: their layout, the model's keyword arguments, trimming to the longest example.

A dataset's tensors (:meth:`common.tasks.Task.encode`) are the model's inputs, then the labels:
``(input_ids, attention_mask, labels)``, or ``(input_ids, attention_mask, token_type_ids,
labels)`` where the tokenizer returns segment ids (BERT-family tokenizers do, for a single
text too: zeros there). Each is padded to ``model.max-length`` with the real tokens first.
:func:`batch_tensors` builds that tuple and :func:`split_batch` reads it back as the model's
keyword arguments: no other module knows the layout. With segment ids a sentence pair reads as
``model(**tokenizer(text, second))`` does; a single text's zeros are what BERT uses when none
are given, so its logits are bit-identical either way.

A batch needs only as many columns as its longest example: the rest is padding that every
layer would still compute on. Under Poisson sampling (DP-SGD) a batch is a random set, so
:func:`collate_trimmed` can only trim what the longest member leaves; evaluation has no such
constraint and visits examples in length order (:func:`length_sorted_batches`), so each batch
holds examples of similar length. Only trailing columns that are padding in every row are cut:
padded positions are masked out of attention and the real tokens keep their positions (and
segment ids), so no output changes (a left-padding tokenizer leaves nothing to cut).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import TensorDataset

# The model's inputs a batch holds, in order, before its labels; token_type_ids only where
# the tokenizer returns them
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MASK = MODEL_INPUTS.index("attention_mask")
Batch = tuple[torch.Tensor, ...]  # input_ids, attention_mask[, token_type_ids], labels


def batch_tensors(inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> Batch:
    """The tensors of a dataset or batch: the :data:`MODEL_INPUTS` ``inputs`` has, then labels.

    ``inputs`` is a tokenizer's output (or any mapping of those names); input_ids and
    attention_mask are required, token_type_ids is kept where present.
    """
    segments = (inputs["token_type_ids"],) if "token_type_ids" in inputs else ()
    return inputs["input_ids"], inputs["attention_mask"], *segments, labels


def split_batch(batch: Sequence[torch.Tensor], device: torch.device | str | None = None,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the model's keyword arguments, labels) of a batch, moved to ``device`` if given."""
    if device is not None:
        batch = [t.to(device, non_blocking=True) for t in batch]
    *inputs, labels = batch
    return dict(zip(MODEL_INPUTS[:len(inputs)], inputs, strict=True)), labels


def trim(batch: Sequence[torch.Tensor]) -> Batch:
    """Drop the trailing columns that are padding in every row ((N, T) → (N, T') , T' ≤ T).

    Every (N, T) tensor loses the same columns: the inputs, and token labels (causal LM);
    class labels (N,) stay.
    """
    mask = batch[MASK]
    if mask.numel() == 0:
        return tuple(batch)
    used = mask.any(dim=0).nonzero()
    end = int(used.max()) + 1 if used.numel() else 1
    return tuple(t[:, :end] if t.ndim == 2 else t for t in batch)


def collate_trimmed(rows: Sequence[tuple[torch.Tensor, ...]]) -> Batch:
    """``DataLoader`` ``collate_fn``: stack the rows, then :func:`trim` the padding columns."""
    return trim([torch.stack(column) for column in zip(*rows, strict=True)])


def length_sorted_batches(dataset: TensorDataset, batch_size: int) -> Iterator[Batch]:
    """The whole dataset in batches of similar length, each trimmed; every example once."""
    order = torch.argsort(dataset.tensors[MASK].sum(dim=1), stable=True)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield trim([t[index] for t in dataset.tensors])
