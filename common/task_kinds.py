"""The tasks a run can train (``model.task``): the one place that tells them apart.

``classification``: an example is a text and a class label, the model an encoder with a new
K-way head. ``causal-lm``: an example is a text (after an optional prompt) with no label, the
model a decoder on next-token prediction with no head to train. Every other module asks a
:class:`TaskKind` (``cfg.model.task_kind``) rather than comparing ``model.task`` with a string.

What each task builds (its model class, encoding, loss and metrics) is in :mod:`common.tasks`,
one class per kind. This table is kept apart from it (torch, transformers, peft: seconds to
import), as :mod:`common.methods` is from the strategies, so that the config validator, the
data loader and the launchers read it without importing a model library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskKind:
    """One ``model.task``.

    Attributes
    ----------
    name : the ``model.task`` value.
    is_classification : whether an example carries a class label and the model a K-way head
        (class priors, label groups, a Dirichlet split over labels apply); False for a causal
        LM, whose examples are texts and whose embeddings and LM head stay frozen.
    """

    name: str
    is_classification: bool


CLASSIFICATION = TaskKind("classification", is_classification=True)
CAUSAL_LM = TaskKind("causal-lm", is_classification=False)
TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (CLASSIFICATION, CAUSAL_LM)}
TASK_NAMES = tuple(TASK_KINDS)  # the values model.task allows
