"""What differs between the tasks: model class, head, how examples are encoded, the loss.

``model.task = "classification"``: a sequence classifier, the pretrained encoder plus a new
K-way head (a peft ``modules_to_save`` module). An example is (text, label), or (text, second
text, label) for a sentence-pair task (MNLI, QNLI, ...); its loss is the cross-entropy of the
head's logits; evaluation reports the mean loss per example, accuracy and balanced accuracy
(the mean over the classes present of each class's recall).

``model.task = "causal-lm"``: a decoder trained on next-token prediction, with no head of its
own to train (embeddings and the LM head stay frozen). An example is one sequence: a text, or
a prompt followed by its response (``data.prompt-column``), whose prompt tokens are context
only (label −100, out of the loss). The loss of an example is the mean cross-entropy of its
predicted tokens, so DP-SGD clips, noises and counts one sequence as one example; the loss of
a batch is the mean over its examples. Evaluation is token-weighted: the mean loss per
predicted token, perplexity exp(loss), and next-token accuracy.

Tensors are the model's inputs then the labels, with the real tokens first (right padding):
(input_ids, attention_mask, labels), or (input_ids, attention_mask, token_type_ids, labels) for
a classifier whose tokenizer returns segment ids (:mod:`common.batching`, which alone knows the
layout); labels are (N,) class ids or (N, T) token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import TaskType
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import TensorDataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
)

from common import schema
from common.batching import batch_tensors
from common.class_prior import adjusted_decisions
from common.data_sources import TEXT_PAIR
from common.task_kinds import CAUSAL_LM, CLASSIFICATION, TaskKind

IGNORED = -100  # a label out of the loss: prompt tokens and padding


@dataclass(frozen=True)
class ClassCounts:
    """What a classifier predicted on some examples, per class k: three (K,) int64 tensors.

    ``right[k]``: examples of class k predicted k; ``examples[k]``: examples of class k;
    ``predicted[k]``: examples predicted k (whatever their class). Counts of two batches add.
    """

    right: torch.Tensor
    examples: torch.Tensor
    predicted: torch.Tensor

    def __add__(self, other: ClassCounts) -> ClassCounts:
        return ClassCounts(self.right + other.right, self.examples + other.examples,
                           self.predicted + other.predicted)


@dataclass(frozen=True)
class BatchSums:
    """What an evaluation sums over its batches: loss, right decisions, units, class counts.

    ``loss``: the summed loss; ``units``: what it is summed over (examples for a classifier,
    predicted tokens for a causal LM); ``right``: the units decided right (a classifier's
    decisions, adjusted by a declared prior if any; correct next tokens); ``classes``: a
    classifier's :class:`ClassCounts`, None for a task without classes. Sums of two batches add.
    """

    loss: float
    right: int
    units: int
    classes: ClassCounts | None = None

    def __add__(self, other: BatchSums) -> BatchSums:
        classes = (self.classes if other.classes is None else other.classes
                   if self.classes is None else self.classes + other.classes)
        return BatchSums(self.loss + other.loss, self.right + other.right,
                         self.units + other.units, classes)


class SequenceCrossEntropy(nn.Module):
    """Mean over a batch (B, T, V) of each sequence's mean next-token cross-entropy.

    Position t predicts label t + 1; a sequence's loss is the mean over its labels ≠ −100, so
    every example weighs the same whatever its length. ``reduction`` combines the sequences'
    losses: ``"mean"`` (the training loss), ``"sum"``, or ``"none"`` (B,), which Opacus' ghost
    clipping sets to get one loss per example. An empty batch (a Poisson batch may be) gives a
    zero that keeps the graph.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits and (B, T) labels → the loss, reduced over sequences."""
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                    ignore_index=IGNORED, reduction="none")  # (B, T − 1)
        counted = (labels[:, 1:] != IGNORED).sum(dim=1).clamp_min(1)  # (B,)
        per_sequence = per_token.sum(dim=1) / counted  # (B,)
        if self.reduction == "none":
            return per_sequence
        return per_sequence.sum() if self.reduction == "sum" else per_sequence.mean()


class Task:
    """One task's pieces; :data:`TASKS` holds one instance per ``model.task``.

    ``kind`` is its :class:`common.task_kinds.TaskKind` (``name``: the ``model.task`` value),
    ``model_class`` the transformers auto class that loads the pretrained model (or builds it
    from its config), ``peft_task_type`` peft's task type of the LoRA model (None: a plain
    ``PeftModel``), ``head_modules`` the new modules saved with the adapter (a classification
    head), or None; ``writes_generations``: whether a finished run saves samples of the model's
    own text beside its adapter (``server.generations``).
    """

    kind: TaskKind
    model_class: type
    peft_task_type: TaskType | None
    head_modules: list[str] | None
    writes_generations: bool = False

    @property
    def name(self) -> str:
        """The ``model.task`` value of this task."""
        return self.kind.name

    def loss_metrics(self, loss: float) -> dict[str, float]:
        """What an evaluation reports beside its mean ``loss`` and accuracy, from the loss."""
        return {}

    def load_model(self, path, *, num_labels: int) -> nn.Module:
        """The pretrained model of this task from ``path``, from disk only."""
        raise NotImplementedError

    def encode(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> TensorDataset:
        """Tokenize ``dataset`` to :mod:`common.batching`'s tensors, padded to max_length."""
        raise NotImplementedError

    def criterion(self) -> nn.Module:
        """The training loss of a batch: (logits, labels) → mean over its examples."""
        raise NotImplementedError

    def batch_sums(self, logits: torch.Tensor, labels: torch.Tensor,
                   log_prior: torch.Tensor | None = None) -> BatchSums:
        """The :class:`BatchSums` of one evaluation batch (``log_prior``: classification only)."""
        raise NotImplementedError


