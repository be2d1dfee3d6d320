"""A declared, public class prior and the decisions it adjusts (``data.class-prior``).

A classifier's softmax(z) estimates p(y | x) under the class shares π it was trained on. On
an imbalanced task argmax_k z_k then follows π: a model that ranks the classes well (high ROC
AUC) can still give every example the majority class. The decision that maximises balanced
accuracy (the mean per-class recall) for a calibrated model is instead the post-hoc logit
adjustment of Menon et al. (2021, "Long-tail learning via logit adjustment", τ = 1)::

    ŷ(x) = argmax_k (z_k(x) − log π_k),    π_k > 0,  Σ_k π_k = 1,

i.e. argmax_k p(y = k | x) / π_k: each class's score is divided by its share. With a
strength τ ≥ 0 (``data.class-prior-strength``, Menon et al.'s τ) the decision is
argmax_k (z_k − τ log π_k): τ = 0 is plain argmax, τ = 1 the full adjustment, and a τ between
moves each decision part of the way, for a model whose logits carry less of π than log π
(an under-trained one: subtracting all of log π then overshoots). Choose τ on a validation
split (``data.validation-fraction``), never on the test figures. Only the
decision moves: the loss, the softmax and the AUC are the model's own, and training never
sees π. A constant added to every log π_k changes no decision, so π may be given as shares
or as counts ("comp=4777,rec=739"); it is normalised.

Privacy: π is *declared* by the user as a public fact (a base rate known outside the
federation, as a class name is), not measured by the system. The server reads it and no
client sends anything for it, so it costs no ε. A prior computed from the clients' own data
would be a release of that data that the accountant does not count. Without a public one,
``data.class-prior = "census"`` estimates π under DP instead: each node sends its label counts
once, through the Gaussian mechanism, and its ledger counts that release
(:mod:`privacy.census`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run configuration parses a prior without importing torch
    import torch

KEY = "data.class-prior"
STRENGTH_KEY = "data.class-prior-strength"
CENSUS = "census"  # data.class-prior = "census": π estimated under DP by privacy.census
STRENGTH_RULE = ("must be a finite number >= 0 (0: plain argmax, 1: the full adjustment by the "
                 "declared data.class-prior)")


def is_valid_strength(strength: float) -> bool:
    """Whether τ = ``strength`` is a valid ``data.class-prior-strength`` (:data:`STRENGTH_RULE`)."""
    return math.isfinite(strength) and strength >= 0


def parse_class_prior(entries: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """The declared prior of ``entries`` ("name=share", ...) and one line per invalid entry.

    A name may contain "=" (the share is after the last one). Every share must be a finite
    number > 0; a name may appear once; two classes at least. The shares are returned as
    given (not normalised). ``entries`` empty, or ``["census"]`` (a prior the nodes count under
    DP, :func:`is_census`): no declared prior, no problem.
    """
    prior: dict[str, float] = {}
    if is_census(entries):
        return prior, []
    problems: list[str] = []
    for entry in entries:
        name, sep, value = entry.rpartition("=")
        name = name.strip()
        try:
            share = float(value) if sep and name else math.nan
        except ValueError:
            share = math.nan
        if not (math.isfinite(share) and share > 0):
            problems.append(f"{KEY}: entry {entry!r} must be 'class name=share' with a finite "
                            "share > 0 (shares or counts; they are normalised)")
        elif name in prior:
            problems.append(f"{KEY}: class {name!r} is given twice")
        else:
            prior[name] = share
    if entries and not problems and len(prior) < 2:
        problems.append(f"{KEY}={','.join(entries)!r}: name every class of the task (two at "
                        "least), e.g. 'comp=0.87,rec=0.13'")
    return prior, problems


def is_census(entries: Sequence[str]) -> bool:
    """Whether ``data.class-prior`` asks for a prior counted under DP (the one entry "census")."""
    return [e.strip() for e in entries] == [CENSUS]


def class_prior_problems(prior: Mapping[str, float], label_names: Sequence[str]) -> list[str]:
    """Why ``prior`` does not name each of ``label_names`` exactly once (empty: it does)."""
    unknown = [name for name in prior if name not in label_names]
    missing = [name for name in label_names if name not in prior]
    problems = []
    if unknown:
        problems.append(f"{KEY}: {', '.join(map(repr, unknown))} "
                        f"{'is not a class' if len(unknown) == 1 else 'are not classes'} of "
                        f"the data (classes: {', '.join(label_names)})")
    if missing:
        problems.append(f"{KEY}: no share for {', '.join(map(repr, missing))}: give every class "
                        f"of the data one (classes: {', '.join(label_names)})")
    return problems


def log_prior(prior: Mapping[str, float], label_names: Sequence[str]) -> torch.Tensor:
    """Log π (K,) float32 in the order of ``label_names``, π normalised to sum to 1.

    Raises ``ValueError`` (:func:`class_prior_problems`) unless ``prior`` names every class once.
    """
    if problems := class_prior_problems(prior, label_names):
        raise ValueError("; ".join(problems))
    import torch

    shares = torch.tensor([prior[name] for name in label_names], dtype=torch.float64)
    return (shares / shares.sum()).log().float()


def decision_offsets(prior: Mapping[str, float], label_names: Sequence[str],
                     strength: float = 1.0) -> torch.Tensor:
    """τ · log π (K,) float32 in the order of ``label_names`` (:func:`log_prior`; τ = ``strength``).

    What :func:`adjusted_decisions` subtracts from the logits: argmax_k (z_k − τ log π_k).
    """
    if not is_valid_strength(strength):
        raise ValueError(f"{STRENGTH_KEY}={strength!r}: {STRENGTH_RULE}")
    return strength * log_prior(prior, label_names)


def adjusted_decisions(logits: torch.Tensor, log_prior: torch.Tensor | None) -> torch.Tensor:
    """argmax_k (z_k − log π_k) of each row of ``logits`` (…, K); plain argmax when None.

    ``log_prior`` (K,) is log π, or τ · log π from :func:`decision_offsets` with a strength.
    """
    if log_prior is None:
        return logits.argmax(-1)
    return (logits - log_prior.to(logits.device, logits.dtype)).argmax(-1)
