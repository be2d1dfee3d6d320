"""How well a saved run's final model tells the classes apart, without the argmax's threshold.

The runs' balanced accuracy scores ``argmax_k z_k`` (z: the K logits). On an imbalanced file a
model can rank the classes well and still give the majority class to every example, because
its logits carry the training prior π (cross-entropy rewards log π_k in z_k) more strongly
than what it reads. Two measures that this threshold does not decide:

* **ROC AUC** (:func:`common.evaluation.one_vs_rest_auc`, which every run's evaluation reports
  since 2026-12-05; this script scores runs saved before): the probability that a random
  example of class k gets a higher softmax(z)_k than a random example of another class, the
  mean over k. 0.5 is chance, whatever the class shares.
* **Balanced accuracy after logit adjustment** (Menon et al. 2021, "Long-tail learning via
  logit adjustment"): predict ``argmax_k (z_k − log π_k)``, the decision that maximises
  balanced accuracy when softmax(z) is the posterior under the prior π. π here is the class
  shares of the run's whole training split: in a federation that is the clients' data, so
  this is a diagnostic of a simulation, not a decision a deployment could make without a
  public (or privately counted) prior. A run can declare such a prior (``data.class-prior``,
  :mod:`common.class_prior`); its evaluation then reports these decisions itself.

    python -m simulations.threshold_free results/binary-check/RUN/CELL ...
    python -m simulations.threshold_free --strengths 0,0.25,0.5,0.75,1 RUN ...

One markdown row per run folder (a folder ``simulations.run`` or the sweep wrote: its
``config.json`` and ``adapter/``), on the run's whole held-out split (its test split, or its
validation split when it ran with ``data.validation-fraction``), under the run's compute dtype.
``--strengths``: a second table, one row per run and strength τ, of the decisions
argmax_k (z_k − τ log π_k) (``data.class-prior-strength``): their accuracy and balanced
accuracy, with π the prior the run decided by (declared ``data.class-prior``, or the census's
shares; else its training shares, marked).
Run on a validation run's folders, it is how τ is chosen without touching the test split: one
trained model scores every τ, so the strengths are compared on the same logits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from common import schema
from common.class_prior import STRENGTH_RULE, is_valid_strength, log_prior
from common.config import AppConfig, DataConfig
from common.data import load_corpus
from common.evaluation import batch_logits, one_vs_rest_auc
from common.model import load_tokenizer
from common.model_path import resolve_model_path
from common.precision import resolve_compute_dtype
from common.tasks import TASKS
from server.results import load_model


@dataclass(frozen=True)
class Scores:
    """What :func:`scores` measured on one set of examples (see the module's docstring)."""

    auc: float  # nan with fewer than two classes among the labels
    balanced_accuracy: float  # of argmax_k z_k, as the runs report it
    adjusted_balanced_accuracy: float  # of argmax_k (z_k − log π_k)
    most_predicted_share: float  # share of the examples given the most predicted class


def _check_prior(logits: np.ndarray, prior: np.ndarray) -> None:
    """Raise ValueError unless ``prior`` has one share > 0 per column of ``logits`` (N, K)."""
    if prior.shape != (logits.shape[1],) or (prior <= 0).any():
        raise ValueError(f"the prior needs {logits.shape[1]} shares > 0, got {prior}")


def scores(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray) -> Scores:
    """Scores of logits (N, K) against labels (N,) in [0, K), with the class prior π (K,) > 0."""
    _check_prior(logits, prior)
    auc = one_vs_rest_auc(torch.from_numpy(logits), torch.from_numpy(labels))
    predicted = logits.argmax(axis=1)
    adjusted = (logits - np.log(prior)).argmax(axis=1)
    return Scores(math.nan if auc is None else auc,
                  float(balanced_accuracy_score(labels, predicted)),
                  float(balanced_accuracy_score(labels, adjusted)),
                  float(np.bincount(predicted).max() / len(predicted)))


@dataclass(frozen=True)
class StrengthScores:
    """The decisions argmax_k (z_k − τ log π_k) of one strength τ, scored."""

    strength: float
    accuracy: float
    balanced_accuracy: float
    most_predicted_share: float


def strength_scores(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray,
                    strengths: Sequence[float]) -> list[StrengthScores]:
    """Each τ of ``strengths`` scored on logits (N, K), labels (N,), π (K,) > 0 (normalised).

    τ = 0 is argmax_k z_k, τ = 1 the full adjustment of :func:`scores`.
    """
    _check_prior(logits, prior)
    log_shares = np.log(prior / prior.sum())
    rows = []
    for tau in strengths:
        if not is_valid_strength(tau):
            raise ValueError(f"strength {tau!r}: {STRENGTH_RULE}")
        decided = (logits - tau * log_shares).argmax(axis=1)
        rows.append(StrengthScores(tau, float((decided == labels).mean()),
                                   float(balanced_accuracy_score(labels, decided)),
                                   float(np.bincount(decided).max() / len(decided))))
    return rows


@dataclass(frozen=True)
class HeldOut:
    """A saved run's final model on its held-out split (``split``: "test" or "validation")."""

    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,)
    training_prior: np.ndarray  # (K,) the class shares of the run's training split
    declared_prior: np.ndarray | None  # (K,) the prior the run decided by (run_prior); None
    split: str
    prior_source: str = "declared"  # "declared" (data.class-prior) or "census"


