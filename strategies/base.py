"""The round every LoRA strategy shares: screen the replies, average them, merge, count bytes.

A strategy is a small subclass of :class:`LoraStrategy` that decides two things:

- :meth:`LoraStrategy.train_factors`: which LoRA factors clients train and send back in a round
  (sent as ``contract.TRAIN_FACTORS``; the client code path is the same for every method);
- :meth:`LoraStrategy.merge`: the new global state from the previous one, the weighted means of
  the valid replies (B̄, Ā, head; p_k = n_k / Σ n) and the replies themselves.

Everything else lives here once: reply screening (:mod:`strategies.validation`; the expected
arrays follow the round's factors, updates are judged against the state sent), bounded weights
and the aggregator (:mod:`strategies.aggregation`: Flower's ``FedAvg`` weighted mean by
default), the train metrics, and the bytes actually sent down and up.

Each round waits at most ``round_timeout`` seconds for the nodes (:mod:`strategies.sampling`);
a node that does not reply in time is logged and counted as late, and its later reply is never
read. A round with fewer valid replies than ``min_train_nodes`` is short: skipped (the global
adapter is unchanged) or, with ``short_round="fail"``, the run stops (``RoundFailed``). A round
in which every sampled client failed or was late stops the run unless ``stop_on_failed_round``
is off.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import contract, schema
from common.config import SHORT_ROUNDS, StrategyConfig
from common.contract import Factor
from common.schema import RoundTrainingMetrics
from kernels import stacked_product
from strategies.aggregation import (
    DEFAULT_MAX_WEIGHT_RATIO,
    bound_units,
    bound_updates,
    cap_weights,
    robust_aggregator,
    robust_arrays,
)
from strategies.broadcast import FullBroadcast
from strategies.metrics import aggregate_train_metrics, reply_bytes
from strategies.outcome import RoundFailed, all_failed, failure_summary, log_screening
from strategies.sampling import (
    PartitionSampler,
    asked_nodes,
    log_late,
    split_late,
    wait_for_nodes,
    with_ttl,
)
from strategies.server_optimizer import ServerOptimizer
from strategies.validation import (
    DEFAULT_MAX_NORM_RATIO,
    DEFAULT_MAX_NUM_EXAMPLES,
    DEFAULT_MIN_UPDATE_COSINE,
    DEFAULT_NUM_MALICIOUS,
    ReplyValidator,
    Screening,
    common_metrics,
    expected_arrays,
    reply_keys,
    sent_arrays,
)

State = dict[str, torch.Tensor]  # array name -> tensor, as in ``ArrayRecord.to_torch_state_dict``


class LoraStrategy(FedAvg):
    """Screened, weighted FedAvg over the LoRA factors a round trains, then :meth:`merge`.

    Parameters
    ----------
    lora_modules : names of the LoRA layers; their arrays are ``lora_key(module, "A" | "B")``.
    train_head : whether clients train and send back the head (``lora.train-head``).
    round_timeout : seconds a round waits for enough nodes to connect and for its replies; also
        each instruction's TTL (``strategy.round-timeout``).
    short_round : a round with fewer valid replies than ``min_train_nodes``: ``"skip"`` keeps
        the global state and goes on, ``"fail"`` raises :class:`RoundFailed`.
    max_norm_ratio : flag a reply whose update norm (per group and large array) exceeds this ×
        the other replies' median (0 or inf: off); see :mod:`strategies.screens`.
    min_update_cosine : flag an update whose cosine with the replies' coordinate-wise median
        update is below this, or that erases half of the sent state (-1: off).
    num_malicious : f: the screens reject at most min(f, ⌊K / 2⌋) of K replies (the rest stay,
        bounded); also ``krum`` / ``multi-krum``'s f.
    max_weight_ratio : weigh no reply more than this × the lower median ``num-examples`` of the
        other replies (0 or inf: off); see :mod:`strategies.aggregation`.
    bound_updates : scale each update down to the round's lower-median update norm (per array
        and group) before aggregating (:func:`strategies.aggregation.bound_updates`).
    private : whether clients run DP-SGD; then a reply that reports ε = inf is rejected.
    aggregation : ``mean`` (FedAvg's weighted mean), ``trimmed-mean``, ``median``, ``krum`` or
        ``multi-krum`` (Flower's robust strategies); ``trim_fraction`` is trimmed-mean's.
    stop_on_failed_round : raise :class:`RoundFailed` when every sampled client of a round sent
        a Flower error reply or none in time (off: the round is short).
    max_num_examples : the largest plausible ``num-examples`` of one reply.
    sampler : draws the round's clients by partition id from a seed
        (:class:`strategies.sampling.PartitionSampler`); None: Flower's unseeded draw of node ids.
    training_metrics : where each round's training columns are recorded (the server's
        evaluator reads the same object); None: a new one.
    device : where :meth:`merge` and its kernels compute (the server's ``model.device``); the
        state it returns is sent from the CPU.
    broadcast : how the global state reaches the nodes (:mod:`strategies.broadcast`): the whole
        of it (default) or only what changed for each node.
    server_optimizer : how the weighted means move the global state
        (:mod:`strategies.server_optimizer`); None: plain averaging (the state is the mean).
    **kwargs : passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    TRAIN_FACTORS: tuple[Factor, ...] = ("A", "B")  # every round, unless train_factors says else
    # True: the method folds the exact product update into ΔW (FLoRA, FedEx-LoRA), and the server
    # optimizer steps there (:meth:`product_step`), not on the averaged A and B
    PRODUCT_UPDATES = False

    def __init__(self, lora_modules: Sequence[str], *, train_head: bool = True,
                 round_timeout: float = StrategyConfig.round_timeout, short_round: str = "skip",
                 max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
                 min_update_cosine: float = DEFAULT_MIN_UPDATE_COSINE,
                 max_weight_ratio: float = DEFAULT_MAX_WEIGHT_RATIO, aggregation: str = "mean",
                 trim_fraction: float = 0.2, num_malicious: int = DEFAULT_NUM_MALICIOUS,
                 bound_updates: bool = True, private: bool = True,
                 stop_on_failed_round: bool = True,
                 max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
                 sampler: PartitionSampler | None = None,
                 training_metrics: RoundTrainingMetrics | None = None,
                 device: torch.device | str = "cpu", broadcast: FullBroadcast | None = None,
                 server_optimizer: ServerOptimizer | None = None, **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("arrayrecord_key", contract.ARRAYS)
        kwargs.setdefault("configrecord_key", contract.CONFIG)
        super().__init__(**kwargs)
        if not lora_modules:
            raise ValueError(f"lora_modules is empty: {type(self).__name__} needs at least one "
                             "LoRA layer")
        if not 0 < round_timeout < float("inf"):
            raise ValueError(f"round_timeout={round_timeout}: must be > 0 and finite (seconds)")
        if short_round not in SHORT_ROUNDS:
            raise ValueError(f"short_round={short_round!r}: must be one of {SHORT_ROUNDS}")
        if not (max_norm_ratio == 0 or max_norm_ratio >= 1):
            raise ValueError(f"max_norm_ratio={max_norm_ratio}: must be 0 (off), >= 1 or inf")
        self.lora_modules = list(lora_modules)
        self.train_head = train_head
        self.round_timeout = round_timeout
        self.short_round = short_round
        self.max_norm_ratio = max_norm_ratio
        self.min_update_cosine = min_update_cosine
        self.max_weight_ratio = max_weight_ratio
        self.num_malicious = num_malicious
        self.bound_updates = bound_updates
        self.private = private
        self.aggregation = aggregation
        self.aggregator = robust_aggregator(
            aggregation, trim_fraction=trim_fraction, num_malicious=num_malicious,
            weighted_by_key=self.weighted_by_key, metrics_fn=self.train_metrics_aggr_fn)
        self.stop_on_failed_round = stop_on_failed_round
        self.max_num_examples = max_num_examples
        self.sampler = sampler
        self.training_metrics = training_metrics or RoundTrainingMetrics()
        self.device = torch.device(device)
        self.broadcast = broadcast or FullBroadcast()
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self._global: ArrayRecord | None = None
        self._bytes_down = 0
        self._sent: list[Message] = []  # this round's train instructions
        self._not_sent = ""  # why none were sent, when too few nodes connected
        self._sent_evaluate: list[Message] = []

    # --- what a method decides ------------------------------------------------------------------

    def train_factors(self, server_round: int) -> tuple[Factor, ...]:
        """The LoRA factors clients train and send back in ``server_round``."""
        return self.TRAIN_FACTORS

    def merge(self, server_round: int, state: State, averaged: State,
              replies: list[Message]) -> State:
        """The new global state; by default the weighted means replace what was trained.

        ``state`` is the previous global state, ``averaged`` the weighted means (p_k) of the
        arrays of the valid ``replies`` (the round's factors and the head).
        """
        return {**state, **averaged}

    def describe(self) -> str:
        """One line on the method for :meth:`summary`."""
        return f"train {'+'.join(self.TRAIN_FACTORS)}, average them"

    # --- the shared round -----------------------------------------------------------------------

    def summary(self) -> None:
        """Log the strategy settings."""
        log(INFO, "\t├──> %s: %d LoRA layers, %s", type(self).__name__, len(self.lora_modules),
            self.describe())
        log(INFO, "\t├──> %s", self.broadcast.describe())
        log(INFO, "\t├──> %s", self.server_optimizer.describe())
        log(INFO, "\t├──> replies: wait up to %g s, need %d valid (fewer: %s the round), "
            "reject at most %d: updates > %g × the others' median norm, erasing the state, or "
            "at cosine < %g with the median update; weights <= %g × the others' lower median; "
            "updates %s; %s", self.round_timeout, self.min_train_nodes, self.short_round,
            self.num_malicious, self.max_norm_ratio, self.min_update_cosine,
            self.max_weight_ratio, "bounded by the lower-median norm" if self.bound_updates
            else "not bounded", self.aggregation)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients (FedAvg's draw or the seeded sampler); name the factors they train."""
        self._global = arrays
        config[contract.TRAIN_FACTORS] = ",".join(self.train_factors(server_round))
        messages = self.broadcast.messages(arrays, self._sampled_messages(server_round, arrays,
                                                                          config, grid))
        self._sent = with_ttl(messages, self.round_timeout)
        self._bytes_down = sum(m.content[contract.ARRAYS].count_bytes() for m in messages)
        return messages

    def _sampled_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                          grid: Grid) -> list[Message]:
        """FedAvg's train messages to the nodes drawn (by :attr:`sampler` if set).

        Drawn among the nodes connected within :attr:`round_timeout`; none when too few are.
        """
        self._not_sent = ""
        if self.fraction_train == 0.0:
            return []
        needed = max(self.min_available_nodes, self.min_train_nodes)
        nodes = wait_for_nodes(grid, needed, self.round_timeout, what="configure_train")
        if len(nodes) < needed:
            self._not_sent = (f"{len(nodes)} node(s) connected within strategy.round-timeout="
                              f"{self.round_timeout:g} s, {needed} needed, so no client was asked")
            return []
        sample_size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        if self.sampler is None:  # Flower's draw (flwr.serverapp.strategy.sample_nodes)
            node_ids = random.sample(nodes, sample_size)
            log(INFO, "configure_train: Sampled %s nodes (out of %s)", sample_size, len(nodes))
        else:
            node_ids = self.sampler.sample(grid, server_round, sample_size, nodes)
        config[contract.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, take the weighted means of the valid ones, :meth:`merge`."""
        replies = list(replies)
        self.broadcast.delivered(replies)
        if self._global is None:
            log(WARNING, "aggregate_train: no global adapter (configure_train was not called)")
            return None, None
        late, replies = split_late(self._sent, replies)
        log_late(f"round {server_round}", late, self.round_timeout)
        validator = self.validator(self._global, server_round)
        screening = validator.screen(replies, asked=asked_nodes(self._sent))
        log_screening(screening)
        if self.stop_on_failed_round and all_failed(screening, late):
            raise RoundFailed(failure_summary(server_round, screening, late, self.round_timeout))
        counts = {
            schema.BYTES_UP: reply_bytes(m for m in replies if m.has_content()),
            schema.BYTES_DOWN: self._bytes_down,
            schema.CLIENTS_EXHAUSTED: len(screening.exhausted),
            schema.REPLIES_REJECTED: screening.num_rejected,
            schema.REPLIES_FAILED: screening.num_failed,
            schema.REPLIES_LATE: len(late),
        }
        if len(screening.valid) < self.min_train_nodes:
            self._short_round(server_round, screening, late)
            self.training_metrics.record(server_round, {**counts, schema.CLIENTS_TRAINED: 0})
            return None, None
        valid = sorted(screening.valid, key=content_digest)  # sums independent of arrival order
        valid, counts[schema.WEIGHTS_CAPPED] = cap_weights(valid, self.max_weight_ratio,
                                                      self.weighted_by_key)
        valid = common_metrics(valid)
        if self.bound_updates:
            valid, counts[schema.UPDATES_BOUNDED] = bound_updates(
                valid, validator.sent, bound_units(list(validator.expected), validator.sizes))
        if self.aggregator is None:
            averaged, metrics = super().aggregate_train(server_round, valid)
        else:
            averaged = robust_arrays(self.aggregator, server_round, valid)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        previous = self._on_device(self._global)
        averaged = self.server_step(server_round, previous, self._on_device(averaged))
        state = self.broadcast.settle(previous, self.merge(server_round, previous, averaged,
                                                           valid))
        metrics = MetricRecord({**(metrics or {}), **counts})
        self.training_metrics.record(server_round, metrics)
        return ArrayRecord(torch_state_dict=state), metrics

    def _short_round(self, server_round: int, screening: Screening, late: list[int]) -> None:
        """Say why a round has too few valid replies; raise :class:`RoundFailed` if it must."""
        why = self._not_sent or (
            f"{len(screening.valid)} valid trained repl(ies), fewer than strategy.min-train-nodes="
            f"{self.min_train_nodes} ({len(self._sent)} sampled: {screening.num_failed} failed, "
            f"{len(late)} late, {screening.num_rejected} rejected, {len(screening.exhausted)} "
            "with their privacy budget spent)")
        if self.short_round == "fail":
            raise RoundFailed(f"round {server_round}: {why}; strategy.short-round='fail' stops "
                              "the run ('skip' keeps the global adapter and goes on)")
        log(WARNING, "round %d: %s: no update, the global adapter is unchanged "
            "(strategy.short-round='skip')", server_round, why)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's evaluate messages, if enough nodes connected within :attr:`round_timeout`."""
        self._sent_evaluate = []
        needed = max(self.min_available_nodes, self.min_evaluate_nodes)
        if self.fraction_evaluate and len(wait_for_nodes(
                grid, needed, self.round_timeout, what="configure_evaluate")) >= needed:
            self._sent_evaluate = with_ttl(list(super().configure_evaluate(
                server_round, arrays, config, grid)), self.round_timeout)
        return self._sent_evaluate

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's mean of the evaluate replies that came in time; the late nodes logged."""
        late, replies = split_late(self._sent_evaluate, list(replies))
        log_late(f"round {server_round}", late, self.round_timeout)
        return super().aggregate_evaluate(server_round, replies)

    def server_step(self, server_round: int, previous: State, averaged: State) -> State:
        """The state :meth:`merge` gets: x + step(x̄ − x) per averaged x̄ (x in ``previous``).

        Plain averaging returns ``averaged`` itself. With :attr:`PRODUCT_UPDATES` the LoRA
        factors are left as averaged (their method steps on ΔW, :meth:`product_step`).
        """
        if self.server_optimizer.is_plain_averaging:
            return averaged
        keys = [k for k in averaged if contract.is_head_key(k) or not self.PRODUCT_UPDATES]
        steps = self.server_optimizer.step(
            server_round, {k: averaged[k].float() - previous[k].float() for k in keys})
        return {**averaged, **{k: (previous[k].float() + steps[k]).to(averaged[k].dtype)
                               for k in keys}}

    def product_step(self, server_round: int, module: str, update: torch.Tensor) -> torch.Tensor:
        """The server optimizer's step for the exact ΔW update (d_out, d_in) of one layer.

        For the methods that fold products into the base weights (:attr:`PRODUCT_UPDATES`):
        ``update`` = s (Σ_k p_k B_k A_k − B_prev A_prev); plain averaging returns it unchanged.
        The moments are kept under ``contract.base_key(module)``.
        """
        if self.server_optimizer.is_plain_averaging:
            return update
        key = contract.base_key(module)
        return self.server_optimizer.step(server_round, {key: update})[key].to(update.dtype)

    def _on_device(self, arrays: ArrayRecord) -> State:
        """``arrays`` as tensors on :attr:`device`, where :meth:`merge` computes."""
        return {k: v.to(self.device) for k, v in arrays.to_torch_state_dict().items()}

    def validator(self, global_arrays: ArrayRecord, server_round: int) -> ReplyValidator:
        """The reply check of a round: its factors and the head, shaped as in ``global_arrays``."""
        keys = reply_keys(global_arrays, self.lora_modules, self.train_factors(server_round),
                          train_head=self.train_head)
        return ReplyValidator(expected_arrays(global_arrays, keys),
                              sent=sent_arrays(global_arrays, keys),
                              max_norm_ratio=self.max_norm_ratio,
                              min_update_cosine=self.min_update_cosine,
                              num_malicious=self.num_malicious, private=self.private,
                              max_num_examples=self.max_num_examples)

    # --- helpers for methods that need each client's factors ------------------------------------

    def client_weights(self, replies: list[Message]) -> torch.Tensor:
        """p_k = n_k / Σ n over ``replies`` (float64, (K,)), the weights of the means."""
        n = torch.tensor([float(m.content[contract.METRICS][self.weighted_by_key])
                          for m in replies], dtype=torch.float64)
        return n / n.sum()

    def product_sum(self, module: str, replies: list[Message],
                    weights: torch.Tensor) -> torch.Tensor:
        """Σ_k p_k B_k A_k of one LoRA layer over ``replies`` by stacking; (d_out, d_in) float64."""
        arrays = [m.content[contract.ARRAYS] for m in replies]

        def stack(factor: Factor) -> torch.Tensor:
            key = contract.lora_key(module, factor)
            return torch.stack([torch.from_numpy(a[key].numpy()) for a in arrays]).to(self.device)

        return stacked_product(stack("B"), stack("A"), weights)  # (K, m, r) and (K, r, n)


def content_digest(msg: Message) -> bytes:
    """SHA-256 of a reply's arrays and metrics: an order of replies that ignores arrival order.

    Float sums depend on their order; sorting the replies by this makes a round's aggregate a
    function of the replies alone, so a repeated (or resumed) run reproduces it bit for bit.
    """
    digest = hashlib.sha256()
    for _, record in sorted(msg.content.array_records.items()):
        for key in sorted(record):
            digest.update(key.encode())
            digest.update(record[key].data)
    for _, record in sorted(msg.content.metric_records.items()):
        digest.update(repr(sorted(record.items())).encode())
    return digest.digest()


def fold_into_base(state: State, module: str, delta: torch.Tensor) -> None:
    """ΔW_module ← ΔW_module + ``delta`` in ``state`` (ΔW absent: 0), added in float64.

    ``delta`` is (d_out, d_in) and already carries the LoRA scale s; ΔW is stored in float32.
    """
    key = contract.base_key(module)
    previous = state.get(key)
    total = delta.double() if previous is None else previous.double() + delta.double()
    state[key] = total.to(torch.float32)
