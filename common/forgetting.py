"""How much a fine-tuned model forgot outside its task: one measure per task kind.

The fine-tuned model is the base model with each LoRA layer's update merged into its weight,
W0 + ΔW (:func:`merged`): what the LoRA forward computes in eval mode, where LoRA's dropout is
off. Base and fine-tuned model read the same held-out texts (:mod:`common.out_of_domain`) in
float32 (a small ΔW must not vanish in bfloat16 rounding), so each measure is paired text by
text and needs no interval over texts to tell a change from noise in sampling them.

- **Causal LM: the change of log-perplexity**, Δ = NLL(W0 + ΔW) − NLL(W0), the difference of
  the mean next-token cross-entropies per predicted token (nats), i.e. log(PPL_tuned / PPL_base).
  0: nothing forgotten; > 0: the model predicts general text worse. Next-token loss is the
  pretraining objective itself, so this asks directly whether the model still models text it
  was not adapted to; Shuttleworth et al. (arXiv 2410.21228) measure forgetting so.
- **Encoder (classification): linear CKA** (Kornblith, Norouzi, Lee & Hinton, "Similarity of
  Neural Network Representations Revisited", ICML 2019) between the sentence embeddings X (base)
  and Y (fine-tuned), (N, d), of the same N texts:
  CKA(X, Y) = ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F), Xc, Yc with centred columns.
  1: the embeddings' geometry is unchanged; the forgetting reported is 1 − CKA. Chosen over
  the overlap of nearest-neighbour sets because it is one number in [0, 1] with no k to pick,
  it uses every pair of texts (a k-NN overlap on a few hundred texts moves in coarse steps and
  hinges on near ties), and its invariances are the right ones: an orthogonal transform or an
  isotropic scaling of the embedding space changes no cosine similarity a user of the
  embeddings sees, and CKA ignores exactly those, while it does count a general invertible
  linear map, which does change them (CCA would not). A sentence embedding is the mean of the
  last hidden states over a text's tokens, L2-normalised: what all-MiniLM-L6-v2 was trained to
  produce (its ``modules.json``: Transformer, mean Pooling, Normalize). The classification head
  is left out: it is new and task-specific, nothing pretrained to forget.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from common.batching import length_sorted_batches, split_batch
from common.evaluation import evaluation
from common.tasks import Task


@dataclass(frozen=True)
class Forgetting:
    """One run's forgetting on held-out text (module docstring), by its task's measure.

    ``measure``: ``"log-perplexity"`` (causal LM: ``base`` and ``tuned`` are perplexities,
    ``forgetting`` = log(tuned / base)) or ``"linear-cka"`` (encoder: ``base`` = 1, ``tuned`` =
    CKA(base embeddings, fine-tuned embeddings), ``forgetting`` = 1 − CKA).
    """

    measure: str
    base: float
    tuned: float
    forgetting: float


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of two representations X (N, d1), Y (N, d2) of the same N examples, in [0, 1].

    ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) in float64, columns centred; raise ValueError when
    either is constant over the examples (no similarity structure to compare).
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"expected X (N, d1) and Y (N, d2) of the same N examples; got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    Xc = X.double() - X.double().mean(dim=0)  # (N, d1)
    Yc = Y.double() - Y.double().mean(dim=0)  # (N, d2)
    cross = torch.linalg.matrix_norm(Yc.T @ Xc) ** 2  # ‖Ycᵀ Xc‖_F², (d2, d1)
    norms = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
    if float(norms) == 0.0:
        raise ValueError("linear CKA of a representation that is constant over the examples")
    return float(cross / norms)


@contextlib.contextmanager
@torch.no_grad()
def merged(model: nn.Module, deltas: Mapping[str, Tensor], *,
           fan_in_fan_out: bool = False) -> Iterator[nn.Module]:
    """``model`` with W ← W0 + ΔW on each module named in ``deltas``, W0 restored on exit.

    ``deltas``: module name (as ``model.named_modules`` names it) → ΔW (d_out, d_in), added in
    float32; with ``fan_in_fan_out`` (GPT-2's ``Conv1D``, weight (d_in, d_out)) ΔWᵀ is added.
    """
    saved: dict[str, Tensor] = {}
    try:
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            update = delta.T if fan_in_fan_out else delta
            if tuple(update.shape) != tuple(weight.shape):
                raise ValueError(f"module {name!r}: ΔW {tuple(delta.shape)} does not fit its "
                                 f"weight {tuple(weight.shape)}")
            saved[name] = weight.detach().clone()
            weight.copy_(weight.float() + update.to(weight.device, torch.float32))
        yield model
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.copy_(weight)


def encode_texts(task: Task, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                 max_length: int) -> TensorDataset:
    """``texts`` as ``task`` encodes its examples (a classification task: with dummy labels 0)."""
    columns: dict[str, list] = {"text": list(texts)}
    if task.kind.is_classification:
        columns["label"] = [0] * len(texts)
    return task.encode(Dataset.from_dict(columns), tokenizer, max_length)


@torch.no_grad()
def sentence_embeddings(encoder: nn.Module, dataset: TensorDataset,
                        batch_size: int = 64) -> Tensor:
    """L2-normalised mean-pooled last hidden states (N, d) of a classifier's encoder, float32.

    ``encoder`` is the transformers model without its head (``model.base_model``); rows follow
    :func:`common.batching.length_sorted_batches`' order, the same for any model.
    """
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    rows = []
    for batch in length_sorted_batches(dataset, batch_size):
        inputs, _ = split_batch(batch, device)
        hidden = encoder(**inputs).last_hidden_state.float()  # (B, T, d)
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (B, d)
        rows.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    encoder.train(was_training)
    return torch.cat(rows)


def forgetting(model: nn.Module, deltas: Mapping[str, Tensor], dataset: TensorDataset,
               task: Task, *, fan_in_fan_out: bool = False) -> Forgetting:
    """The forgetting of base ``model`` + ``deltas`` on ``dataset`` (:func:`encode_texts`)."""
    if task.kind.is_classification:
        encoder = model.base_model  # transformers: the model without its head
        base = sentence_embeddings(encoder, dataset)
        with merged(model, deltas, fan_in_fan_out=fan_in_fan_out):
            tuned = sentence_embeddings(encoder, dataset)
        cka = linear_cka(base, tuned)
        return Forgetting("linear-cka", 1.0, cka, 1.0 - cka)
    base_nll = evaluation(model, dataset, task=task).loss  # per predicted token, float32
    with merged(model, deltas, fan_in_fan_out=fan_in_fan_out):
        tuned_nll = evaluation(model, dataset, task=task).loss
    return Forgetting("log-perplexity", math.exp(base_nll), math.exp(tuned_nll),
                      tuned_nll - base_nll)
