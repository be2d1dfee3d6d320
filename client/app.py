"""Flower ClientApp: train only the LoRA factors the strategy names (FedSVD: B) under DP-SGD."""

from __future__ import annotations

import math
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client import training as t
from client.ledger import node_max_epsilon, node_privacy_state
from client.received_state import received_state
from common import contract
from common.config import AppConfig, PrivacyConfig
from common.data import load_corpus, load_partition
from common.evaluation import evaluate as evaluate_model
from privacy import PrivacyLedger
from privacy.census import (
    CENSUS_ACTION,
    CENSUS_RECORD,
    NOISY_COUNTS,
    census_entry,
    check_census_budget,
    noisy_label_counts,
)
from privacy.policy import RoundPrivacy, check_census_fits, node_budget, plan_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load data and the global adapter → plan the round's privacy → DP-SGD steps → reply.

    The node refuses to train (and says so in its reply) when the round's steps would take its
    ε past the budget (:func:`privacy.policy.plan_round`); its ledger is kept where
    :func:`client.ledger.ledger_place` says (on a SuperNode: a file spanning every run).
    """
    cfg = AppConfig.from_run_config(context.run_config)
    with node_privacy_state(context, cfg) as place:
        return _train(msg, context, cfg, spans_runs=place.spans_runs)


def _train(msg: Message, context: Context, cfg: AppConfig, *, spans_runs: bool) -> Message:
    partition_id, num_partitions = t.node_partition(context)
    data = t.load_local_data(cfg, partition_id, num_partitions)
    model, layout = t.build_global_model(cfg, data.num_labels, received_state(msg.content, context))
    t.seed_local_randomness(cfg.seed, msg.content[contract.CONFIG], partition_id,
                            deterministic=cfg.train.deterministic)
    factors = t.parse_factors(msg.content[contract.CONFIG])
    ledger, sigma = t.load_ledger(context, cfg.privacy.accountant)
    max_epsilon = node_max_epsilon(context)
    budget = plan_round(cfg, ledger, num_examples=len(data.train), noise_multiplier=sigma,
                        where=f"partition {partition_id}", max_epsilon=max_epsilon)
    loss, moved = float("nan"), 0.0
    if budget.exhausted and spans_runs:
        _log_refusal(cfg.privacy, ledger, budget, partition_id, max_epsilon)
    elif not budget.exhausted:
        before = layout.tensors(factors, head=False)
        private = t.privatize(cfg, model, layout, factors, data.train, budget, ledger)
        loss = t.run_local_steps(private, budget.steps, t.compute_dtype(cfg.model),
                                 encoder_dropout=cfg.model.encoder_dropout)
        private.record_into(ledger)
        _record_without_noise(cfg.privacy, ledger, budget, spans_runs=spans_runs)
        t.store_ledger(context, ledger, budget.noise_multiplier)
        moved = t.moved_norm(before, layout, factors, require_each=cfg.privacy.is_private)
    arrays = ArrayRecord(torch_state_dict=layout.tensors(factors, head=cfg.lora.train_head))
    metrics = t.train_reply_metrics(num_examples=len(data.train), loss=loss, ledger=ledger,
                                    privacy=cfg.privacy, sigma=budget.noise_multiplier,
                                    steps=0 if budget.exhausted else budget.steps,
                                    exhausted=budget.exhausted, moved=moved)
    return Message(RecordDict({contract.ARRAYS: arrays, contract.METRICS: metrics}),
                   reply_to=msg)


def _log_refusal(privacy: PrivacyConfig, ledger: PrivacyLedger, budget: RoundPrivacy,
                 partition_id: int, max_epsilon: float | None) -> None:
    """Say on the SuperNode why it does not train: its ledger of every run is (nearly) spent."""
    why = ("spent" if math.isinf(budget.noise_multiplier)
           else f"this round would take it to {budget.epsilon_after:.4g}")
    log(WARNING, "partition %d does not train: its privacy ledger, which counts every run this "
        "node has served, holds ε = %.4g of its budget %g (%s)", partition_id,
        ledger.epsilon(privacy.delta), node_budget(privacy, max_epsilon), why)


def _record_without_noise(privacy: PrivacyConfig, ledger: PrivacyLedger, budget: RoundPrivacy, *,
                          spans_runs: bool) -> None:
    """A ledger spanning runs counts a round without DP (ε = inf) as σ = 0: ε is then inf.

    Its data was released without noise, so no later run may report a finite ε for it.
    """
    if spans_runs and not privacy.is_private:
        ledger.history.append((0.0, budget.sample_rate, budget.steps))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the global adapter on this node's test partition."""
    cfg = AppConfig.from_run_config(context.run_config)
    data = t.load_local_data(cfg, *t.node_partition(context))
    model, _ = t.build_global_model(cfg, data.num_labels, msg.content[contract.ARRAYS])
    loss, accuracy = evaluate_model(model, data.test, compute_dtype=t.compute_dtype(cfg.model),
                                    task=data.task)
    metrics = MetricRecord({contract.NUM_EXAMPLES: len(data.test), contract.LOSS: loss,
                            contract.ACCURACY: accuracy})
    return Message(RecordDict({contract.METRICS: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The roll call of seeded client sampling: this node's partition-id (public)."""
    partition_id, _ = t.node_partition(context)
    return Message(RecordDict({contract.METRICS: MetricRecord({contract.PARTITION_ID:
                                                                partition_id})}),
                   reply_to=msg)


@app.query(CENSUS_ACTION)
def census(msg: Message, context: Context) -> Message:
    """Answer the census: the node's label counts under DP, once per run, before it trains.

    Counts c + N(0, σ_c² I_K) of its training partition (:mod:`privacy.census`), σ_c =
    ``privacy.census-noise-multiplier`` (exact counts in a run without DP). The release enters
    the node's ledger first, so every ε it reports covers it and its DP-SGD σ is calibrated
    after it. Refused (an error reply) when the run has no census, when this run has already
    had a census or a trained round from this node (a second census could average the noise
    away; after training, σ was calibrated without it), or when the census would take the
    ledger (earlier runs included, when it spans runs) to the budget.
    """
    cfg = AppConfig.from_run_config(context.run_config)
    with node_privacy_state(context, cfg) as place:
        return _census(msg, context, cfg, spans_runs=place.spans_runs)


def _census(msg: Message, context: Context, cfg: AppConfig, *, spans_runs: bool) -> Message:
    if not cfg.data.class_prior_census:
        raise ValueError("this run has no census (data.class-prior is not 'census'): this node "
                         "sends no label counts")
    partition_id, num_partitions = t.node_partition(context)
    task = cfg.model.task_kind  # a classification one: a census needs labels (AppConfig)
    train, _ = load_partition(cfg.data, cfg.seed, partition_id, num_partitions, task)
    ledger = _count_census(cfg.privacy, context, partition_id, spans_runs=spans_runs)
    counts = noisy_label_counts(train["label"], load_corpus(cfg.data, cfg.seed, task).num_labels,
                                cfg.privacy.census_noise)
    metrics = MetricRecord({contract.PARTITION_ID: partition_id,
                            contract.EPSILON: ledger.epsilon(cfg.privacy.delta)
                            if cfg.privacy.is_private else math.inf})
    return Message(RecordDict({CENSUS_RECORD: ConfigRecord({NOISY_COUNTS: counts.tolist()}),
                               contract.METRICS: metrics}), reply_to=msg)


def _count_census(privacy: PrivacyConfig, context: Context, partition_id: int, *,
                  spans_runs: bool) -> PrivacyLedger:
    """Check that this node may answer this run's census, and enter it in the ledger.

    One census per run (``context.run_id``), before the run trains; every census of every run
    stays in the ledger. A run without DP releases exact counts: a ledger spanning runs counts
    them as σ = 0 (ε = inf), and a node with ``max-epsilon`` refuses them.
    """
    ledger, sigma = t.load_ledger(context, privacy.accountant)
    where, max_epsilon = f"partition {partition_id}", node_max_epsilon(context)
    if not privacy.is_private:
        if max_epsilon is not None:
            raise ValueError(f"{where} refuses the census: the run has privacy.epsilon=inf (exact "
                             f"counts) and this node's node config caps ε at {max_epsilon:g}")
        if spans_runs:
            ledger.history.append(census_entry(0.0))
            t.store_ledger(context, ledger, None)
        return ledger
    check_census_budget(privacy)
    if sigma is not None or t.census_answered(context):
        done = "a census" if t.census_answered(context) else "training steps"
        raise ValueError(f"{where} refuses the census: its privacy ledger already holds {done} of "
                         f"this run (run {context.run_id}); a node answers one census per run, "
                         "before the run trains")
    check_census_fits(privacy, ledger, max_epsilon=max_epsilon, where=where)
    ledger.history.append(census_entry(privacy.census_noise))
    t.store_ledger(context, ledger, None)
    t.mark_census_answered(context)
    return ledger
