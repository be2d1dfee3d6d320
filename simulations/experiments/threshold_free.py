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

    python -m simulations.experiments.threshold_free results/binary-check/RUN/CELL ...

One markdown row per run folder (a folder ``simulations.run`` or the sweep wrote: its
``config.json`` and ``adapter/``), on the run's whole test split, under the run's compute dtype.
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

from common.config import AppConfig
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


def scores(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray) -> Scores:
    """Scores of logits (N, K) against labels (N,) in [0, K), with the class prior π (K,) > 0."""
    if prior.shape != (logits.shape[1],) or (prior <= 0).any():
        raise ValueError(f"the prior needs {logits.shape[1]} shares > 0, got {prior}")
    auc = one_vs_rest_auc(torch.from_numpy(logits), torch.from_numpy(labels))
    predicted = logits.argmax(axis=1)
    adjusted = (logits - np.log(prior)).argmax(axis=1)
    return Scores(math.nan if auc is None else auc,
                  float(balanced_accuracy_score(labels, predicted)),
                  float(balanced_accuracy_score(labels, adjusted)),
                  float(np.bincount(predicted).max() / len(predicted)))


@torch.no_grad()
def logits_on_test_split(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The saved run's final model on its test split: logits (N, K), labels (N,), prior (K,)."""
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
    return (torch.cat(logits).numpy(), torch.cat(labels).numpy(), counts / counts.sum())


def main(argv: Sequence[str] | None = None) -> int:
    """Print each run folder's scores; 1, before any model loads, if one is not a run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders (config.json, adapter/)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders
               if not ((f / "config.json").is_file() and (f / "adapter").is_dir())]
    if missing:
        print(f"error: no config.json and adapter/ in {', '.join(missing)}", file=sys.stderr)
        return 1
    print("| run | test examples | AUC | balanced accuracy (argmax) | balanced accuracy "
          "(logit-adjusted) | most predicted share |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        logits, labels, prior = logits_on_test_split(folder)
        s = scores(logits, labels, prior)
        print(f"| {folder.parent.name}/{folder.name} | {len(labels)} | {s.auc:.3f} | "
              f"{s.balanced_accuracy:.3f} | {s.adjusted_balanced_accuracy:.3f} | "
              f"{s.most_predicted_share:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
