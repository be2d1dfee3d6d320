"""The results schema: the files of a run's results folder and every column of its metrics.

A run writes ``<output.dir>/<run name>/`` (:func:`server.results.save_run`):

- ``metrics.csv`` (:data:`METRICS_FILE`): one row per round, round 0 being the initial
  adapter, with the :data:`COLUMNS` below in this order (a column no row has is left out);
- ``config.json`` (:data:`CONFIG_FILE`): the flat run config (``AppConfig.to_dict``);
- ``environment.json`` (:data:`ENVIRONMENT_FILE`): what computed it: the resolved precision,
  device, CPU and package versions (:func:`common.environment.run_environment`);
- ``adapter/`` (:data:`ADAPTER_DIR`): the peft adapter;
- ``generations.json`` (:data:`GENERATIONS_FILE`), causal LM only: the final model's greedy
  continuations of fixed held-out prompts (:mod:`server.generations`);
- ``class-prior.json`` (:data:`CLASS_PRIOR_FILE`), with ``data.class-prior = "census"`` only:
  the class shares the nodes' DP label counts gave (:mod:`server.census`);
- ``run.log`` (:data:`RUN_LOG`): everything the run printed, when ``simulations.run`` ran it
  (each attempt appended after a header line).

The strategy produces the training columns of a round (:class:`RoundTrainingMetrics`), the
server's evaluator adds the evaluation columns and writes the row; summaries, the sweep's
records and reports and the plots read the columns by these names. The keys that are also
message keys (:mod:`common.contract`) are the same strings.

The sweep's tables (:mod:`simulations.reports`) name their columns here too
(:data:`TABLE_COLUMNS`): a record's ``cells/<run>.csv`` (the run's settings, then its
``metrics.csv``), the tidy ``sweep.csv`` (one row per run per round: the settings and the
metrics, each metric by its :func:`tidy_name`) and ``summary.csv`` / ``paired.csv`` (one row
per group of runs: the group's settings and its statistics over the runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common import contract

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.json"
GENERATIONS_FILE = "generations.json"
ENVIRONMENT_FILE = "environment.json"
CLASS_PRIOR_FILE = "class-prior.json"
ADAPTER_DIR = "adapter"
RUN_LOG = "run.log"

ROUND = "round"
WALL_SECONDS = "wall-seconds"
EVAL_SPLIT = "eval-split"
ACCURACY = contract.ACCURACY
BALANCED_ACCURACY = "balanced-accuracy"
MOST_PREDICTED_SHARE = "most-predicted-share"
AUC = "auc"
LOSS = contract.LOSS
PERPLEXITY = "perplexity"
EVAL_EXAMPLES = "eval-examples"
TRAIN_LOSS = contract.TRAIN_LOSS
EPSILON_MEAN = "epsilon-mean"
EPSILON_MAX = "epsilon-max"
NOISE_MULTIPLIER = contract.NOISE_MULTIPLIER
CLIENTS_TRAINED = "clients-trained"
NUM_EXAMPLES = contract.NUM_EXAMPLES
BYTES_UP = "bytes-up"
BYTES_DOWN = "bytes-down"
CLIENTS_EXHAUSTED = "clients-exhausted"
REPLIES_REJECTED = "replies-rejected"
REPLIES_FAILED = "replies-failed"
REPLIES_LATE = "replies-late"
WEIGHTS_CAPPED = "weights-capped"
UPDATES_BOUNDED = "updates-bounded"


@dataclass(frozen=True)
class Column:
    """One column of ``metrics.csv``: its name, the type of its values, what it means."""

    name: str
    type: type
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column(ROUND, int, "server round; 0: the initial adapter, before any training"),
    Column(WALL_SECONDS, float, "seconds since the run started (a resumed run goes on counting)"),
    Column(EVAL_SPLIT, str, "what the server evaluated on: test, or validation when tuning"),
    Column(ACCURACY, float, "accuracy of the global model on the evaluated examples (causal "
                            "LM: of the next token; empty: round not evaluated, "
                            "strategy.eval-every)"),
    Column(BALANCED_ACCURACY, float, "classification only: the mean over the classes present "
                                     "in the evaluated examples of each one's recall (chance "
                                     "1/K whatever the class shares; majority class: 1/K)"),
    Column(MOST_PREDICTED_SHARE, float, "classification only: the share of the evaluated "
                                        "examples given the class the model predicts most "
                                        "often (1: one answer for every example)"),
    Column(AUC, float, "classification only: the mean over the classes present of the "
                       "one-vs-rest ROC AUC of the softmax (0.5: chance; no decision threshold "
                       "decides it, so a model that ranks the classes but gives the majority "
                       "class to every example scores high here and 1/K in balanced accuracy)"),
    Column(LOSS, float, "mean cross-entropy of the global model on the evaluated examples "
                        "(causal LM: per predicted token)"),
    Column(PERPLEXITY, float, "causal LM only: exp(loss), per predicted token"),
    Column(EVAL_EXAMPLES, int, "examples evaluated: the fixed subset, or the whole split in "
                               "the last round"),
    Column(TRAIN_LOSS, float, "mean local training loss, weighted by the clients' examples"),
    Column(EPSILON_MEAN, float, "mean over the round's trained clients of their cumulative ε"),
    Column(EPSILON_MAX, float, "largest cumulative ε of a trained client"),
    Column(NOISE_MULTIPLIER, float, "largest DP-SGD noise multiplier σ of a trained client"),
    Column(CLIENTS_TRAINED, int, "valid replies aggregated this round (0: no update)"),
    Column(NUM_EXAMPLES, float, "sum of the aggregated replies' (capped) example counts"),
    Column(BYTES_UP, int, "bytes of arrays the clients sent this round"),
    Column(BYTES_DOWN, int, "bytes of arrays the server broadcast this round"),
    Column(CLIENTS_EXHAUSTED, int, "sampled clients that refused to train: budget spent"),
    Column(REPLIES_REJECTED, int, "replies the screen rejected (strategies.validation)"),
    Column(REPLIES_FAILED, int, "replies that were Flower errors (client crashed or lost)"),
    Column(REPLIES_LATE, int, "sampled clients with no reply within strategy.round-timeout "
                              "(a later reply is discarded)"),
    Column(WEIGHTS_CAPPED, int, "replies whose example count was capped "
                                "(strategy.max-weight-ratio)"),
    Column(UPDATES_BOUNDED, int, "replies whose update was scaled down to the round's "
                                 "lower-median update norm (strategy.bound-updates)"),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
TRAINING_COLUMNS = COLUMN_NAMES[COLUMN_NAMES.index(TRAIN_LOSS):]  # from the strategy

RUN = "run"
METHOD = "method"
EPSILON_BUDGET = "epsilon"  # the run's privacy.epsilon, not a client's spent ε (contract.EPSILON)
ALPHA = "alpha"
SEED = "seed"
LEARNING_RATE = "learning_rate"
NUM_ROUNDS = "num_rounds"
SETTINGS = "settings"
COMPUTE_DTYPE = "compute_dtype"
N_RUNS = "n"
MEAN = "mean"
SD = "sd"
CI95 = "ci95"

# name: (type, meaning); a dict here, so that it reads as the table of names it is
_TABLE_MEANINGS: dict[str, tuple[type, str]] = {
    RUN: (str, "the run's name (a sweep cell's: <method>-eps<ε>-a<α>-seed<s>)"),
    METHOD: (str, "strategy.name"),
    EPSILON_BUDGET: (float, "privacy.epsilon: each client's ε budget (inf: no DP)"),
    ALPHA: (float, "data.dirichlet-alpha of the partition"),
    SEED: (int, "seed"),
    LEARNING_RATE: (float, "train.learning-rate"),
    NUM_ROUNDS: (int, "strategy.num-rounds: the round whose row is the run's final one"),
    SETTINGS: (str, "8 hex digits of the settings the runs of one table share "
               "(simulations.reports.records.settings_digest)"),
    COMPUTE_DTYPE: (str, "the precision the frozen encoder computed in "
                    "(environment.json), or unrecorded"),
    N_RUNS: (int, "summary: runs (seeds) in the group"),
    MEAN: (float, "summary: mean final accuracy of the group's runs (paired: mean "
           "difference, the reference minus the method)"),
    SD: (float, "summary: standard deviation over the group's runs (n − 1)"),
    CI95: (float, "summary: half-width of the 95 % Student t interval of the mean"),
}
TABLE_COLUMNS: tuple[Column, ...] = tuple(
    Column(name, kind, meaning) for name, (kind, meaning) in _TABLE_MEANINGS.items())
TABLE_COLUMN_NAMES = tuple(c.name for c in TABLE_COLUMNS)


def tidy_name(column: str) -> str:
    """A metrics.csv column's name in the sweep's tables: ``-`` as ``_`` (``wall_seconds``).

    Each is then a Python identifier, as pandas' ``itertuples`` needs.
    """
    return column.replace("-", "_")


def ordered_columns(rows: list[Mapping[str, object]]) -> list[str]:
    """The schema's columns that some row has, in schema order.

    Raise ``ValueError`` naming any key outside the schema: every column has one home here.
    """
    present = {key for row in rows for key in row}
    if unknown := sorted(present - set(COLUMN_NAMES)):
        raise ValueError(f"metrics {unknown} are not in the results schema (common.schema)")
    return [name for name in COLUMN_NAMES if name in present]


class RoundTrainingMetrics:
    """The training columns of each round, by round: the strategy writes, the evaluator reads.

    :meth:`strategies.base.LoraStrategy.aggregate_train` records what a round's training
    produced (the aggregated client metrics and the screening counts, also when the round made
    no update, which Flower's own train metrics leave out); the server's evaluator, given the
    same object, puts them in the round's row.
    """

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, float]] = {}

    def record(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Keep ``metrics`` (keys from :data:`TRAINING_COLUMNS`) as round ``server_round``'s."""
        if unknown := sorted(set(metrics) - set(TRAINING_COLUMNS)):
            raise ValueError(f"round {server_round}: {unknown} are not training columns of the "
                             "results schema (common.schema)")
        self._rounds[server_round] = dict(metrics)

    def of(self, server_round: int) -> dict[str, float]:
        """Round ``server_round``'s training columns; {} if it recorded none."""
        return dict(self._rounds.get(server_round, {}))