class Classification(Task):
    """A sequence classifier: encoder + new head; one label per text."""

    kind = CLASSIFICATION
    model_class = AutoModelForSequenceClassification
    peft_task_type = None  # a plain PeftModel; peft's SEQ_CLS would add heads of its own
    head_modules = ["classifier"]  # the newly initialised sequence-classification head

    def load_model(self, path, *, num_labels: int) -> nn.Module:
        """``AutoModelForSequenceClassification`` with a new K-way head."""
        return self.model_class.from_pretrained(
            path, num_labels=num_labels, local_files_only=True,
            ignore_mismatched_sizes=True)  # a local checkpoint's own head is replaced

    def encode(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> TensorDataset:
        """Texts truncated and padded to ``max_length``; labels (N,) class ids.

        With a ``TEXT_PAIR`` column (:mod:`common.data_sources`) each example is the tokenizer's
        sentence pair (text, second text), cut longest first to fit ``max_length`` together.
        The tokenizer's segment ids (token_type_ids: 0 on the first text, 1 on the second) are
        kept wherever it returns them (BERT-family tokenizers, for a single text too: zeros,
        what the model uses when given none), so that the model reads the pair as
        ``model(**tokenizer(text, second))`` does.
        """
        pairs = list(dataset[TEXT_PAIR]) if TEXT_PAIR in dataset.column_names else None
        enc = tokenizer(list(dataset["text"]), pairs, truncation=True, max_length=max_length,
                        padding="max_length", return_tensors="pt")
        labels = torch.tensor(dataset["label"], dtype=torch.long)
        return TensorDataset(*batch_tensors(enc, labels))

    def criterion(self) -> nn.Module:
        """Cross-entropy of the head's logits, mean over the batch."""
        return nn.CrossEntropyLoss()

    def batch_sums(self, logits: torch.Tensor, labels: torch.Tensor,
                   log_prior: torch.Tensor | None = None) -> BatchSums:
        """Per-example cross-entropy summed; the decisions counted per class (class_counts)."""
        loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
        classes = self.class_counts(logits, labels, log_prior)
        return BatchSums(loss, int(classes.right.sum()), labels.numel(), classes)

    def class_counts(self, logits: torch.Tensor, labels: torch.Tensor,
                     log_prior: torch.Tensor | None = None) -> ClassCounts:
        """Each example's decision against its label, counted per class.

        The decision is argmax_k z_k of its (K,) logits, or argmax_k (z_k − log π_k) with a
        declared ``log_prior`` (K,) (:func:`common.class_prior.adjusted_decisions`).
        """
        k = logits.shape[-1]
        labels, predicted = labels.cpu(), adjusted_decisions(logits, log_prior).cpu()
        return ClassCounts(right=torch.bincount(labels[predicted == labels], minlength=k),
                           examples=torch.bincount(labels, minlength=k),
                           predicted=torch.bincount(predicted, minlength=k))


class CausalLM(Task):
    """A decoder on next-token prediction; its LM head and embeddings stay frozen."""

    kind = CAUSAL_LM
    model_class = AutoModelForCausalLM
    peft_task_type = TaskType.CAUSAL_LM
    head_modules = None
    writes_generations = True

    def loss_metrics(self, loss: float) -> dict[str, float]:
        """The perplexity exp(loss) of the mean loss per predicted token."""
        return {schema.PERPLEXITY: perplexity(loss)}

    def load_model(self, path, *, num_labels: int) -> nn.Module:
        """``AutoModelForCausalLM`` (``num_labels`` is unused)."""
        return self.model_class.from_pretrained(path, local_files_only=True)

    def encode(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> TensorDataset:
        """Prompt (if any) then text, cut to ``max_length``; labels (N, T), −100 off the loss.

        A text is tokenized as the tokenizer does by itself (special tokens included); with a
        ``prompt`` column the prompt is tokenized so, and the response after it without special
        tokens, then the end-of-sequence token if the tokenizer has one. Labels are the token
        ids, except −100 on the prompt and the padding.
        """
        prompts = dataset["prompt"] if "prompt" in dataset.column_names else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(dataset), max_length), pad, dtype=torch.long)
        labels = torch.full((len(dataset), max_length), IGNORED, dtype=torch.long)
        mask = torch.zeros((len(dataset), max_length), dtype=torch.long)
        for i, text in enumerate(dataset["text"]):
            if prompts is None:
                context, target = [], tokenizer(text)["input_ids"]
            else:
                context = tokenizer(prompts[i])["input_ids"]
                target = tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    target = [*target, tokenizer.eos_token_id]
            tokens = (list(context) + list(target))[:max_length]
            n, n_context = len(tokens), min(len(context), max_length)
            ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
            mask[i, :n] = 1
            labels[i, n_context:n] = ids[i, n_context:n]
        return TensorDataset(*batch_tensors({"input_ids": ids, "attention_mask": mask}, labels))

    def criterion(self) -> nn.Module:
        """:class:`SequenceCrossEntropy`: one sequence is one example."""
        return SequenceCrossEntropy()

    def batch_sums(self, logits: torch.Tensor, labels: torch.Tensor,
                   log_prior: torch.Tensor | None = None) -> BatchSums:
        """Next-token cross-entropy summed over predicted tokens, correct tokens, tokens.

        A causal LM has no classes: ``log_prior`` must be None (a prior is refused for it).
        """
        if log_prior is not None:
            raise ValueError("a class prior applies to classification only")
        predicted, targets = logits[:, :-1].float(), labels[:, 1:]
        counted = targets != IGNORED
        loss = F.cross_entropy(predicted.transpose(1, 2), targets, ignore_index=IGNORED,
                               reduction="sum").item()
        correct = int(((predicted.argmax(-1) == targets) & counted).sum())
        return BatchSums(loss, correct, int(counted.sum()))


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), CausalLM())}


def perplexity(loss_per_token: float) -> float:
    """exp(mean next-token cross-entropy); inf where it overflows."""
    try:
        return math.exp(loss_per_token)
    except OverflowError:
        return math.inf
