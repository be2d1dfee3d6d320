"""Server-side evaluation of the global adapter on the held-out test split, every round."""

from __future__ import annotations

import time
from collections.abc import Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from peft import PeftModel
from torch.utils.data import TensorDataset

from common import schema
from common.adapter import AdapterLayout
from common.evaluation import Evaluation, evaluation
from common.task_kinds import CLASSIFICATION
from common.tasks import TASKS, Task

# A final model that gives one class to at least this share of the evaluated examples is
# reported as not having learned to tell the classes apart (its accuracy is that class's share).
ONE_ANSWER_SHARE = 0.99


def gives_one_answer(most_predicted_share: float | None) -> bool:
    """Whether a classifier gave one class to ≥ :data:`ONE_ANSWER_SHARE` of the examples."""
    return most_predicted_share is not None and most_predicted_share >= ONE_ANSWER_SHARE


class GlobalEvaluator:
    """``evaluate_fn`` for ``Strategy.start``: accuracy and loss of the global model.

    Round 0 and every ``eval_every``-th round before ``final_round`` use a fixed random subset
    of the test split (fast); the final round uses the whole split. The other rounds are not
    evaluated: their row holds the round's training metrics alone. Each row also records wall
    time since start. The columns are those of :mod:`common.schema`; ``training`` holds the
    training columns the strategy recorded for each round. The model runs under
    ``compute_dtype`` (:mod:`common.precision`); a causal LM's rows add its perplexity
    (:mod:`common.tasks`). A classifier whose final model gives one class (named from
    ``label_names``) to ≥ :data:`ONE_ANSWER_SHARE` of the examples gets a WARNING: its accuracy
    is then that class's share of the split, not learning. With ``log_prior`` (K,), the log of
    the declared public class prior (``data.class-prior``, :mod:`common.class_prior`; τ · log π
    with a ``data.class-prior-strength`` τ), every decision is argmax_k (z_k − log π_k):
    accuracy, balanced accuracy and the one-answer check follow it; loss and AUC are the
    model's own.
    """

    def __init__(self, model: PeftModel, layout: AdapterLayout, *, subset: TensorDataset,
                 full: TensorDataset, final_round: int, training: schema.RoundTrainingMetrics,
                 split: str = "test", eval_every: int = 1,
                 compute_dtype: torch.dtype = torch.float32,
                 task: Task = TASKS[CLASSIFICATION.name],
                 label_names: Sequence[str] | None = None,
                 log_prior: torch.Tensor | None = None) -> None:
        self.model, self.layout = model, layout
        self.subset, self.full, self.final_round = subset, full, final_round
        self.eval_every, self.compute_dtype = eval_every, compute_dtype
        self.split = split  # "test", or "validation" when tuning (data.validation-fraction)
        self.training = training
        self.task, self.label_names, self.log_prior = task, label_names, log_prior
        self.rows: list[dict[str, float]] = []
        self._t0 = time.monotonic()

    def restore(self, rows: list[dict[str, float]]) -> None:
        """Continue from a checkpoint's rows; wall time goes on from the last row's.

        The time between the crash and the resume is not counted.
        """
        self.rows = list(rows)
        if rows:
            self._t0 = time.monotonic() - float(rows[-1][schema.WALL_SECONDS])

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` is evaluated: round 0, every ``eval_every``-th, the last."""
        return server_round % self.eval_every == 0 or server_round == self.final_round

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Load ``arrays`` into the model and evaluate it (or only record the round's row)."""
        train = self.training.of(server_round)
        row = {schema.ROUND: server_round, schema.WALL_SECONDS: time.monotonic() - self._t0,
               schema.EVAL_SPLIT: self.split}
        if not self.evaluates(server_round):
            self.rows.append({**row, **train})
            log(INFO, "round %d | not evaluated (strategy.eval-every=%d) | client ε mean %s "
                "max %s | %.0f s", server_round, self.eval_every,
                _fmt(train.get(schema.EPSILON_MEAN)), _fmt(train.get(schema.EPSILON_MAX)),
                row[schema.WALL_SECONDS])
            return None
        self.layout.load(arrays.to_torch_state_dict())
        data = self.full if server_round == self.final_round else self.subset
        measured = evaluation(self.model, data, compute_dtype=self.compute_dtype,
                              task=self.task, log_prior=self.log_prior)
        loss, accuracy = measured.loss, measured.accuracy
        metrics = MetricRecord({schema.ACCURACY: accuracy, schema.LOSS: loss,
                                schema.EVAL_EXAMPLES: len(data)})
        class_metrics = ""  # what the log line shows of a classifier
        if measured.balanced_accuracy is not None:
            metrics[schema.BALANCED_ACCURACY] = measured.balanced_accuracy
            metrics[schema.MOST_PREDICTED_SHARE] = measured.most_predicted_share
            class_metrics = f"balanced accuracy {measured.balanced_accuracy:.4f} | "
        if measured.auc is not None:
            metrics[schema.AUC] = measured.auc
            class_metrics += f"AUC {measured.auc:.4f} | "
        metrics.update(self.task.loss_metrics(loss))
        row[schema.WALL_SECONDS] = time.monotonic() - self._t0
        self.rows.append({**row, **metrics, **train})
        log(INFO, "round %d | %s accuracy %.4f | %s%s loss %.4f | client ε mean %s max %s "
            "| MB up %.2f down %.2f | %.0f s", server_round, self.split, accuracy, class_metrics,
            self.split, loss, _fmt(train.get(schema.EPSILON_MEAN)),
            _fmt(train.get(schema.EPSILON_MAX)), train.get(schema.BYTES_UP, 0) / 1e6,
            train.get(schema.BYTES_DOWN, 0) / 1e6, row[schema.WALL_SECONDS])
        if server_round == self.final_round and (warning := self.one_answer(measured, len(data))):
            log(WARNING, "%s", warning)
        return metrics

    def one_answer(self, measured: Evaluation, examples: int) -> str | None:
        """What to tell a user whose final classifier gives (almost) every example one class.

        None unless ≥ :data:`ONE_ANSWER_SHARE` of the ``examples`` got the same class.
        """
        share, most = measured.most_predicted_share, measured.most_predicted
        if most is None or not gives_one_answer(share):
            return None
        name = self.label_names[most] if self.label_names else str(most)
        ranking = ("" if measured.auc is None else
                   f" Its ROC AUC, which no decision threshold decides, is {measured.auc:.4f} "
                   "(0.5: chance): near 0.5 it has not learned to tell the classes apart; well "
                   "above, it ranks them but its decisions lean on the larger class's share "
                   "(experiments/binary-check/README.md).")
        return (f"the final model predicts class {name!r} for {share:.1%} of the {examples} "
                f"{self.split} examples: its accuracy {measured.accuracy:.4f} is about that "
                f"class's share of them and its balanced accuracy "
                f"{measured.balanced_accuracy:.4f} is chance.{ranking} Train longer "
                "(strategy.num-rounds; an imbalanced file needs more rounds than the defaults, "
                "README: 'What the defaults assume'), or with a larger privacy.epsilon"
                + ("" if self.log_prior is not None else
                   ", or declare the classes' public shares (data.class-prior) so that each "
                   "decision divides a class's probability by its share"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