@torch.no_grad()
def held_out_logits(folder: Path) -> HeldOut:
    """The saved run's final model on its held-out split, with its priors."""
    cfg = AppConfig.from_run_config(json.loads((folder / "config.json").read_text()))
    corpus = load_corpus(cfg.data, cfg.seed)
    task = TASKS[cfg.model.task]
    num_labels = len(corpus.label_names)
    base = task.load_model(resolve_model_path(cfg.model), num_labels=num_labels)
    model = load_model(base, folder / "adapter").eval()
    data = task.encode(corpus.test, load_tokenizer(cfg.model), cfg.model.max_length)
    dtype = resolve_compute_dtype(cfg.model.compute_dtype, "cpu")
    logits, labels = zip(*batch_logits(model, data, compute_dtype=dtype), strict=True)
    counts = np.bincount(np.asarray(corpus.train["label"]), minlength=num_labels)
    prior, source = run_prior(folder, cfg.data, corpus.label_names)
    return HeldOut(torch.cat(logits).numpy(), torch.cat(labels).numpy(), counts / counts.sum(),
                   prior, corpus.eval_split, source)


def run_prior(folder: Path, data: DataConfig,
              label_names: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """π (K,) the run decided by, normalised, and where it came from; (None, "") without one.

    ``data.class-prior`` as declared, or with ``"census"`` the shares the nodes counted under
    DP, from the run's ``class-prior.json`` (:mod:`server.census`).
    """
    if data.class_prior_census:
        path = folder / schema.CLASS_PRIOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a census run without the shares it decided by")
        shares, source = json.loads(path.read_text(encoding="utf-8"))["shares"], "census"
    elif data.declared_prior:
        shares, source = data.declared_prior, "declared"
    else:
        return None, ""
    return log_prior(shares, label_names).double().exp().numpy(), source


def _strengths(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Print each run folder's scores; 1, before any model loads, if one is not a run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders (config.json, adapter/)")
    parser.add_argument("--strengths", type=_strengths, default=[],
                        help="comma-separated τ ≥ 0: also score argmax(z − τ log π) for each")
    args = parser.parse_args(argv)
    if bad := [t for t in args.strengths if not is_valid_strength(t)]:
        print(f"error: --strengths {bad}: each {STRENGTH_RULE}", file=sys.stderr)
        return 2
    missing = [str(f) for f in args.folders
               if not ((f / "config.json").is_file() and (f / "adapter").is_dir())]
    if missing:
        print(f"error: no config.json and adapter/ in {', '.join(missing)}", file=sys.stderr)
        return 1
    print("| run | held-out examples | AUC | balanced accuracy (argmax) | balanced accuracy "
          "(logit-adjusted by the training shares) | most predicted share |")
    print("|---|---|---|---|---|---|")
    by_strength = []
    for folder in args.folders:
        held = held_out_logits(folder)
        s = scores(held.logits, held.labels, held.training_prior)
        name = f"{folder.parent.name}/{folder.name}"
        print(f"| {name} | {len(held.labels)} ({held.split}) | {s.auc:.3f} | "
              f"{s.balanced_accuracy:.3f} | {s.adjusted_balanced_accuracy:.3f} | "
              f"{s.most_predicted_share:.3f} |", flush=True)
        if args.strengths:
            prior, which = ((held.declared_prior, held.prior_source)
                            if held.declared_prior is not None
                            else (held.training_prior, "training shares"))
            by_strength += [(name, held.split, which, row) for row in
                            strength_scores(held.logits, held.labels, prior, args.strengths)]
    if by_strength:
        print("\n| run | split | π | τ | accuracy | balanced accuracy | most predicted share |")
        print("|---|---|---|---|---|---|---|")
        for name, split, which, row in by_strength:
            print(f"| {name} | {split} | {which} | {row.strength:g} | {row.accuracy:.4f} | "
                  f"{row.balanced_accuracy:.4f} | {row.most_predicted_share:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
