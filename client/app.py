"""Flower ClientApp: train only the LoRA factors the strategy names (FedSVD: B) under DP-SGD."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import training as t
from client.received_state import received_state
from common import contract
from common.config import RUN_LEDGER_DIR, AppConfig
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
from privacy.policy import plan_round

PRIVACY_STATE_KEY = "privacy-state-file"  # node config: where a SuperNode keeps its ledger

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load data and the global adapter → plan the round's privacy → DP-SGD steps → reply.

    The node refuses to train (and says so in its reply) when the round's steps would take its
    ε past the budget (:func:`privacy.policy.plan_round`).
    """
    cfg = AppConfig.from_run_config(context.run_config)
    with node_privacy_state(context, cfg):
        return _train(msg, context, cfg)


def ledger_path(context: Context, cfg: AppConfig) -> Path | None:
    """The file that keeps this node's privacy ledger, or None (``Context.state`` alone).

    The node config's ``privacy-state-file`` (a deployment: the node's own, across runs), else,
    when ``output.dir`` is absolute (as ``simulations.run`` passes it), the run's own
    ``<results folder>/privacy/partition-<id>.json``, so that a resumed simulation goes on
    counting from every step taken before the crash. A relative ``output.dir`` would resolve
    against the ClientApp's working directory, which is Flower's, not the server's.
    """
    raw = context.node_config.get(PRIVACY_STATE_KEY)
    if raw:
        path = Path(str(raw)).expanduser()
        if not path.is_absolute():  # the ClientApp's working directory is Flower's, not ours
            raise ValueError(f"{PRIVACY_STATE_KEY}={raw!r}: must be an absolute path")
        return path
    if not Path(cfg.output.dir).expanduser().is_absolute():
        return None
    partition_id, _ = t.node_partition(context)
    return cfg.results_folder / RUN_LEDGER_DIR / f"partition-{partition_id}.json"


@contextlib.contextmanager
def node_privacy_state(context: Context, cfg: AppConfig) -> Iterator[None]:
    """Keep the ledger in the file of :func:`ledger_path`, if any.

    ``Context.state`` lives only as long as the SuperNode process (and one run); the file makes
    a restarted node (or a resumed run) continue from every step it has ever taken, so it cannot
    reset its ε. A resumed private run without such a file is refused (ValueError): its node
    would count from zero the steps it took before the resume. The file is read into
    ``Context.state`` before the round unless ``Context.state`` already counts at least as many
    steps: a copy can only lag behind (a simulation spread over several machines writes each
    node's file on whichever machine ran its round, so another machine's copy can be stale), and
    the ledger that counts more is the true one. It is written back atomically after the round,
    under an exclusive lock so concurrent rounds cannot drop steps.
    """
    accountant = cfg.privacy.accountant
    path = ledger_path(context, cfg)
    if path is None and cfg.output.resume and cfg.privacy.is_private:
        # the steps before the crash are in no file this node can read: counting from 0 would
        # spend the budget a second time
        raise ValueError(
            f"output.resume=true with output.dir={cfg.output.dir!r} (relative) and no node "
            f"config {PRIVACY_STATE_KEY}: this node cannot read the privacy ledger of the "
            "rounds before the resume; set output.dir to an absolute path (simulations.run "
            f"does) or give each node a {PRIVACY_STATE_KEY}")
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        if path.exists():
            on_disk, sigma = PrivacyLedger.load(path, accountant)
            if on_disk.steps >= t.load_ledger(context, accountant)[0].steps:
                t.store_ledger(context, on_disk, sigma)
        try:
            yield
        finally:
            ledger, sigma = t.load_ledger(context, accountant)
            if ledger.history:  # a round has trained here, or a census was answered
                ledger.save(path, noise_multiplier=sigma)


