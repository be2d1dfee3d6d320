"""The steps of one client round, each a small function used by :mod:`client.app`."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from peft import PeftModel
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from client.step_size import parameter_groups
from common import contract
from common.adapter import AdapterLayout, LoraPair
from common.batching import collate_trimmed, split_batch
from common.config import AppConfig, ModelConfig, PrivacyConfig
from common.contract import Factor, lora_key
from common.data import (
    load_corpus,
    load_partition,
    partition_problem,
    partition_value,
)
from common.data_files import DataError
from common.devices import resolve_device
from common.model import build_model, load_tokenizer, train_mode
from common.precision import autocast, resolve_compute_dtype
from common.tasks import TASKS, Task
from privacy import (
    PrivacyLedger,
    PrivateTraining,
    empty_batch_step,
    frozen_input_backward,
    make_private,
)
from privacy.grouped_clipping import ClipGroup, head_and_adapter_groups
from privacy.policy import RoundPrivacy

LEDGER_RECORD = "privacy-ledger"  # Context.state ConfigRecord holding the accountant history
NOISE_KEY = "noise-multiplier"  # σ, of the run NOISE_RUN_KEY names
NOISE_RUN_KEY = "noise-run-id"  # the Flower run id σ was calibrated in: σ is per run
CENSUS_RUN_KEY = "census-run-id"  # the run id of the last census this node answered


@dataclass(frozen=True)
class LocalData:
    """A node's partition: training examples tokenized, test examples tokenized on first use.

    Only federated evaluation (``strategy.fraction-evaluate`` > 0) reads ``test``; the default
    evaluates on the server, so a node never spends the 1–4 s of tokenizing its test share.
    """

    train: TensorDataset
    num_labels: int
    test_texts: Dataset = field(repr=False)
    max_length: int
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    task: Task = field(repr=False)

    @functools.cached_property
    def test(self) -> TensorDataset:
        """The test partition as tensors (:meth:`common.tasks.Task.encode`)."""
        return self.task.encode(self.test_texts, self.tokenizer, self.max_length)


@functools.lru_cache(maxsize=64)
def load_local_data(cfg: AppConfig, partition_id: int, num_partitions: int) -> LocalData:
    """Tokenized train/test partition of this node (cached per process across rounds).

    In a simulation one process (Ray actor) serves many nodes, one after another: the cache
    holds 64 partitions (the default's are about 3 MB of token ids each), so an actor serving
    the 6 default nodes loads and tokenizes each once, not again every few rounds.

    Raise :class:`common.data_files.DataError` if the partition is too small to train.
    """
    corpus = load_corpus(cfg.data, cfg.seed, cfg.model.task_kind)
    train, test = load_partition(cfg.data, cfg.seed, partition_id, num_partitions,
                                 cfg.model.task_kind)
    if problem := partition_problem(cfg.data, len(train), partition_id, num_partitions,
                                    cfg.train.batch_size,
                                    value=partition_value(corpus, partition_id)):
        raise DataError([problem])
    tokenizer, task = load_tokenizer(cfg.model), TASKS[cfg.model.task]
    return LocalData(task.encode(train, tokenizer, cfg.model.max_length), corpus.num_labels,
                     test, cfg.model.max_length, tokenizer, task)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a clear error if absent."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config lacks {exc}: start the SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'") from exc


def device(model: ModelConfig) -> torch.device:
    """The device of this node for ``model.device`` (:func:`common.devices.resolve_device`)."""
    return resolve_device(model.device)


def build_global_model(cfg: AppConfig, num_labels: int,
                       arrays: ArrayRecord) -> tuple[PeftModel, AdapterLayout]:
    """Fresh LoRA model on this node's device, with the server's global adapter loaded."""
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed,
                        device=device(cfg.model), svd_form=cfg.strategy.svd_form)
    layout = AdapterLayout.from_model(model)
    layout.load(arrays.to_torch_state_dict())
    return model, layout


def seed_local_randomness(seed: int, config: ConfigRecord, partition_id: int, *,
                          deterministic: bool) -> None:
    """Reseed torch before local training: from the OS, or with ``train.deterministic`` fixed.

    :func:`common.model.build_model` seeds torch with the public ``seed`` (the same head and A
    init on every node), and a fresh process starts from torch's fixed default seed. Left so,
    the Poisson batches, dropout and DP noise would follow from public values and the noise
    could be recomputed and subtracted. ``deterministic`` (``train.deterministic``, only
    allowed with ε = inf) seeds from (``seed``, the server round in ``config``,
    ``partition_id``) instead, so that a run can be reproduced.
    """
    if not deterministic:
        torch.seed()  # non-deterministic: std::random_device
        return
    server_round = int(config[contract.SERVER_ROUND])
    torch.manual_seed(((seed * 1_000_003 + server_round) * 1_000_003 + partition_id) % 2**63)


def parse_factors(config: ConfigRecord) -> tuple[Factor, ...]:
    """Which LoRA factors the strategy asks this client to train (FedSVD: only B; merge-sv: S)."""
    raw = str(config.get(contract.TRAIN_FACTORS, "B"))
    factors = tuple(f.strip() for f in raw.split(",") if f.strip())
    if not factors or len(set(factors)) < len(factors) or any(f not in "ABS" for f in factors):
        raise ValueError(f"{contract.TRAIN_FACTORS}={raw!r}: expected 'B', 'A', 'A,B' or 'S'")
    return factors  # type: ignore[return-value]


def load_ledger(context: Context, accountant: str) -> tuple[PrivacyLedger, float | None]:
    """The node's privacy ledger kept in ``Context.state`` across rounds, and this run's σ.

    σ is None before the node's first trained round of this run (``context.run_id``):
    :func:`privacy.policy.plan_round` calibrates it then, after whatever the ledger already
    holds (a census, or earlier runs when the ledger spans runs), and :func:`store_ledger`
    keeps it beside the ledger with the run's id. A σ of another run is never reused.
    """
    record = context.state.config_records.get(LEDGER_RECORD)
    if record is None:
        return PrivacyLedger.from_dict(accountant, {}), None
    this_run = record.get(NOISE_RUN_KEY) == str(context.run_id)
    sigma = float(record[NOISE_KEY]) if this_run and NOISE_KEY in record else None
    return PrivacyLedger.from_dict(accountant, dict(record)), sigma


def store_ledger(context: Context, ledger: PrivacyLedger, noise_multiplier: float | None) -> None:
    """Keep the ledger and this run's σ (None: not calibrated yet) in ``Context.state``."""
    if not ledger.history:
        return
    old = context.state.config_records.get(LEDGER_RECORD, ConfigRecord())
    record = ConfigRecord(ledger.to_dict())
    if noise_multiplier is not None:
        record[NOISE_KEY], record[NOISE_RUN_KEY] = noise_multiplier, str(context.run_id)
    if CENSUS_RUN_KEY in old:
        record[CENSUS_RUN_KEY] = old[CENSUS_RUN_KEY]
    context.state.config_records[LEDGER_RECORD] = record


def census_answered(context: Context) -> bool:
    """Whether this node has answered the census of this run (``context.run_id``)."""
    record = context.state.config_records.get(LEDGER_RECORD)
    return record is not None and record.get(CENSUS_RUN_KEY) == str(context.run_id)


def mark_census_answered(context: Context) -> None:
    """Note in ``Context.state`` that this run's census is answered (after :func:`store_ledger`)."""
    context.state.config_records[LEDGER_RECORD][CENSUS_RUN_KEY] = str(context.run_id)


def privatize(cfg: AppConfig, model: PeftModel, layout: AdapterLayout,
              factors: tuple[Factor, ...], train: TensorDataset, budget: RoundPrivacy,
              ledger: PrivacyLedger) -> PrivateTraining:
    """SGD over the named factors (and the head when it trains), made private by Opacus.

    Each LoRA layer's factors step at ``train.learning-rate`` or, with
    ``train.learning-rate-scale = "delta-w"``, at the rate of :mod:`client.step_size`.
    Only ``factors`` (and the head) require gradients; Poisson batches at q, per-example
    clipping at C (or the grouped norms of :func:`clip_groups`) and Gaussian noise σ C.
    """
    layout.set_trainable(model, factors, cfg.lora.train_head)
    groups = parameter_groups(layout, factors, train_head=cfg.lora.train_head,
                              learning_rate=cfg.train.learning_rate,
                              scale=cfg.train.learning_rate_scale, private=cfg.privacy.is_private)
    return make_private(
        module=model, optimizer=torch.optim.SGD(groups, lr=cfg.train.learning_rate),
        data_loader=train_loader(train, cfg.train.batch_size, device(cfg.model)),
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm, ledger=ledger,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
        clip_groups=clip_groups(cfg.privacy, layout, factors, train_head=cfg.lora.train_head),
        criterion=TASKS[cfg.model.task].criterion(),
    )


def _batches(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def compute_dtype(model: ModelConfig) -> torch.dtype:
    """The frozen encoder's dtype here (``model.compute-dtype``, :mod:`common.precision`)."""
    return resolve_compute_dtype(model.compute_dtype, device(model))


def train_loader(train: TensorDataset, batch_size: int, device: torch.device) -> DataLoader:
    """The loader ``make_private`` turns into Poisson batches, each cut to its longest example.

    ``batch_size`` is ``train.batch-size`` (the expected Poisson batch); for a CUDA ``device``
    the batches are in pinned memory, so that copying them to the GPU can overlap.
    """
    return DataLoader(train, batch_size=batch_size, collate_fn=collate_trimmed,
                      pin_memory=device.type == "cuda")


def clip_groups(privacy: PrivacyConfig, layout: AdapterLayout, factors: tuple[Factor, ...], *,
                train_head: bool) -> list[ClipGroup] | None:
    """The head and the trained LoRA factors as two clipping groups, or None (one norm C).

    Only when the head trains (``train_head``: ``lora.train-head``) and
    ``privacy.head-clip-share`` > 0 (:mod:`privacy.grouped_clipping`).
    """
    share = privacy.head_clip_share
    if not (privacy.is_private and train_head and share > 0):
        return None
    adapter = [pair.factor(f) for pair in layout.pairs for f in factors]
    return head_and_adapter_groups(list(layout.head.values()), adapter,
                                   privacy.max_grad_norm, share)


def run_local_steps(private: PrivateTraining, steps: int,
                    dtype: torch.dtype = torch.float32, *, encoder_dropout: bool = False) -> float:
    """``steps`` DP-SGD steps on Poisson batches; return the mean training loss.

    The forward runs under ``dtype`` autocast (:mod:`common.precision`: what trains stays
    float32); the loss, its gradients, clipping and noise are float32. The frozen encoder's
    dropout is on only with ``encoder_dropout`` (:func:`common.model.train_mode`).
    """
    train_mode(private.module, encoder_dropout=encoder_dropout)
    dev = next(private.module.parameters()).device
    losses: list[float] = []
    batches = _batches(private.data_loader)
    for _ in range(steps):
        inputs, labels = split_batch(next(batches), dev)
        private.optimizer.zero_grad(set_to_none=True)
        if not labels.numel():  # an empty Poisson batch: the step is the noise alone
            empty_batch_step(private.optimizer)
            continue
        with autocast(dev, dtype):
            logits = private.module(**inputs).logits
        loss = private.criterion(logits.float(), labels)
        with frozen_input_backward():
            loss.backward()
        private.optimizer.step()
        losses.append(float(loss.item()))
    return sum(losses) / len(losses) if losses else math.nan


def moved_norm(before: dict[str, torch.Tensor], layout: AdapterLayout,
               factors: tuple[Factor, ...], *, require_each: bool) -> float:
    """||after − before||_F over the trained factors; raise if they did not change (Opacus #820).

    ``before`` holds the trained factors (``layout.tensors(factors, head=False)``). With
    ``require_each`` (DP-SGD: its noise moves every trained tensor) each factor must have moved
    on its own, so a factor the optimizer silently skips (A next to B) is caught. Without noise
    A can legitimately stay put (its gradient s·Bᵀ·… is 0 while B = 0), so only the total counts.
    """
    def squared_change(pair: LoraPair, f: Factor) -> float:
        change = pair.factor(f).detach().cpu() - before[lora_key(pair.module, f)]
        return float(change.double().pow(2).sum())

    by_factor = {f: math.sqrt(sum(squared_change(p, f) for p in layout.pairs)) for f in factors}
    unmoved = [f for f, norm in by_factor.items() if norm == 0.0]
    if len(unmoved) == len(factors) or (require_each and unmoved):
        raise RuntimeError(f"local training did not change LoRA factor(s) {unmoved}: the "
                           "optimizer is not updating them (see opacus issue #820)")
    return math.sqrt(sum(norm ** 2 for norm in by_factor.values()))


def train_reply_metrics(*, num_examples: int, loss: float, ledger: PrivacyLedger,
                        privacy: PrivacyConfig, sigma: float, steps: int, exhausted: bool,
                        moved: float) -> MetricRecord:
    """The MetricRecord of a train reply (see :mod:`common.contract`); ε at ``privacy.delta``."""
    return MetricRecord({
        contract.NUM_EXAMPLES: num_examples,
        contract.TRAIN_LOSS: loss,
        contract.EPSILON: ledger.epsilon(privacy.delta) if privacy.is_private else math.inf,
        contract.DELTA: privacy.delta,
        contract.NOISE_MULTIPLIER: sigma,
        contract.STEPS: steps,
        contract.BUDGET_EXHAUSTED: int(exhausted),
        contract.B_DELTA_NORM: moved,
    })
