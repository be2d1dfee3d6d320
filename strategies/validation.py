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
+inf only in a non-private run) and ε ≥ 0, the metrics the aggregation reads present and scalar,
``num-examples`` an integer in [1, max]; the array keys exactly the expected ones, each with the
expected shape and dtype (declared and decoded) and finite values.

Last, the outlier screens of :mod:`strategies.screens` judge each well-formed reply by its
*update* u_k = X_k − X_sent (X_sent: the array of the global state the round sent; a reply of
−B_sent, whose own norm is that of B, is the jump of 2‖B_sent‖ it is): by norm, by how much of
the sent state it erases, and by direction against the replies' coordinate-wise median. They
reject at most ``num_malicious`` replies and never more than half; the replies they still flag
are kept (their influence is bounded in :mod:`strategies.aggregation`) and listed as suspects.

The screen never raises: any unexpected failure while reading a reply rejects that reply.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from common import contract
from strategies.screens import UpdateScreens

DEFAULT_MAX_NORM_RATIO = 10.0
DEFAULT_MIN_UPDATE_COSINE = -0.5
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
DEFAULT_NUM_MALICIOUS = 1
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
    """A round's replies, sorted: aggregate ``valid``, skip ``exhausted``, log ``rejected``.

    ``suspects_kept``: valid replies a screen flagged beyond its rejection budget (logged).
    """

    valid: list[Message] = field(default_factory=list)
    exhausted: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    suspects_kept: list[Rejection] = field(default_factory=list)  # flagged, kept (bounded)

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


def sent_arrays(global_arrays: ArrayRecord, keys: Collection[str]) -> dict[str, np.ndarray]:
    """The values (float64) of the ``keys`` that ``global_arrays`` holds: what was sent."""
    return {key: array.numpy().astype(np.float64) for key, array in global_arrays.items()
            if key in keys}


@dataclass(frozen=True)
class ReplyValidator:
    """Checks a round's train replies against what the strategy asked for.

    Parameters
    ----------
    expected : every array key a trained reply must carry (no more, no fewer) and its spec.
    sent : the arrays of the global state the round sent, by key; a reply's update is its
        array minus this one (a key absent here: minus 0).
    max_norm_ratio : flag an update whose norm exceeds this × the median update norm of the
        other replies (per group and large array); 0 or inf disables the check.
    min_update_cosine : flag an update whose cosine with the replies' coordinate-wise median
        update is below this, and an update that erases half of the sent state; -1 disables
        both (:mod:`strategies.screens`).
    num_malicious : f: the outlier screens reject at most min(f, ⌊K / 2⌋) of K replies.
    private : whether the run is private; then a reply must report a finite ε.
    max_num_examples : the largest plausible ``num-examples``.
    required_metrics : metric keys a trained reply must carry as finite scalars.
    """

    expected: Mapping[str, ArraySpec]
    sent: Mapping[str, np.ndarray] = field(default_factory=dict)
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO
    min_update_cosine: float = DEFAULT_MIN_UPDATE_COSINE
    num_malicious: int = DEFAULT_NUM_MALICIOUS
    private: bool = True
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    required_metrics: tuple[str, ...] = REQUIRED_METRICS

    @property
    def sizes(self) -> dict[str, int]:
        """The number of values of each expected array."""
        return {key: math.prod(spec.shape) for key, spec in self.expected.items()}

    def screen(self, replies: Iterable[Message],
               asked: Mapping[str, int] | None = None) -> Screening:
        """Sort ``replies`` into valid, exhausted and rejected; never raises.

        ``asked``: the node each instruction of the round went to, by message id; a rejection
        names the node a reply answers for (the SuperLink's own error replies, for a node that
        went offline or whose instruction expired, come from another node id).
        """
        asked = asked or {}
        out = Screening()
        updates: list[dict[str, np.ndarray]] = []
        for msg in replies:
            try:
                if _is_exhausted(self._check_structure(msg)):
                    out.exhausted.append(msg)
                    continue
                updates.append(self._check_trained(msg))
                out.valid.append(msg)
            except Exception as exc:  # a reply, however broken, must never stop the round
                out.rejected.append(_rejection(msg, exc, asked))
        verdicts = UpdateScreens(
            sizes=self.sizes, sent=self.sent, max_norm_ratio=self.max_norm_ratio,
            min_update_cosine=self.min_update_cosine,
            num_malicious=self.num_malicious).judge(updates)
        out.suspects_kept = [_rejection(out.valid[i], InvalidReply(why), asked)
                             for i, why in verdicts.suspects_kept.items()]
        out.rejected += [_rejection(out.valid[i], InvalidReply(why), asked)
                         for i, why in sorted(verdicts.rejected.items())]
        out.valid = [m for i, m in enumerate(out.valid) if i not in verdicts.rejected]
        return out

    def _check_structure(self, msg: Message) -> MetricRecord:
        """Error reply, content, one ArrayRecord and one MetricRecord; return the metrics."""
        if msg.has_error():
            raise _FailedReply(f"Flower error reply (code {msg.error.code}): "
                               f"{root_cause(msg.error.reason)}")
        if not msg.has_content():
            raise InvalidReply("the reply has no content")
        content = msg.content
        _check_record_names("ArrayRecord", content.array_records, contract.ARRAYS)
        _check_record_names("MetricRecord", content.metric_records, contract.METRICS)
        return content.metric_records[contract.METRICS]

    def _check_trained(self, msg: Message) -> dict[str, np.ndarray]:
        """Metrics and arrays of a client that trained; return each array's update (float64)."""
        content: RecordDict = msg.content
        self._check_metrics(content.metric_records[contract.METRICS])
        arrays = content.array_records[contract.ARRAYS]
        _check_keys(set(arrays.keys()), set(self.expected))
        updates = {}
        for key, spec in self.expected.items():
            values = _checked_values(key, arrays[key], spec).astype(np.float64)
            if key in self.sent:
                values -= self.sent[key]
            if not math.isfinite(float(np.linalg.norm(values))):
                raise InvalidReply(f"array {key!r} has a non-finite update norm")
            updates[key] = values
        return updates

    def _check_metrics(self, metrics: MetricRecord) -> None:
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if key == contract.EPSILON and values == [math.inf]:
                if self.private:
                    raise InvalidReply(f"metric {key!r} is inf in a private run: a client of "
                                       "this run must report the finite ε its DP-SGD spent")
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


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Failed))(?:: (.*))?$")