def _train(msg: Message, context: Context, cfg: AppConfig) -> Message:
    partition_id, num_partitions = t.node_partition(context)
    data = t.load_local_data(cfg, partition_id, num_partitions)
    model, layout = t.build_global_model(cfg, data.num_labels, received_state(msg.content, context))
    t.seed_local_randomness(cfg, msg.content[contract.CONFIG], partition_id)
    factors = t.parse_factors(msg.content[contract.CONFIG])
    ledger, sigma = t.load_ledger(context, cfg.privacy.accountant)
    budget = plan_round(cfg, ledger, num_examples=len(data.train), noise_multiplier=sigma,
                        where=f"partition {partition_id}")
    loss, moved = float("nan"), 0.0
    if not budget.exhausted:
        before = layout.tensors(factors, head=False)
        private = t.privatize(cfg, model, layout, factors, data.train, budget, ledger)
        loss = t.run_local_steps(private, budget.steps, t.compute_dtype(cfg),
                                 encoder_dropout=cfg.model.encoder_dropout)
        private.record_into(ledger)
        t.store_ledger(context, ledger, budget.noise_multiplier)
        moved = t.moved_norm(before, layout, factors, require_each=cfg.privacy.is_private)
    arrays = ArrayRecord(torch_state_dict=layout.tensors(factors, head=cfg.lora.train_head))
    metrics = t.train_reply_metrics(num_examples=len(data.train), loss=loss, ledger=ledger,
                                    cfg=cfg, sigma=budget.noise_multiplier,
                                    steps=0 if budget.exhausted else budget.steps,
                                    exhausted=budget.exhausted, moved=moved)
    return Message(RecordDict({contract.ARRAYS: arrays, contract.METRICS: metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the global adapter on this node's test partition."""
    cfg = AppConfig.from_run_config(context.run_config)
    data = t.load_local_data(cfg, *t.node_partition(context))
    model, _ = t.build_global_model(cfg, data.num_labels, msg.content[contract.ARRAYS])
    loss, accuracy = evaluate_model(model, data.test, compute_dtype=t.compute_dtype(cfg),
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
    """Answer the census: the node's label counts under DP, once, before it trains.

    Counts c + N(0, σ_c² I_K) of its training partition (:mod:`privacy.census`), σ_c =
    ``privacy.census-noise-multiplier`` (exact counts in a run without DP). The release enters
    the node's ledger first, so every ε it reports covers it and its DP-SGD σ is calibrated
    after it. Refused (an error reply) when the run has no census, when the ledger already
    holds anything (a second census could average the noise away; after training, σ was
    calibrated without it), or when the census alone would take ε past the budget.
    """
    cfg = AppConfig.from_run_config(context.run_config)
    with node_privacy_state(context, cfg):
        return _census(msg, context, cfg)


def _census(msg: Message, context: Context, cfg: AppConfig) -> Message:
    if not cfg.data.class_prior_census:
        raise ValueError("this run has no census (data.class-prior is not 'census'): this node "
                         "sends no label counts")
    partition_id, num_partitions = t.node_partition(context)
    train, _ = load_partition(cfg.data, cfg.seed, partition_id, num_partitions)
    ledger, sigma = t.load_ledger(context, cfg.privacy.accountant)
    noise = cfg.privacy.census_noise
    if cfg.privacy.is_private:
        if ledger.history or sigma is not None:
            raise ValueError(f"partition {partition_id} refuses the census: its privacy ledger "
                             f"already holds {ledger.steps} step(s) (a census is answered once, "
                             "before any training)")
        check_census_budget(cfg)  # the node's own check: its ledger is empty, so this is all
        ledger.history.append(census_entry(noise))
        t.store_ledger(context, ledger, None)
    counts = noisy_label_counts(train["label"], load_corpus(cfg.data, cfg.seed).num_labels, noise)
    metrics = MetricRecord({contract.PARTITION_ID: partition_id,
                            contract.EPSILON: ledger.epsilon(cfg.privacy.delta)
                            if cfg.privacy.is_private else math.inf})
    return Message(RecordDict({CENSUS_RECORD: ConfigRecord({NOISY_COUNTS: counts.tolist()}),
                               contract.METRICS: metrics}), reply_to=msg)
