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
+inf: a non-private client) and ε ≥ 0, the metrics the aggregation reads present and scalar,
``num-examples`` an integer in [1, max]; the array keys exactly the expected ones, each with the
expected shape and dtype (declared and decoded) and finite values.

Last, across the round, on each reply's *update* u_k = X_k − X_sent (X_sent: the array of the
global state the round sent; a reply is judged by what it changes, so that a reply of −B_sent,
whose own norm is that of B, is seen as the jump of 2‖B_sent‖ it is):

1. norm: no update may exceed ``max_norm_ratio`` × the median norm of the same update over the
   *other* replies (the median of the others, so that the suspect does not move its own
   yardstick, and with two replies each is held against the other). Compared: each group
   (the LoRA factors together, the head together), and each array large enough to be judged
   alone, so a blow-up of one layer is not diluted by the rest. An array of d numbers is
   judged alone when two honest noise updates of it (under DP: Gaussian) pass the ratio by
   chance with p ≤ Φ(−MIN_NOISE_Z) ≈ 3e-5: their norm ratio is √F(d, d), so d ≥ 6 at the
   default ratio 10 (a 3-class head's bias, d = 3, passed 10 × with p = 0.3 %: it is judged
   within the head); ``ReplyValidator._judged_alone``;
2. direction, each cosine held to ``min_update_cosine`` (default −0.5): (a) u_k of the LoRA
   factors (concatenated), and of the head, with the mean update of the other replies (the
   most opposed reply is left out first, then the rest are compared again): a reply that
   undoes what the others do (a flipped update) is caught at any norm; (b) the arrays X_k
   with the arrays as sent, X_sent: below −0.5 only if the reply went back past zero (a
   reply of −B_sent has cosine −1, at the norm of B). Honest updates share the gradient's
   direction, and under DP they are nearly orthogonal noise (cosine ≈ ±1/√d for d trained
   numbers), far from −0.5; an honest reply never reverses the state it was sent. With two
   replies that point apart, neither can be told from the other and both are left out.

A zero update or a zero reference has no direction and is not checked; (a) needs two replies.
A group of fewer than (4 / 0.5)² = 64 numbers is not checked by direction: noise alone would
cross the bar too often (``ReplyValidator._enough_numbers``).
It needs no history beyond the state that was sent.

The screen never raises: any unexpected failure while reading a reply rejects that reply.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from scipy import stats

from common import contract