def root_cause(reason: str, limit: int = 300) -> str:
    """The innermost exception of an error reason: ``"IndexError: list index out of range"``.

    A ClientApp that raises reaches the server as a reason holding whole tracebacks (under Ray,
    two of them, wrapped in ``ClientAppException``); the first ``Name: message`` line that is not
    a wrapper is the client's own exception. Reasons without one are cut to ``limit`` characters.
    """
    lines = reason.splitlines()
    for i, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line)
        if match and not match.group(1).endswith(("ClientAppException", "RayTaskError")):
            message = match.group(2) or ""
            if message.endswith(":"):  # a list of problems follows, one indented line each
                message += " " + " ".join(
                    x.strip() for x in itertools.takewhile(
                        lambda x: x.startswith((" ", "\t")), lines[i + 1:i + 4]))
            return f"{match.group(1).rsplit('.', 1)[-1]}: {message}".strip()
    first = " ".join(reason.split())
    return first if len(first) <= limit else first[:limit] + " ..."


class _FailedReply(InvalidReply):
    """A Flower error reply: the node dropped out, timed out or its ClientApp raised."""


def _rejection(msg: Message, exc: Exception, asked: Mapping[str, int]) -> Rejection:
    if isinstance(exc, InvalidReply):
        reason = str(exc)
    else:
        reason = f"malformed reply ({type(exc).__name__}: {exc})"
    return Rejection(_node_id(msg, asked), reason, failed=isinstance(exc, _FailedReply))


def _node_id(msg: Message, asked: Mapping[str, int]) -> int:
    """The node ``msg`` answers for: the one its instruction went to, else its sender."""
    try:
        return int(asked.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
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


def _checked_values(key: str, array: object, spec: ArraySpec) -> np.ndarray:
    """Check declared and decoded shape and dtype, and finiteness; return the values."""
    _check_spec(key, "has", tuple(array.shape), str(array.dtype), spec)
    try:
        values = array.numpy()
    except Exception as exc:  # a bad stype, truncated or pickled data, ...
        raise InvalidReply(f"array {key!r} cannot be decoded "
                           f"({type(exc).__name__}: {exc})") from exc
    _check_spec(key, "decodes to", tuple(values.shape), str(values.dtype), spec)
    if not np.isfinite(values).all():
        raise InvalidReply(f"array {key!r} has NaN or Inf values")
    return values


def _check_spec(key: str, verb: str, shape: tuple, dtype: str, spec: ArraySpec) -> None:
    if shape != spec.shape:
        raise InvalidReply(f"array {key!r} {verb} shape {shape}, expected {spec.shape}")
    if dtype != spec.dtype:
        raise InvalidReply(f"array {key!r} {verb} dtype {dtype}, expected {spec.dtype}")


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
