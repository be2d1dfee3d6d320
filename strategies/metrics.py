"""Aggregation of the clients' train-reply metrics, and communication accounting."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MetricRecord, RecordDict

from common import contract, schema


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the train loss; mean and max of the clients' cumulative ε.

    ``records`` are replies of clients that trained this round; weights are ``weight_key``.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weight_key]) for m in metrics]
    total = sum(weights)
    eps = [float(m[contract.EPSILON]) for m in metrics]
    return MetricRecord({
        contract.TRAIN_LOSS: sum(w * float(m[contract.TRAIN_LOSS])
                                 for w, m in zip(weights, metrics, strict=True)) / total,
        schema.EPSILON_MEAN: sum(eps) / len(eps),
        schema.EPSILON_MAX: max(eps),
        contract.NOISE_MULTIPLIER: max(float(m[contract.NOISE_MULTIPLIER]) for m in metrics),
        schema.CLIENTS_TRAINED: len(records),
        weight_key: total,
    })


def reply_bytes(replies: Iterable[Message]) -> int:
    """Bytes of all ArrayRecords carried by ``replies`` (the upload of one round)."""
    return sum(
        record.count_bytes()
        for msg in replies if not msg.has_error()
        for record in msg.content.array_records.values()
    )
