"""The round every LoRA strategy shares: screen the replies, average them, merge, count bytes.

A strategy is a small subclass of :class:`LoraStrategy` that decides two things:

- :meth:`LoraStrategy.train_factors`: which LoRA factors clients train and send back in a round
  (sent as ``contract.TRAIN_FACTORS``; the client code path is the same for every method);
- :meth:`LoraStrategy.merge`: the new global state from the previous one, the weighted means of
  the valid replies (B̄, Ā, head; p_k = n_k / Σ n) and the replies themselves.

Everything else lives here once: reply screening (:mod:`strategies.validation`; the expected
arrays follow the round's factors, updates are judged against the state sent), the
``min_valid_replies`` rule, bounded weights and the aggregator (:mod:`strategies.aggregation`:
Flower's ``FedAvg`` weighted mean by default), the train metrics, and the bytes actually sent
down and up. A round in which every sampled client failed stops the run (``RoundFailed``)
unless ``stop_on_failed_round`` is off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import contract, schema
from common.contract import Factor
from common.schema import RoundTrainingMetrics
from kernels import stacked_product
from strategies.aggregation import (
    DEFAULT_MAX_WEIGHT_RATIO,
    cap_weights,
    robust_aggregator,
    robust_arrays,
)
from strategies.broadcast import FullBroadcast
from strategies.metrics import aggregate_train_metrics, reply_bytes
from strategies.sampling import PartitionSampler
from strategies.validation import (
    DEFAULT_MAX_NORM_RATIO,
    DEFAULT_MAX_NUM_EXAMPLES,
    DEFAULT_MIN_UPDATE_COSINE,
    ReplyValidator,
    Screening,
    common_metrics,
    expected_arrays,
    reply_keys,
    sent_arrays,
)

State = dict[str, torch.Tensor]  # array name -> tensor, as in ``ArrayRecord.to_torch_state_dict``


class RoundFailed(RuntimeError):
    """Every client sampled in a round failed: the federation cannot train as configured."""


class LoraStrategy(FedAvg):
    """Screened, weighted FedAvg over the LoRA factors a round trains, then :meth:`merge`.

    Parameters
    ----------
    lora_modules : names of the LoRA layers; their arrays are ``lora_key(module, "A" | "B")``.
    train_head : whether clients train and send back the head (``lora.train-head``).
    min_valid_replies : fewest valid trained replies that make an update; fewer: no update.
    max_norm_ratio : reject a reply whose update norm (per group and large array) exceeds this ×
        the other replies' median (0 or inf: off); see :mod:`strategies.validation`.
    min_update_cosine : reject an update whose cosine with the other replies' mean update is
        below this (-1: off).
    max_weight_ratio : weigh no reply more than this × the other replies' median
        ``num-examples`` (0 or inf: off); see :mod:`strategies.aggregation`.
    aggregation : ``mean`` (FedAvg's weighted mean), ``trimmed-mean``, ``median``, ``krum`` or
        ``multi-krum`` (Flower's robust strategies); ``trim_fraction`` and ``num_malicious``
        are their settings.
    stop_on_failed_round : raise :class:`RoundFailed` when every reply of a round is a Flower
        error reply (off: keep the global state and go on).
    max_num_examples : the largest plausible ``num-examples`` of one reply.
    sampler : draws the round's clients by partition id from a seed
        (:class:`strategies.sampling.PartitionSampler`); None: Flower's unseeded draw of node ids.
    training_metrics : where each round's training columns are recorded (the server's
        evaluator reads the same object); None: a new one.
    device : where :meth:`merge` and its kernels compute (the server's ``model.device``); the
        state it returns is sent from the CPU.
    broadcast : how the global state reaches the nodes (:mod:`strategies.broadcast`): the whole
        of it (default) or only what changed for each node.
    **kwargs : passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    TRAIN_FACTORS: tuple[Factor, ...] = ("A", "B")  # every round, unless train_factors says else

    def __init__(self, lora_modules: Sequence[str], *, train_head: bool = True,
                 min_valid_replies: int = 1, max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
                 min_update_cosine: float = DEFAULT_MIN_UPDATE_COSINE,
                 max_weight_ratio: float = DEFAULT_MAX_WEIGHT_RATIO, aggregation: str = "mean",
                 trim_fraction: float = 0.2, num_malicious: int = 1,
                 stop_on_failed_round: bool = True,
                 max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
                 sampler: PartitionSampler | None = None,
                 training_metrics: RoundTrainingMetrics | None = None,
                 device: torch.device | str = "cpu", broadcast: FullBroadcast | None = None,
                 **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("arrayrecord_key", contract.ARRAYS)
        kwargs.setdefault("configrecord_key", contract.CONFIG)
        super().__init__(**kwargs)
        if not lora_modules:
            raise ValueError(f"lora_modules is empty: {type(self).__name__} needs at least one "
                             "LoRA layer")
        if min_valid_replies < 1:
            raise ValueError(f"min_valid_replies={min_valid_replies}: must be >= 1")
        if not (max_norm_ratio == 0 or max_norm_ratio >= 1):
            raise ValueError(f"max_norm_ratio={max_norm_ratio}: must be 0 (off), >= 1 or inf")
        self.lora_modules = list(lora_modules)
        self.train_head = train_head
        self.min_valid_replies = min_valid_replies
        self.max_norm_ratio = max_norm_ratio
        self.min_update_cosine = min_update_cosine
        self.max_weight_ratio = max_weight_ratio
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
        self._global: ArrayRecord | None = None
        self._bytes_down = 0

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
        log(INFO, "\t├──> replies: need %d valid, reject updates > %g × the others' median "
            "norm or at cosine < %g with their mean; weights <= %g × the others' median; %s",
            self.min_valid_replies, self.max_norm_ratio, self.min_update_cosine,
            self.max_weight_ratio, self.aggregation)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients (FedAvg's draw or the seeded sampler); name the factors they train."""
        self._global = arrays
        config[contract.TRAIN_FACTORS] = ",".join(self.train_factors(server_round))
        if self.sampler is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            messages = self._seeded_messages(server_round, arrays, config, grid)
        messages = self.broadcast.messages(arrays, messages)
        self._bytes_down = sum(m.content[contract.ARRAYS].count_bytes() for m in messages)
        return messages

    def _seeded_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[Message]:
        """FedAvg's train messages, to the nodes :attr:`sampler` draws (same sample size)."""
        if self.fraction_train == 0.0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_train),
                          self.min_train_nodes)
        node_ids = self.sampler.sample(grid, server_round, sample_size, self.min_available_nodes)
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
        screening = self.validator(self._global, server_round).screen(replies)
        _log_screening(screening)
        if self.stop_on_failed_round and replies and screening.num_failed == len(replies):
            raise RoundFailed(_failure_summary(server_round, screening))
        counts = {
            schema.BYTES_UP: reply_bytes(m for m in replies if m.has_content()),
            schema.BYTES_DOWN: self._bytes_down,
            schema.CLIENTS_EXHAUSTED: len(screening.exhausted),
            schema.REPLIES_REJECTED: screening.num_rejected,
            schema.REPLIES_FAILED: screening.num_failed,
        }
        if len(screening.valid) < self.min_valid_replies:
            log(WARNING, "aggregate_train: %d valid trained repl(ies), min_valid_replies=%d: "
                "no update this round; the global adapter is unchanged",
                len(screening.valid), self.min_valid_replies)
            self.training_metrics.record(server_round, {**counts, schema.CLIENTS_TRAINED: 0})
            return None, None
        valid = sorted(screening.valid, key=content_digest)  # sums independent of arrival order
        valid, counts[schema.WEIGHTS_CAPPED] = cap_weights(valid, self.max_weight_ratio,
                                                      self.weighted_by_key)
        valid = common_metrics(valid)
        if self.aggregator is None:
            averaged, metrics = super().aggregate_train(server_round, valid)
        else:
            averaged = robust_arrays(self.aggregator, server_round, valid)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        previous = self._on_device(self._global)
        state = self.broadcast.settle(previous, self.merge(server_round, previous,
                                                           self._on_device(averaged), valid))
        metrics = MetricRecord({**(metrics or {}), **counts})
        self.training_metrics.record(server_round, metrics)
        return ArrayRecord(torch_state_dict=state), metrics

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


def _failure_summary(server_round: int, screening: Screening) -> str:
    """One line: every client of the round failed, and their distinct reasons."""
    reasons = list(dict.fromkeys(r.reason for r in screening.rejected))
    shown = "; ".join(reasons[:3]) + (f"; ... ({len(reasons) - 3} more)" if len(reasons) > 3
                                      else "")
    return (f"round {server_round}: all {len(screening.rejected)} sampled client(s) failed, so "
            f"nothing can be trained: {shown}")


def _log_screening(screening: Screening) -> None:
    """One WARNING per rejected reply; one INFO line for clients whose budget is spent."""
    for rejection in screening.rejected:
        log(WARNING, "aggregate_train: rejected the reply of node %d: %s",
            rejection.node_id, rejection.reason)
    if screening.exhausted:
        log(INFO, "aggregate_train: %d client(s) skipped the round: privacy budget spent",
            len(screening.exhausted))
