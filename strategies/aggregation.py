"""How a round's screened replies become one state: bounded weights and updates, then the mean.

An attacker controls two things of its reply: its arrays and its self-reported weight
``num-examples``. Both are bounded before averaging, so that a reply costs no more than an
honest one whatever its size or weight:

1. **Weights.** n_k is capped at ρ · lower-median_{j ≠ k} n_j (ρ = ``max_weight_ratio``,
   default 1): no reply weighs more than the lower median of the others. Of K = 3 replies
   every weight ends at most the smallest other one, so an attacker's weight is at most each
   honest one's; of K = 2, each is capped at the other (equal weights). Under DP this costs the
   honest clients little: each one's update carries noise σC/b (b the expected batch, the same
   for every client), so equal weights are the least noisy mean of K such updates. Measured
   over the default Dirichlet(0.5) split into 6 partitions (seeds 0–4, every 3 of 6): the
   cosine of the noise part of the capped mean with FedAvg's is 0.997 in the median and 0.961
   at worst (partitions of 1,089 and 2,255 examples together); 4 of 6: 0.999 / 0.997.
2. **Updates** (:func:`bound_updates`, ``bound_updates``): each reply's update u_k = X_k − X_sent
   is scaled down to the lower median M of the round's update norms, u_k ← u_k · min(1,
   M / ‖u_k‖), per array of at least :data:`MIN_BOUND_NUMBERS` values and per group (LoRA
   factors, head) for the smaller ones. With f < K / 2 attackers, M is at most an honest
   update's norm (an order statistic of a superset is at most that of the subset), so with
   both bounds an attacker's pull on the mean is at most f / K of an honest update's norm.
   Honest DP updates differ in norm by about 1 / √(2d) (1.3 % for a 384 × 8 B), so they are
   barely touched. The bounded reply is X_sent + u_k · min(1, M / ‖u_k‖); the aggregators see
   it instead of X_k, and since the weights sum to one, the mean is X_sent + Σ p_k u'_k.
3. **Aggregator** (``strategy.aggregation``), each Flower's own (``flwr.serverapp.strategy``)
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

What no bound removes: an attacker's bounded update still enters the mean. With the default
bounds, one attacker among three moves the aggregate by at most half the norm of the honest
pair's sum, which under DP noise (two nearly orthogonal honest updates) leaves a cosine of at
least about 0.7 with the honest-only update (``docs/threat-model.md``).

Flower's robust strategies pop the arrays out of the messages they aggregate; they are handed
copies, so the replies stay intact for :meth:`strategies.base.LoraStrategy.merge`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from common import contract
from common.config import AGGREGATIONS
from strategies.screens import array_groups

DEFAULT_MAX_WEIGHT_RATIO = 1.0
MIN_BOUND_NUMBERS = 64  # an array of fewer values is bounded within its group
MetricsFn = Callable[[list[RecordDict], str], MetricRecord]


def cap_weights(replies: list[Message], ratio: float, key: str = contract.NUM_EXAMPLES
                ) -> tuple[list[Message], int]:
    """``replies`` with each ``key`` cut to ``ratio`` × the lower median of the others; how many.

    ``ratio`` 0 or inf, or fewer than two replies: unchanged. A capped reply is a new message
    (same metadata and arrays) whose metric is ⌊ratio · lower median⌋ (at least 1). The lower
    median (the smaller middle value of an even count) keeps an attacker's weight at most the
    smaller of two honest others'.
    """
    if not ratio or math.isinf(ratio) or len(replies) < 2:
        return replies, 0
    weights = [int(m.content[contract.METRICS][key]) for m in replies]
    out, capped = [], []
    for k, msg in enumerate(replies):
        cap = max(1, math.floor(ratio * statistics.median_low(
            w for j, w in enumerate(weights) if j != k)))
        if weights[k] <= cap:
            out.append(msg)
            continue
        capped.append(f"node {msg.metadata.src_node_id} {weights[k]} → {cap}")
        metrics = MetricRecord({**msg.content[contract.METRICS], key: cap})
        out.append(_copy(msg, metrics))
    if capped:
        log(INFO, "aggregate_train: %s capped at %g × the others' lower median: %s", key, ratio,
            ", ".join(capped))
    return out, len(capped)


def bound_units(keys: Sequence[str], sizes: Mapping[str, int]) -> list[list[str]]:
    """The disjoint units :func:`bound_updates` bounds: large arrays alone, the rest by group."""
    units = []
    for _, members in array_groups(keys):
        units += [[k] for k in members if sizes[k] >= MIN_BOUND_NUMBERS]
        if small := [k for k in members if sizes[k] < MIN_BOUND_NUMBERS]:
            units.append(small)
    return units


def bound_updates(replies: list[Message], sent: Mapping[str, np.ndarray],
                  units: Sequence[Sequence[str]]) -> tuple[list[Message], int]:
    """``replies`` with each unit's update scaled to at most the round's lower-median norm.

    For each unit U (a list of array keys), ‖u_k‖_U = √Σ_{key ∈ U} ‖X_k[key] − X_sent[key]‖²,
    M_U = lower median over k of ‖u_k‖_U, and a reply above it is replaced by
    X_sent + u_k · M_U / ‖u_k‖_U (in float64, cast back to the array's dtype; ``sent``: float64,
    a key absent there is 0). Replies within every bound are returned as they are. Returns the
    replies and how many were scaled.
    """
    if len(replies) < 2:
        return replies, 0
    arrays = [m.content[contract.ARRAYS] for m in replies]
    updates = [{key: a[key].numpy().astype(np.float64) - sent.get(key, 0.0)
                for unit in units for key in unit} for a in arrays]
    scales: list[dict[int, float]] = [{} for _ in replies]  # reply -> unit index -> scale < 1
    for u, unit in enumerate(units):
        norms = [math.sqrt(sum(float(np.vdot(d[key], d[key])) for key in unit))
                 for d in updates]
        bound = statistics.median_low(norms)
        for k, norm in enumerate(norms):
            if norm > bound:
                scales[k][u] = bound / norm
    out = []
    for k, msg in enumerate(replies):
        if not scales[k]:
            out.append(msg)
            continue
        bounded = dict(arrays[k].items())
        for u, scale in scales[k].items():
            for key in units[u]:
                dtype = arrays[k][key].numpy().dtype
                bounded[key] = Array((sent.get(key, 0.0) + scale * updates[k][key]).astype(dtype))
        out.append(_copy(msg, msg.content[contract.METRICS], ArrayRecord(bounded)))
    return out, sum(bool(s) for s in scales)


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
    raise ValueError(f"aggregation={name!r}: one of {', '.join(AGGREGATIONS)}")


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


def _copy(msg: Message, metrics: MetricRecord, arrays: ArrayRecord | None = None) -> Message:
    """A new reply with ``msg``'s metadata, ``metrics`` and its arrays (or ``arrays``)."""
    if arrays is None:
        arrays = ArrayRecord(dict(msg.content[contract.ARRAYS].items()))
    content = RecordDict({contract.ARRAYS: arrays, contract.METRICS: metrics})
    return Message(content=content, metadata=msg.metadata)
