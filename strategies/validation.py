"""Screening of train replies before aggregation: drop failed, malformed and outlying updates.

Flower's ``FedAvg.aggregate_train`` raises on replies that disagree in structure and averages
whatever numbers it gets, so one broken or hostile client could stop the run or poison the
global adapter. :meth:`ReplyValidator.screen` sorts a round's replies into

- ``valid``: replies that trained and match the expected message contract exactly;
- ``exhausted``: well-formed replies of clients that refused to train (``budget-exhausted = 1``);
- ``rejected``: one :class:`Rejection` (node id and reason) per other reply.

What a reply must carry depends on the round: :func:`reply_keys` names the arrays of the
factors the strategy asked for (``contract.TRAIN_FACTORS``: B, A or both) and the head, so a
reply that sends the wrong factor is rejected like any other malformed one.

Checks, in order, for each reply: Flower error reply (dropout or ClientApp failure); content;
exactly one ArrayRecord under ``contract.ARRAYS`` and one MetricRecord under ``contract.METRICS``;
``budget-exhausted`` in {0, 1}; then, for clients that trained, every metric finite (ε may be
+inf: a non-private client) and ε ≥ 0, the metrics
the aggregation reads present and scalar, ``num-examples`` an integer in [1, max]; the array keys
exactly the expected ones, each with the expected shape and dtype (declared and decoded) and
finite values. Last, across the round: no array (each B, and the head) may have a Frobenius
norm above ``max_norm_ratio`` × the lower median of that array's norm over the round's
otherwise valid replies. The check is per array, not on the total, so a blow-up of one layer
is not diluted by the others; the *lower* median means that with two replies the larger one
is compared with the smaller. An array whose median norm is 0 has no scale and is not checked.
It needs no history and no global state.

The screen never raises: any unexpected failure while reading a reply rejects that reply.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from common import contract

DEFAULT_MAX_NORM_RATIO = 10.0
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
# The metrics that the train-metric aggregation (strategies.metrics) reads from every reply.
REQUIRED_METRICS = (contract.NUM_EXAMPLES, contract.TRAIN_LOSS, contract.EPSILON,
                    contract.NOISE_MULTIPLIER)
UNKNOWN_NODE = -1  # node id reported when a reply's metadata cannot be read


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype (numpy name, e.g. ``"float32"``) an array of a reply must have."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Rejection:
    """One reply left out of the aggregation, with why; ``failed``: a Flower error reply."""

    node_id: int
    reason: str
    failed: bool = False


@dataclass
class Screening:
    """A round's replies, sorted: aggregate ``valid``, skip ``exhausted``, log ``rejected``."""

    valid: list[Message] = field(default_factory=list)
    exhausted: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def num_failed(self) -> int:
        """Flower error replies: the node dropped out or its ClientApp raised."""
        return sum(r.failed for r in self.rejected)

    @property
    def num_rejected(self) -> int:
        """Replies that arrived but broke the contract or were outliers."""
        return len(self.rejected) - self.num_failed


class InvalidReply(ValueError):
    """A reply breaks the train-reply contract; the message is the rejection reason."""


def reply_keys(global_arrays: ArrayRecord, lora_modules: Iterable[str],
               factors: Iterable[contract.Factor], *, train_head: bool) -> set[str]:
    """The array keys a trained reply must carry in a round that trains ``factors``.

    That is ``lora_key(module, f)`` for every LoRA layer and every trained factor, plus the
    head arrays of ``global_arrays`` when clients train the head. Base-weight residuals
    (``contract.base_key``) only travel down and are never expected back.
    """
    factors = tuple(factors)
    keys = {contract.lora_key(m, f) for m in lora_modules for f in factors}
    if train_head:
        keys |= {k for k in global_arrays.keys() if contract.is_head_key(k)}
    return keys


def expected_arrays(global_arrays: ArrayRecord, keys: Collection[str]) -> dict[str, ArraySpec]:
    """The specs of the ``keys`` (those a client sends back) that ``global_arrays`` holds."""
    return {key: ArraySpec(tuple(int(d) for d in array.shape), str(array.dtype))
            for key, array in global_arrays.items() if key in keys}


