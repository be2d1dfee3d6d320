"""Checkpoint after every round, and resume a crashed run after its last checkpoint.

Flower's ``Strategy.start`` always numbers rounds 1..num_rounds and evaluates "round 0" first.
:class:`CheckpointedRun` wraps the run's strategy. Resumed after round k of R, it runs the
remaining R − k rounds and adds k to every round number that the strategy (FedSVD's
``svd-period``, FLoRA's seed of the fresh A, RoLoRA's parity), the clients (``server-round``)
and the server evaluation see, so rounds k+1..R behave exactly as in an uninterrupted run; the
round-0 evaluation is skipped, because round k's row is already in the checkpoint. In a fresh
run (k = 0) it only adds the checkpoint after every round. Flower's own log lines
(``[ROUND i/R−k]``) keep Flower's numbering; the strategy's and the evaluation's use the real
round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common.config import AppConfig
from server.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from server.evaluation import GlobalEvaluator

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class CheckpointedRun(Strategy):
    """``strategy`` from round ``done + 1`` on, with ``save(round, arrays)`` after every round.

    Parameters
    ----------
    strategy : the run's strategy; every call to it gets the real round number.
    save : called after each round's server evaluation (also after round 0 of a fresh run) with
        the real round and the global arrays after it.
    done : the last round of the checkpoint resumed from; ``None``: a fresh run.
    """

    def __init__(self, strategy: Strategy, *, save: Callable[[int, ArrayRecord], None],
                 done: int | None = None) -> None:
        self.strategy, self.save, self.done = strategy, save, done
        self.offset = done or 0

    def summary(self) -> None:
        """Log the strategy settings, and where a resumed run continues."""
        if self.done is not None:
            log(INFO, "\t├──> resumed after round %d: Flower's round i below is round %d + i",
                self.done, self.done)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The strategy's ``configure_train`` at the real round."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's ``aggregate_train`` at the real round."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The strategy's ``configure_evaluate`` at the real round."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The strategy's ``aggregate_evaluate`` at the real round."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Flower's ``Strategy.start`` over the rounds after ``done`` of ``num_rounds`` in all.

        ``timeout`` bounds each round's wait for the train and the evaluate replies (the
        ServerApp passes ``strategy.round-timeout``; 3600 is Flower's default). The returned
        ``Result`` keys its per-round metrics by Flower's numbering (1, 2, ...).
        """
        def evaluate_and_save(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and self.done is not None:
                return None  # round `done`: evaluated, recorded and saved before the crash
            server_round = flower_round + self.offset
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            self.save(server_round, arrays)
            return metrics

        return super().start(grid, initial_arrays, num_rounds - self.offset, timeout,
                             train_config, evaluate_config, evaluate_and_save)


def prepare_run(strategy: Strategy, evaluator: GlobalEvaluator, folder: Path, cfg: AppConfig,
                initial: ArrayRecord) -> tuple[CheckpointedRun, ArrayRecord]:
    """The run to start and its starting arrays: fresh, or after the checkpoint in ``folder``.

    With ``output.resume`` the checkpoint must exist and come from the same run configuration
    (:func:`server.checkpoint.load_checkpoint` raises otherwise); its rows go back into
    ``evaluator`` and its random-number states into this process, last, so that the next round
    samples clients exactly as the crashed run would have.
    """
    optimizer = getattr(strategy, "server_optimizer", None)  # a LoraStrategy's

    def save(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(folder, server_round=server_round, arrays=arrays, cfg=cfg,
                        rows=evaluator.rows,
                        optimizer=None if optimizer is None else optimizer.state_dict())

    if not cfg.output.resume:  # server.preflight refused a folder that holds results
        return CheckpointedRun(strategy, save=save), initial
    checkpoint = load_checkpoint(folder, cfg)
    evaluator.restore(checkpoint.rows)
    log(INFO, "resuming %s after round %d of %d", folder, checkpoint.server_round,
        cfg.strategy.num_rounds)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
    restore_rng(checkpoint.rng)
    return CheckpointedRun(strategy, save=save, done=checkpoint.server_round), checkpoint.arrays
