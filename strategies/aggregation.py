"""How a round's screened replies become one state: bounded weights, then the mean or a robust rule.

1. **Weights.** A reply's weight is its self-reported ``num-examples`` n_k, which nothing on
   the server can check. It is capped at ρ · median_{j ≠ k} n_j (ρ = ``max_weight_ratio``,
   default 4), so that no single reply carries more than ρ / (ρ + K − 1) of the weight of K
   replies, whatever it claims. The default split never reaches the cap: over 50 seeds of the
   default Dirichlet(0.5) split into 6 partitions (self-balancing, as
   :func:`common.data.make_partitioner` builds it) the largest n_k / median_{j≠k} n_j of any
   2, 3 or 4 sampled clients is 2.09 (3 of 6 sampled: 1.79); 20 or 100 partitions at α = 0.5:
   at most 2.08. So honest weights are the plain n_k and the mean stays FedAvg's.
2. **Aggregator** (``strategy.aggregation``), each Flower's own (``flwr.serverapp.strategy``)
   over the same replies:

   - ``mean``: FedAvg's weighted mean Σ_k p_k X_k, p_k = n_k / Σ n (exact: FedSVD's
     B̄ A = Σ p_k B_k A);
   - ``trimmed-mean``: ``FedTrimmedAvg``, per coordinate the mean after cutting
     ``trim_fraction`` of the replies off each tail (unweighted);
   - ``median``: ``FedMedian``, the per-coordinate median (unweighted);
   - ``krum`` / ``multi-krum``: ``Krum`` / ``MultiKrum`` with f = ``num_malicious``: the
     reply (``krum``) or the K − f replies (``multi-krum``) whose summed squared distance to
     their K − f − 2 nearest others is smallest, then their weighted mean.

   A robust aggregate is not a mean of the replies, so FedSVD's refactorization keeps
   B′A′ = B̄A for the B̄ it returns, but B̄A is no longer Σ p_k B_k A.

Flower's robust strategies pop the arrays out of the messages they aggregate; they are handed
copies, so the replies stay intact for :meth:`strategies.base.LoraStrategy.merge`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from common import contract

DEFAULT_MAX_WEIGHT_RATIO = 4.0
MetricsFn = Callable[[list[RecordDict], str], MetricRecord]


def cap_weights(replies: list[Message], ratio: float, key: str = contract.NUM_EXAMPLES
                ) -> tuple[list[Message], int]:
    """``replies`` with each ``key`` cut to ``ratio`` × the median of the others; and how many.

    ``ratio`` 0 or inf, or fewer than two replies: unchanged. A capped reply is a new message
    (same metadata and arrays) whose metric is ⌊ratio · median⌋ (at least 1).
    """
    if not ratio or math.isinf(ratio) or len(replies) < 2:
        return replies, 0
    weights = [int(m.content[contract.METRICS][key]) for m in replies]
    out, capped = [], 0
    for k, msg in enumerate(replies):
        cap = max(1, math.floor(ratio * statistics.median(
            w for j, w in enumerate(weights) if j != k)))
        if weights[k] <= cap:
            out.append(msg)
            continue
        capped += 1
        log(INFO, "aggregate_train: node %s claims %s=%d, weighted as %d (%g × the others' "
            "median)", msg.metadata.src_node_id, key, weights[k], cap, ratio)
        metrics = MetricRecord({**msg.content[contract.METRICS], key: cap})
        out.append(_copy(msg, metrics))
    return out, capped


def robust_aggregator(name: str, *, trim_fraction: float, num_malicious: int,
                      weighted_by_key: str, metrics_fn: MetricsFn) -> FedAvg | None:
    """Flower's strategy that aggregates by ``name``; None for ``mean`` (FedAvg's own)."""
    shared = {"weighted_by_key": weighted_by_key, "arrayrecord_key": contract.ARRAYS,
              "train_metrics_aggr_fn": metrics_fn}
    if name == "mean":
        return None
    if name == "trimmed-mean":
        return FedTrimmedAvg(beta=trim_fraction, **shared)
    if name == "median":
        return FedMedian(**shared)
    if name == "krum":
        return Krum(num_malicious_nodes=num_malicious, **shared)
    if name == "multi-krum":
        return _MultiKrumAllButF(num_malicious_nodes=num_malicious, **shared)
    raise ValueError(f"aggregation={name!r}: one of mean, trimmed-mean, median, krum, "
                     "multi-krum")


def robust_arrays(aggregator: FedAvg, server_round: int, replies: list[Message]) -> ArrayRecord:
    """The arrays ``aggregator`` makes of ``replies``, computed on copies of them."""
    copies = [_copy(m, m.content[contract.METRICS]) for m in replies]
    if isinstance(aggregator, _MultiKrumAllButF):
        aggregator.num_nodes_to_select = max(1, len(replies) - aggregator.num_malicious_nodes)
    arrays, _ = aggregator.aggregate_train(server_round, copies)
    if arrays is None:  # pragma: no cover - only without replies, which the caller excludes
        raise ValueError("the robust aggregator returned nothing")
    return arrays


class _MultiKrumAllButF(MultiKrum):
    """MultiKrum that keeps K − f of the round's K replies (set per round)."""


def _copy(msg: Message, metrics: MetricRecord) -> Message:
    arrays = msg.content[contract.ARRAYS]
    content = RecordDict({contract.ARRAYS: ArrayRecord(dict(arrays.items())),
                          contract.METRICS: metrics})
    return Message(content=content, metadata=msg.metadata)