@dataclass(frozen=True)
class ReplyValidator:
    """Checks a round's train replies against what the strategy asked for.

    Parameters
    ----------
    expected : every array key a trained reply must carry (no more, no fewer) and its spec.
    max_norm_ratio : reject an array whose Frobenius norm exceeds this × the round's lower
        median for that array; 0 or inf disables the check.
    max_num_examples : the largest plausible ``num-examples``.
    required_metrics : metric keys a trained reply must carry as finite scalars.
    """

    expected: Mapping[str, ArraySpec]
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    required_metrics: tuple[str, ...] = REQUIRED_METRICS

    def screen(self, replies: Iterable[Message]) -> Screening:
        """Sort ``replies`` into valid, exhausted and rejected; never raises."""
        out = Screening()
        norms: list[dict[str, float]] = []
        for msg in replies:
            try:
                if _is_exhausted(self._check_structure(msg)):
                    out.exhausted.append(msg)
                    continue
                norms.append(self._check_trained(msg))
                out.valid.append(msg)
            except Exception as exc:  # a reply, however broken, must never stop the round
                out.rejected.append(_rejection(msg, exc))
        self._drop_norm_outliers(out, norms)
        return out

    def _check_structure(self, msg: Message) -> MetricRecord:
        """Error reply, content, one ArrayRecord and one MetricRecord; return the metrics."""
        if msg.has_error():
            raise _FailedReply(f"Flower error reply (code {msg.error.code}): {msg.error.reason}")
        if not msg.has_content():
            raise InvalidReply("the reply has no content")
        content = msg.content
        _check_record_names("ArrayRecord", content.array_records, contract.ARRAYS)
        _check_record_names("MetricRecord", content.metric_records, contract.METRICS)
        return content.metric_records[contract.METRICS]

    def _check_trained(self, msg: Message) -> dict[str, float]:
        """Metrics and arrays of a client that trained; return each array's Frobenius norm."""
        content: RecordDict = msg.content
        self._check_metrics(content.metric_records[contract.METRICS])
        arrays = content.array_records[contract.ARRAYS]
        _check_keys(set(arrays.keys()), set(self.expected))
        return {key: _checked_norm(key, arrays[key], spec) for key, spec in self.expected.items()}

    def _check_metrics(self, metrics: MetricRecord) -> None:
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if key == contract.EPSILON and values == [math.inf]:
                continue  # a non-private client (privacy.epsilon = inf)
            if not all(_is_finite_number(v) for v in values):
                raise InvalidReply(f"metric {key!r} is not finite: {value!r}")
        if metrics.get(contract.EPSILON, 0) < 0:
            raise InvalidReply(f"metric {contract.EPSILON!r} is {metrics[contract.EPSILON]!r}, "
                               "expected >= 0")
        for key in self.required_metrics:
            if key not in metrics:
                raise InvalidReply(f"metric {key!r} is missing")
            if isinstance(metrics[key], list):
                raise InvalidReply(f"metric {key!r} is a list, expected one number")
        n = metrics[contract.NUM_EXAMPLES]
        if not isinstance(n, int) or isinstance(n, bool):
            raise InvalidReply(f"metric {contract.NUM_EXAMPLES!r} is {n!r}, expected an integer")
        if not 1 <= n <= self.max_num_examples:
            raise InvalidReply(f"metric {contract.NUM_EXAMPLES!r} is {n}, expected 1 to "
                               f"{self.max_num_examples}")

    def _drop_norm_outliers(self, out: Screening, norms: list[dict[str, float]]) -> None:
        """Move replies with any array norm > ratio × the lower median to ``rejected``."""
        if not self.max_norm_ratio or math.isinf(self.max_norm_ratio) or len(norms) < 2:
            return
        medians = {key: statistics.median_low(n[key] for n in norms) for key in self.expected}
        kept: list[Message] = []
        for msg, reply_norms in zip(out.valid, norms, strict=True):
            too_large = [key for key, median in medians.items()
                         if median > 0 and reply_norms[key] > self.max_norm_ratio * median]
            if not too_large:
                kept.append(msg)
                continue
            key = too_large[0]
            out.rejected.append(_rejection(msg, InvalidReply(
                f"array {key!r} has Frobenius norm {reply_norms[key]:.4g}, more than "
                f"{self.max_norm_ratio:g} × the round's median {medians[key]:.4g}")))
        out.valid = kept


