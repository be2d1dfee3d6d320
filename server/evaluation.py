"""Server-side evaluation of the global adapter on the held-out test split, every round."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from peft import PeftModel
from torch.utils.data import TensorDataset

from common import schema
from common.adapter import AdapterLayout
from common.evaluation import evaluation
from common.tasks import TASKS, Task


class GlobalEvaluator:
    """``evaluate_fn`` for ``Strategy.start``: accuracy and loss of the global model.

    Round 0 and every ``eval_every``-th round before ``final_round`` use a fixed random subset
    of the test split (fast); the final round uses the whole split. The other rounds are not
    evaluated: their row holds the round's training metrics alone. Each row also records wall
    time since start. The columns are those of :mod:`common.schema`; ``training`` holds the
    training columns the strategy recorded for each round. The model runs under
    ``compute_dtype`` (:mod:`common.precision`); a causal LM's rows add its perplexity
    (:mod:`common.tasks`).
    """

    def __init__(self, model: PeftModel, layout: AdapterLayout, *, subset: TensorDataset,
                 full: TensorDataset, final_round: int, training: schema.RoundTrainingMetrics,
                 split: str = "test", eval_every: int = 1,
                 compute_dtype: torch.dtype = torch.float32,
                 task: Task = TASKS["classification"]) -> None:
        self.model, self.layout = model, layout
        self.subset, self.full, self.final_round = subset, full, final_round
        self.eval_every, self.compute_dtype = eval_every, compute_dtype
        self.split = split  # "test", or "validation" when tuning (data.validation-fraction)
        self.training = training
        self.task = task
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
                              task=self.task)
        loss, accuracy = measured.loss, measured.accuracy
        metrics = MetricRecord({schema.ACCURACY: accuracy, schema.LOSS: loss,
                                schema.EVAL_EXAMPLES: len(data)})
        if measured.balanced_accuracy is not None:
            metrics[schema.BALANCED_ACCURACY] = measured.balanced_accuracy
        metrics.update(self.task.loss_metrics(loss))
        row[schema.WALL_SECONDS] = time.monotonic() - self._t0
        self.rows.append({**row, **metrics, **train})
        log(INFO, "round %d | %s accuracy %.4f | %s loss %.4f | client ε mean %s max %s "
            "| MB up %.2f down %.2f | %.0f s", server_round, self.split, accuracy, self.split, loss,
            _fmt(train.get(schema.EPSILON_MEAN)), _fmt(train.get(schema.EPSILON_MAX)),
            train.get(schema.BYTES_UP, 0) / 1e6, train.get(schema.BYTES_DOWN, 0) / 1e6,
            row[schema.WALL_SECONDS])
        return metrics


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