DEFAULT_MAX_NORM_RATIO = 10.0
DEFAULT_MIN_UPDATE_COSINE = -0.5
MIN_NOISE_Z = 4.0  # a screen applies where honest noise passes its bar with p <= Phi(-4) = 3e-5
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
    max_norm_ratio : reject an array whose update norm exceeds this × the median update norm
        of that array over the other replies; 0 or inf disables the check.
    min_update_cosine : reject an update whose cosine with the mean update of the other
        replies is below this; -1 disables the check.
    max_num_examples : the largest plausible ``num-examples``.
    required_metrics : metric keys a trained reply must carry as finite scalars.
    """

    expected: Mapping[str, ArraySpec]
    sent: Mapping[str, np.ndarray] = field(default_factory=dict)
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO
    min_update_cosine: float = DEFAULT_MIN_UPDATE_COSINE
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    required_metrics: tuple[str, ...] = REQUIRED_METRICS

    def screen(self, replies: Iterable[Message]) -> Screening:
        """Sort ``replies`` into valid, exhausted and rejected; never raises."""
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
                out.rejected.append(_rejection(msg, exc))
        updates = self._drop_norm_outliers(out, updates)
        self._drop_opposed(out, updates)
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

    def _drop_norm_outliers(self, out: Screening, updates: list[dict[str, np.ndarray]]
                            ) -> list[dict[str, np.ndarray]]:
        """Move replies with an update norm > ratio × the others' median to ``rejected``.

        Compared per unit of :meth:`_norm_units`. Returns the updates of the replies kept in
        ``out.valid``.
        """
        if not self.max_norm_ratio or math.isinf(self.max_norm_ratio) or len(updates) < 2:
            return updates
        units = self._norm_units()
        norms = [{what: math.sqrt(sum(float(np.vdot(u[k], u[k])) for k in keys))
                  for what, keys in units} for u in updates]
        kept, kept_updates = [], []
        for k, (msg, update) in enumerate(zip(out.valid, updates, strict=True)):
            too_large = None
            for what, _ in units:
                median = statistics.median(n[what] for j, n in enumerate(norms) if j != k)
                if median > 0 and norms[k][what] > self.max_norm_ratio * median:
                    too_large = (what, median)
                    break
            if too_large is None:
                kept.append(msg)
                kept_updates.append(update)
                continue
            what, median = too_large
            out.rejected.append(_rejection(msg, InvalidReply(
                f"{what} changes by {norms[k][what]:.4g} (Frobenius norm of the update), "
                f"more than {self.max_norm_ratio:g} × the other replies' median "
                f"{median:.4g}")))
        out.valid = kept
        return kept_updates

    def _groups(self) -> list[tuple[str, list[str]]]:
        """The non-empty groups of expected arrays: the LoRA factors, the head."""
        return [(group, keys) for group, keys in (
            ("LoRA factors", [k for k in self.expected if not contract.is_head_key(k)]),
            ("head", [k for k in self.expected if contract.is_head_key(k)])) if keys]

    def _norm_units(self) -> list[tuple[str, list[str]]]:
        """What the norm screen compares, as (description, keys).

        Each array judged alone, then each group as a whole (which holds the arrays too small
        to be judged alone).
        """
        return ([(f"array {key!r}", [key]) for key in self.expected
                 if self._judged_alone(key)]
                + [(f"the {group} (all arrays together)", keys)
                   for group, keys in self._groups()])

    def _judged_alone(self, key: str) -> bool:
        """Whether array ``key`` has enough numbers d for its own norm comparison.

        The norm ratio of two independent Gaussian vectors of d numbers is √F(d, d); the array
        is judged alone when P(F(d, d) > ratio²) ≤ Φ(−MIN_NOISE_Z) (3e-5), the chance that also
        bounds the direction screen (:meth:`_enough_numbers`): d ≥ 6 at ratio 10, 17 at 3.
        """
        d = int(np.prod(self.expected[key].shape))
        return stats.f.sf(self.max_norm_ratio ** 2, d, d) <= stats.norm.sf(MIN_NOISE_Z)

    def _drop_opposed(self, out: Screening, updates: list[dict[str, np.ndarray]]) -> None:
        """Move replies that undo the sent state or oppose the others' updates to ``rejected``.

        Per group of arrays (the LoRA factors together, the head together: enough numbers that
        honest noise stays near 0), two cosines are held to ``min_update_cosine``:

        (b) the reply's arrays with the same arrays as sent, X_k · X_sent / (‖X_k‖ ‖X_sent‖):
            below −0.5 only when the update removed the sent state along its own direction
            and went on past zero (a reply of −B_sent: −1); checked for each reply alone;
        (a) the group's update with the mean update of the other replies: the most opposed
            reply is left out first and the cosines are taken again, so that one hostile
            reply cannot drag the others' reference below the bar; two replies that oppose
            each other are both left out (neither can be told from the other).
        """
        if self.min_update_cosine <= -1:
            return
        limit = f"< strategy.min-update-cosine={self.min_update_cosine:g}"
        groups = [(group, keys) for group, keys in self._groups() if self._enough_numbers(keys)]
        if not groups:
            return
        flat = [{group: np.concatenate([u[k].ravel() for k in keys]) for group, keys in groups}
                for u in updates]
        sent = {group: np.concatenate([self.sent.get(k, np.zeros(self.expected[k].shape)).ravel()
                                       for k in keys]) for group, keys in groups}
        reasons: dict[int, str] = {}
        for i, reply_flat in enumerate(flat):
            for group, _ in groups:
                cosine = _cosine(reply_flat[group] + sent[group], sent[group])
                if cosine < self.min_update_cosine:
                    reasons[i] = (f"its {group} point against the state they were sent (cosine "
                                  f"{cosine:.3f} {limit}): the reply undoes the global model")
                    break
        while len(alive := [i for i in range(len(flat)) if i not in reasons]) >= 2:
            worst, group, cosine = min(
                ((i, g, _cosine(flat[i][g], np.mean([flat[j][g] for j in alive if j != i],
                                                    axis=0)))
                 for i in alive for g, _ in groups), key=lambda t: t[2])
            if cosine >= self.min_update_cosine:
                break
            pair = len(alive) == 2
            for i in (alive if pair else [worst]):
                reasons[i] = (f"its update of the {group} points against the other "
                              f"{'reply' if pair else 'replies'}' mean update (cosine "
                              f"{cosine:.3f} {limit})")
        out.rejected += [_rejection(out.valid[i], InvalidReply(why))
                         for i, why in sorted(reasons.items())]
        out.valid = [m for i, m in enumerate(out.valid) if i not in reasons]

    def _enough_numbers(self, keys: list[str]) -> bool:
        """Whether a group has d ≥ (MIN_NOISE_Z / c)² numbers, c = ``min_update_cosine``.

        The cosine of two independent noise vectors of d numbers is about N(0, 1/d): with
        fewer numbers an honest reply falls below c by chance too often (d = 16, c = −0.5:
        2 % per comparison; merge-sv's σ of a small model is that small). From the bound on,
        chance needs MIN_NOISE_Z standard deviations (p < 3e-5). Smaller groups are not
        screened by direction (the norm screen still applies).
        """
        d = sum(int(np.prod(self.expected[k].shape)) for k in keys)
        return d * self.min_update_cosine ** 2 >= MIN_NOISE_Z ** 2


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    """The cosine x · y / (‖x‖ ‖y‖); 0 when either is 0 (no direction to compare)."""
    scale = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.vdot(x, y)) / scale if scale > 0 else 0.0


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