def common_metrics(replies: list[Message]) -> list[Message]:
    """``replies`` with each MetricRecord cut to the keys all of them carry.

    ``FedAvg`` raises unless every reply has the same metric keys; a valid reply may carry an
    extra diagnostic metric (another client version), which is no reason to drop its update.
    """
    if not replies:
        return []
    keys = set.intersection(*(set(m.content[contract.METRICS].keys()) for m in replies))
    return [_with_metrics(m, keys) for m in replies]


def _with_metrics(msg: Message, keys: set[str]) -> Message:
    metrics = msg.content[contract.METRICS]
    if set(metrics.keys()) == keys:
        return msg
    content = RecordDict({contract.ARRAYS: msg.content[contract.ARRAYS],
                          contract.METRICS: MetricRecord({k: metrics[k] for k in sorted(keys)})})
    return Message(content=content, metadata=msg.metadata)


class _FailedReply(InvalidReply):
    """A Flower error reply: the node dropped out, timed out or its ClientApp raised."""


def _rejection(msg: Message, exc: Exception) -> Rejection:
    if isinstance(exc, InvalidReply):
        reason = str(exc)
    else:
        reason = f"malformed reply ({type(exc).__name__}: {exc})"
    return Rejection(_node_id(msg), reason, failed=isinstance(exc, _FailedReply))


def _node_id(msg: Message) -> int:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:  # a broken message still gets its rejection line
        return UNKNOWN_NODE


def _check_record_names(kind: str, records: Mapping[str, object], name: str) -> None:
    if list(records) != [name]:
        raise InvalidReply(f"expected exactly one {kind} named {name!r}, got {sorted(records)}")


def _is_exhausted(metrics: MetricRecord) -> bool:
    """``budget-exhausted`` is 1 (the client did not train) or 0 / absent; else invalid."""
    flag = metrics.get(contract.BUDGET_EXHAUSTED, 0)
    if isinstance(flag, list) or flag not in (0, 1):
        raise InvalidReply(f"metric {contract.BUDGET_EXHAUSTED!r} is {flag!r}, expected 0 or 1")
    return flag == 1


def _check_keys(got: set[str], expected: set[str]) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing:
        raise InvalidReply(f"array(s) missing: {missing}")
    if extra:
        raise InvalidReply(f"unexpected array(s): {extra}")


def _checked_norm(key: str, array: object, spec: ArraySpec) -> float:
    """Check declared and decoded shape and dtype, and finiteness; return ‖array‖_F."""
    _check_spec(key, "has", tuple(array.shape), str(array.dtype), spec)
    try:
        values = array.numpy()
    except Exception as exc:  # a bad stype, truncated or pickled data, ...
        raise InvalidReply(f"array {key!r} cannot be decoded "
                           f"({type(exc).__name__}: {exc})") from exc
    _check_spec(key, "decodes to", tuple(values.shape), str(values.dtype), spec)
    if not np.isfinite(values).all():
        raise InvalidReply(f"array {key!r} has NaN or Inf values")
    norm = float(np.linalg.norm(values.astype(np.float64)))  # float64: no overflow to inf
    if not math.isfinite(norm):
        raise InvalidReply(f"array {key!r} has a non-finite norm")
    return norm


def _check_spec(key: str, verb: str, shape: tuple, dtype: str, spec: ArraySpec) -> None:
    if shape != spec.shape:
        raise InvalidReply(f"array {key!r} {verb} shape {shape}, expected {spec.shape}")
    if dtype != spec.dtype:
        raise InvalidReply(f"array {key!r} {verb} dtype {dtype}, expected {spec.dtype}")


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
