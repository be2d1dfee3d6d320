"""Screening of train replies: malformed, failed and outlying replies never reach the average."""

import io
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from common import contract
from common.config import AppConfig, ConfigError
from strategies import FedSVD
from strategies.screens import enough_numbers, judged_alone
from strategies.validation import (
    DEFAULT_MAX_NUM_EXAMPLES,
    ArraySpec,
    ReplyValidator,
    expected_arrays,
)
from tests.helpers import FakeGrid

MODULES = ["l0.query", "l1.value"]
B_SHAPES = {"l0.query": (3, 2), "l1.value": (4, 2)}  # (m, r)
A_COLS = {"l0.query": 5, "l1.value": 3}
HEAD = contract.head_key("classifier.weight")
B0, B1 = contract.lora_key(MODULES[0], "B"), contract.lora_key(MODULES[1], "B")
EXPECTED_KEYS = [B0, B1, HEAD]
REQUIRED = [contract.NUM_EXAMPLES, contract.TRAIN_LOSS, contract.EPSILON,
            contract.NOISE_MULTIPLIER]


def _global() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    state = {}
    for m in MODULES:
        state[contract.lora_key(m, "A")] = torch.tensor(rng.normal(size=(2, A_COLS[m])),
                                                        dtype=torch.float32)
        state[contract.lora_key(m, "B")] = torch.zeros(B_SHAPES[m])
    state[HEAD] = torch.zeros(2, 3)
    return state


def _good_arrays(seed: int) -> dict[str, np.ndarray]:
    """Arrays around 1 with a little noise: norms of different replies stay within 3x."""
    rng = np.random.default_rng(seed)
    shapes = {B0: B_SHAPES[MODULES[0]], B1: B_SHAPES[MODULES[1]], HEAD: (2, 3)}
    return {k: (1 + 0.3 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def _good_metrics(n: int) -> dict:
    return {contract.NUM_EXAMPLES: n, contract.TRAIN_LOSS: 1.0 + n / 1000,
            contract.EPSILON: 2.0 + n / 100, contract.NOISE_MULTIPLIER: 0.9,
            contract.BUDGET_EXHAUSTED: 0}


def _instruction(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def _content(arrays: dict, metrics: dict) -> RecordDict:
    record = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})
    return RecordDict({contract.ARRAYS: record, contract.METRICS: MetricRecord(metrics)})


def _reply(node: int, arrays: dict, metrics: dict) -> Message:
    return Message(_content(arrays, metrics), reply_to=_instruction(node))


def _good_reply(node: int, seed: int | None = None, n: int | None = None) -> Message:
    return _reply(node, _good_arrays(node if seed is None else seed),
                  _good_metrics(10 * node if n is None else n))


def _strategy(**kwargs) -> FedSVD:
    """FedSVD screening as by default, averaging as FedAvg (no bounds: exact means to check)."""
    kwargs.setdefault("svd_period", 1)
    kwargs.setdefault("max_weight_ratio", 0.0)
    kwargs.setdefault("bound_updates", False)
    kwargs.setdefault("min_train_nodes", 1)
    strategy = FedSVD(MODULES, fraction_train=1.0, min_available_nodes=1, **kwargs)
    list(strategy.configure_train(1, ArrayRecord(torch_state_dict=_global()), ConfigRecord(),
                                  FakeGrid(3)))
    return strategy


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


# --- one builder per rejection reason: (good arrays, good metrics, node) -> reply ---------------

def _without_content(node):
    msg = _good_reply(node)
    msg.__dict__["_content"] = None  # cannot be built through the API; a broken transport could
    return msg


def _with_records(arrays_names, metrics_names):
    def build(a, m, node):
        records = {name: ArrayRecord({k: Array(v) for k, v in a.items()}) for name in arrays_names}
        records.update({name: MetricRecord(m) for name in metrics_names})
        return Message(RecordDict(records), reply_to=_instruction(node))
    return build


def _edited(arrays=lambda a: None, metrics=lambda m: None):
    """A builder that applies ``arrays`` and ``metrics`` to copies of the good dicts."""
    def build(a, m, node):
        a, m = dict(a), dict(m)
        arrays(a)
        metrics(m)
        return _reply(node, a, m)
    return build


def _set(d, key, value):
    d[key] = value


def _poison(d, key, value):
    d[key] = d[key].copy()
    d[key][1, 0] = value


CASES = {
    "error-reply": (lambda a, m, node: Message(Error(code=3, reason="node dropped"),
                                               reply_to=_instruction(node)),
                    "Flower error reply (code 3): node dropped"),
    "no-content": (lambda a, m, node: _without_content(node), "the reply has no content"),
    "no-arrayrecord": (_with_records([], [contract.METRICS]),
                       "expected exactly one ArrayRecord named 'arrays', got []"),
    "two-arrayrecords": (_with_records([contract.ARRAYS, "more"], [contract.METRICS]),
                         "expected exactly one ArrayRecord named 'arrays', got ['arrays', 'more']"),
    "arrayrecord-misnamed": (_with_records(["weights"], [contract.METRICS]),
                             "expected exactly one ArrayRecord named 'arrays', got ['weights']"),
    "no-metricrecord": (_with_records([contract.ARRAYS], []),
                        "expected exactly one MetricRecord named 'metrics', got []"),
    "two-metricrecords": (_with_records([contract.ARRAYS], [contract.METRICS, "m2"]),
                          "expected exactly one MetricRecord named 'metrics', got ['m2', "
                          "'metrics']"),
    "missing-array": (_edited(arrays=lambda a: a.pop(B1)),
                      "array(s) missing: ['l1.value.lora_B']"),
    "extra-array": (_edited(arrays=lambda a: _set(a, "l0.query.lora_A", np.ones((2, 5), "f4"))),
                    "unexpected array(s): ['l0.query.lora_A']"),
    "wrong-shape": (_edited(arrays=lambda a: _set(a, B0, np.ones((2, 3), "f4"))),
                    "array 'l0.query.lora_B' has shape (2, 3), expected (3, 2)"),
    "wrong-dtype": (_edited(arrays=lambda a: _set(a, B0, a[B0].astype(np.float64))),
                    "array 'l0.query.lora_B' has dtype float64, expected float32"),
    "nan": (_edited(arrays=lambda a: _poison(a, B0, np.nan)),
            "array 'l0.query.lora_B' has NaN or Inf values"),
    "inf-head": (_edited(arrays=lambda a: _poison(a, HEAD, -np.inf)),
                 "array 'head.classifier.weight' has NaN or Inf values"),
    "undecodable": (_edited(arrays=lambda a: _set(a, B1, Array("float32", (4, 2), "numpy.ndarray",
                                                             b"not an npy file"))),
                    "array 'l1.value.lora_B' cannot be decoded (ValueError"),
    "wrong-stype": (_edited(arrays=lambda a: _set(a, B1, Array("float32", (4, 2), "torch.Tensor",
                                                             _npy(a[B1])))),
                    "array 'l1.value.lora_B' cannot be decoded (TypeError"),
    "data-not-as-declared": (_edited(arrays=lambda a: _set(
        a, B1, Array("float32", (4, 2), "numpy.ndarray", _npy(np.ones((2, 4), "f4"))))),
        "array 'l1.value.lora_B' decodes to shape (2, 4), expected (4, 2)"),
    "num-examples-missing": (_edited(metrics=lambda m: m.pop(contract.NUM_EXAMPLES)),
                             "metric 'num-examples' is missing"),
    "num-examples-zero": (_edited(metrics=lambda m: _set(m, contract.NUM_EXAMPLES, 0)),
                          "metric 'num-examples' is 0, expected 1 to 10000000"),
    "num-examples-negative": (_edited(metrics=lambda m: _set(m, contract.NUM_EXAMPLES, -5)),
                              "metric 'num-examples' is -5, expected 1 to 10000000"),
    "num-examples-fractional": (_edited(metrics=lambda m: _set(m, contract.NUM_EXAMPLES, 12.5)),
                                "metric 'num-examples' is 12.5, expected an integer"),
    "num-examples-absurd": (_edited(metrics=lambda m: _set(m, contract.NUM_EXAMPLES, 10**9)),
                            "metric 'num-examples' is 1000000000, expected 1 to 10000000"),
    "required-metric-missing": (_edited(metrics=lambda m: m.pop(contract.EPSILON)),
                                "metric 'epsilon' is missing"),
    "required-metric-list": (_edited(metrics=lambda m: _set(m, contract.TRAIN_LOSS, [1.0, 2.0])),
                             "metric 'train-loss' is a list, expected one number"),
    "metric-nan": (_edited(metrics=lambda m: _set(m, contract.TRAIN_LOSS, math.nan)),
                   "metric 'train-loss' is not finite: nan"),
    "metric-inf-in-list": (_edited(metrics=lambda m: _set(m, "extra", [1.0, math.inf])),
                           "metric 'extra' is not finite: [1.0, inf]"),
    "budget-flag-invalid": (_edited(metrics=lambda m: _set(m, contract.BUDGET_EXHAUSTED, 2)),
                            "metric 'budget-exhausted' is 2, expected 0 or 1"),
    "norm-outlier": (_edited(arrays=lambda a: _set(a, B1, a[B1] * 100)),
                     "array 'l1.value.lora_B' changes by"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_reply_is_rejected_with_its_reason_and_logged(case, caplog):
    # Prepare: two good replies (nodes 1, 2) and the bad one (node 9)
    build, reason = CASES[case]
    good = [_good_reply(1), _good_reply(2)]
    bad = build(_good_arrays(9), _good_metrics(90), 9)
    strategy = _strategy(svd_period=2)
    # Execute
    screening = strategy.validator(strategy._global, 1).screen([good[0], bad, good[1]])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, [good[0], bad, good[1]])
    # Assert: rejected with its reason, logged with the node id, the good ones averaged
    assert screening.valid == good and screening.exhausted == []
    [rejection] = screening.rejected
    assert rejection.node_id == 9 and rejection.reason.startswith(reason)
    assert rejection.failed == (case == "error-reply")
    assert f"rejected the reply of node 9: {reason}" in caplog.text
    assert metrics["replies-failed"] == int(case == "error-reply")
    assert metrics["replies-rejected"] == int(case != "error-reply")
    assert metrics["clients-trained"] == 2
    new = arrays.to_torch_state_dict()
    b1 = [torch.from_numpy(_good_arrays(node)[B1]) for node in (1, 2)]
    assert torch.allclose(new[B1], (b1[0] * 10 + b1[1] * 20) / 30, atol=1e-6)


def test_norm_outlier_reason_names_the_update_norm_and_the_others_median():
    # B_sent = 0 here, so each update is the reply's B itself
    good = [_good_reply(node) for node in (1, 2, 3)]
    bad = CASES["norm-outlier"][0](_good_arrays(1), _good_metrics(10), 9)
    strategy = _strategy()
    screening = strategy.validator(strategy._global, 1).screen([*good, bad])
    norms = sorted(float(np.linalg.norm(_good_arrays(n)[B1].astype(np.float64))) for n in (1, 2, 3))
    huge = 100 * float(np.linalg.norm(_good_arrays(1)[B1].astype(np.float64)))
    assert [r.reason for r in screening.rejected] == [
        f"array 'l1.value.lora_B' changes by {huge:.4g} (Frobenius norm of the update), more "
        f"than 10 × the other replies' median {norms[1]:.4g}"]


@pytest.mark.parametrize("ratio", [0.0, math.inf])
def test_norm_check_can_be_switched_off(ratio):
    good = [_good_reply(1), _good_reply(2)]
    bad = CASES["norm-outlier"][0](_good_arrays(9), _good_metrics(90), 9)
    strategy = _strategy(max_norm_ratio=ratio)
    screening = strategy.validator(strategy._global, 1).screen([*good, bad])
    assert screening.rejected == [] and len(screening.valid) == 3


def test_exhausted_reply_is_skipped_not_rejected():
    exhausted = _reply(5, _good_arrays(5), {**_good_metrics(50), contract.TRAIN_LOSS: math.nan,
                                            contract.BUDGET_EXHAUSTED: 1})
    strategy = _strategy()
    screening = strategy.validator(strategy._global, 1).screen([_good_reply(1), exhausted])
    assert screening.exhausted == [exhausted] and screening.rejected == []
    _, metrics = strategy.aggregate_train(1, [_good_reply(1), exhausted])
    assert metrics["clients-exhausted"] == 1 and metrics["replies-rejected"] == 0


def test_non_private_replies_with_infinite_epsilon_are_valid():
    """privacy.epsilon = inf: clients report ε = inf, which is not a malformed metric."""
    replies = [_reply(n, _good_arrays(n), {**_good_metrics(10 * n), contract.EPSILON: math.inf,
                                           contract.NOISE_MULTIPLIER: 0.0}) for n in (1, 2)]
    strategy = _strategy(private=False)
    screening = strategy.validator(strategy._global, 1).screen(replies)
    assert screening.rejected == [] and len(screening.valid) == 2
    negative = _reply(3, _good_arrays(3), {**_good_metrics(30), contract.EPSILON: -1.0})
    rejected = strategy.validator(strategy._global, 1).screen([negative]).rejected
    assert [r.reason for r in rejected] == ["metric 'epsilon' is -1.0, expected >= 0"]


def test_extra_diagnostic_metric_on_one_reply_does_not_stop_aggregation():
    plain = _good_reply(1)
    extended = _reply(2, _good_arrays(2), {**_good_metrics(20), contract.B_DELTA_NORM: 0.5})
    arrays, metrics = _strategy().aggregate_train(1, [plain, extended])
    assert arrays is not None and metrics["clients-trained"] == 2
    assert metrics[contract.TRAIN_LOSS] == pytest.approx((10 * 1.01 + 20 * 1.02) / 30)


def test_without_head_training_the_head_must_not_be_sent():
    strategy = _strategy(train_head=False)
    with_head = _good_reply(1)
    no_head = _edited(arrays=lambda a: a.pop(HEAD))(_good_arrays(2), _good_metrics(20), 2)
    screening = strategy.validator(strategy._global, 1).screen([with_head, no_head])
    assert screening.valid == [no_head]
    assert [r.reason for r in screening.rejected] == [
        "unexpected array(s): ['head.classifier.weight']"]


def test_expected_arrays_take_shape_and_dtype_from_the_global_record():
    specs = expected_arrays(ArrayRecord(torch_state_dict=_global()), {B0, HEAD, "absent"})
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == {
        B0: ((3, 2), "float32"), HEAD: ((2, 3), "float32")}


def test_max_num_examples_is_configurable():
    validator = ReplyValidator(expected_arrays(ArrayRecord(torch_state_dict=_global()),
                                               EXPECTED_KEYS), max_num_examples=100)
    screening = validator.screen([_good_reply(1, n=100), _good_reply(2, n=101)])
    assert [m.metadata.src_node_id for m in screening.valid] == [1]
    assert [r.reason for r in screening.rejected] == [
        "metric 'num-examples' is 101, expected 1 to 100"]


def test_too_few_valid_replies_keep_the_global_adapter(caplog):
    # Prepare: min 3 valid; 2 good, 1 with NaN, 1 dropout
    strategy = _strategy(min_train_nodes=3)
    before = {k: v.clone() for k, v in strategy._global.to_torch_state_dict().items()}
    nan = CASES["nan"][0](_good_arrays(3), _good_metrics(30), 3)
    replies = [_good_reply(1), _good_reply(2), nan, CASES["error-reply"][0](None, None, 4)]
    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    assert arrays is None and metrics is None
    assert ("2 valid trained repl(ies), fewer than strategy.min-train-nodes=3 (3 sampled: 1 "
            "failed, 0 late, 1 rejected, 0 with their privacy budget spent): no update"
            in caplog.text)
    after = strategy._global.to_torch_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    last = strategy.training_metrics.of(1)
    assert (last["replies-rejected"], last["replies-failed"], last["clients-trained"]) == (1, 1, 0)


def test_enough_valid_replies_update_with_min_train_nodes():
    strategy = _strategy(min_train_nodes=2)
    arrays, _ = strategy.aggregate_train(1, [_good_reply(1), _good_reply(2)])
    assert arrays is not None


def test_dropouts_are_counted_and_the_others_are_averaged():
    # Prepare: nodes 2 and 4 dropped out (Flower error replies), 1 and 3 trained
    strategy = _strategy(svd_period=2)  # round 1: no refactorization, B' = weighted mean of B
    dropped = [Message(Error(code=c, reason="timeout"), reply_to=_instruction(node))
               for c, node in ((1, 2), (2, 4))]
    replies = [_good_reply(1, n=10), dropped[0], _good_reply(3, n=30), dropped[1]]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: B' = (10 B_1 + 30 B_3) / 40, A unchanged, counts in the metrics
    new = arrays.to_torch_state_dict()
    for key in EXPECTED_KEYS:
        expected = (10 * _good_arrays(1)[key] + 30 * _good_arrays(3)[key]) / 40
        assert torch.allclose(new[key], torch.from_numpy(expected), atol=1e-6)
    for m in MODULES:
        key = contract.lora_key(m, "A")
        assert torch.equal(new[key], _global()[key])
    assert (metrics["replies-failed"], metrics["replies-rejected"]) == (2, 0)
    assert metrics["clients-trained"] == 2 and metrics[contract.NUM_EXAMPLES] == 40


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="round_timeout=0"):
        FedSVD(MODULES, round_timeout=0)
    with pytest.raises(ValueError, match="short_round='later'"):
        FedSVD(MODULES, short_round="later")
    with pytest.raises(ValueError, match="max_norm_ratio=0.5"):
        FedSVD(MODULES, max_norm_ratio=0.5)


# --- fuzz: random malformed replies among good ones ---------------------------------------------

NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
KEYS = st.sampled_from(EXPECTED_KEYS)


def _fuzz_error(draw, a, m, node):
    error = Error(code=draw(st.integers(-5, 500)), reason=draw(st.none() | st.text(max_size=8)))
    return Message(error, reply_to=_instruction(node))


def _fuzz_records(draw, a, m, node):
    names = st.lists(st.sampled_from([contract.ARRAYS, contract.METRICS, "x"]), unique=True)
    arrays_names = draw(names)
    metrics_names = [n for n in draw(names) if n not in arrays_names]  # one name, one record
    if arrays_names == [contract.ARRAYS] and metrics_names == [contract.METRICS]:
        metrics_names.append("x")
    return _with_records(arrays_names, metrics_names)(a, m, node)


def _fuzz_array_keys(draw, a, m, node):
    dropped = draw(st.lists(KEYS, unique=True, max_size=3))
    extra = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda k: k not in a),
                          unique=True, max_size=2, min_size=0 if dropped else 1))
    a = {k: v for k, v in a.items() if k not in dropped}
    a.update({k: np.ones((2, 2), "f4") for k in extra})
    return _reply(node, a, m)


def _fuzz_shape(draw, a, m, node):
    key = draw(KEYS)
    shape = draw(st.lists(st.integers(0, 4), max_size=3).map(tuple)
                 .filter(lambda s: s != a[key].shape))
    return _reply(node, {**a, key: np.ones(shape, "f4")}, m)


def _fuzz_dtype(draw, a, m, node):
    key, dtype = draw(KEYS), draw(st.sampled_from(["f2", "f8", "i4", "i8", "u1", "c8", "?"]))
    return _reply(node, {**a, key: a[key].astype(dtype)}, m)


def _fuzz_nonfinite(draw, a, m, node):
    key = draw(KEYS)
    values = a[key].copy()
    values.flat[draw(st.integers(0, values.size - 1))] = draw(NONFINITE)
    return _reply(node, {**a, key: values}, m)


def _fuzz_encoding(draw, a, m, node):
    key = draw(KEYS)
    values = a[key]
    data = draw(st.binary(max_size=40) | st.just(_npy(np.ones(values.size + 1, "f4")))
                | st.just(_npy(values.T.copy())) | st.just(_npy(values.astype("f8"))))
    stype = draw(st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]))
    return _reply(node, {**a, key: Array("float32", values.shape, stype, data)}, m)


def _fuzz_num_examples(draw, a, m, node):
    value = draw(st.integers(max_value=0) | st.integers(min_value=DEFAULT_MAX_NUM_EXAMPLES + 1)
                 | st.floats(allow_nan=True) | st.lists(st.integers(1, 9), max_size=2)
                 | st.none())
    m = {k: v for k, v in m.items() if k != contract.NUM_EXAMPLES}
    if value is not None:
        m[contract.NUM_EXAMPLES] = value
    return _reply(node, a, m)


def _fuzz_metrics(draw, a, m, node):
    key = draw(st.sampled_from([*REQUIRED[1:], "extra"]))
    value = draw(NONFINITE | st.lists(st.floats(), min_size=1, max_size=2)
                 .filter(lambda v: key != "extra" or not all(map(math.isfinite, v)))
                 | st.none())
    if key == contract.EPSILON and value == math.inf:
        value = -math.inf  # ε = +inf is a valid non-private reply
    m = {k: v for k, v in m.items() if k != key}
    if value is not None:
        m[key] = value
    elif key == "extra":
        m[key] = math.nan
    return _reply(node, a, m)


def _fuzz_budget_flag(draw, a, m, node):
    value = draw(st.integers().filter(lambda v: v not in (0, 1))
                 | st.floats().filter(lambda v: v not in (0, 1))
                 | st.lists(st.integers(0, 1), min_size=1, max_size=2))
    return _reply(node, a, {**m, contract.BUDGET_EXHAUSTED: value})


def _fuzz_norm(draw, a, m, node):
    key, factor = draw(KEYS), draw(st.floats(1e3, 1e30))
    return _reply(node, {**a, key: (a[key] * np.float32(factor)).astype("f4")}, m)


MUTATIONS = [_fuzz_error, _fuzz_records, _fuzz_array_keys, _fuzz_shape, _fuzz_dtype,
             _fuzz_nonfinite, _fuzz_encoding, _fuzz_num_examples, _fuzz_metrics,
             _fuzz_budget_flag, _fuzz_norm]


def test_fuzz_no_malformed_reply_raises_or_is_aggregated():
    seen: list[str] = []

    @settings(max_examples=1000, deadline=None)
    @given(data=st.data(), num_good=st.integers(1, 3), seed=st.integers(0, 2**16),
           mutate=st.sampled_from(MUTATIONS))
    def check(data, num_good, seed, mutate):
        # Prepare: good replies from nodes 1..num_good, one malformed from node 99
        good = [_good_reply(node, seed=seed + node, n=10 * node) for node in
                range(1, num_good + 1)]
        bad = mutate(data.draw, _good_arrays(seed), _good_metrics(50), 99)
        replies = list(good)
        replies.insert(data.draw(st.integers(0, num_good)), bad)
        strategy, reference = _strategy(), _strategy()
        # Execute
        screening = strategy.validator(strategy._global, 1).screen(replies)
        arrays, metrics = strategy.aggregate_train(1, replies)
        want_arrays, want_metrics = reference.aggregate_train(1, good)
        # Assert: the bad reply is rejected; the aggregate is that of the good ones alone
        assert screening.valid == good
        assert [r.node_id for r in screening.rejected] == [99]
        got, want = arrays.to_torch_state_dict(), want_arrays.to_torch_state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert metrics["replies-rejected"] + metrics["replies-failed"] == 1
        for key in (contract.TRAIN_LOSS, "epsilon-mean", "epsilon-max", contract.NUM_EXAMPLES,
                    "clients-trained"):
            assert metrics[key] == want_metrics[key]
        seen.append(mutate.__name__)

    check()
    assert len(seen) >= 1000 and set(seen) == {f.__name__ for f in MUTATIONS}


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("strategy.max-norm-ratio", 0.5, "must be 0 (off), >= 1, or inf (off)"),
    ("strategy.max-norm-ratio", "nan", "must be 0 (off), >= 1, or inf (off)"),
])
def test_config_rejects_bad_screening_settings(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        AppConfig.from_run_config({key: value})
    assert f"{key}={float(value) if 'ratio' in key else value!r}: {allowed}" in str(info.value)


def test_config_screening_defaults_and_inf():
    cfg = AppConfig.from_run_config({"strategy.max-norm-ratio": "inf"})
    assert cfg.strategy.max_norm_ratio == math.inf
    assert AppConfig().strategy.max_norm_ratio == 10.0


def test_a_group_too_small_for_the_direction_screen_is_not_screened_by_direction():
    # Two honest noise vectors of 16 numbers have a cosine below -0.5 about 2 % of the time
    # (merge-sv's σ of a small model): such a group is left to the norm screen.
    spec = {"m.lora_S": ArraySpec((16,), "float32")}
    sent = {"m.lora_S": np.ones(16, dtype=np.float32)}
    assert not enough_numbers(16, -0.5)
    assert enough_numbers(64, -0.5)  # 64 numbers: the bar is 4 noise s.d.
    # a flipped update of 16 numbers is not judged by direction (nor as a twin)
    rng = np.random.default_rng(0)
    replies = [_reply(n, {"m.lora_S": (1 + rng.normal(size=16)).astype(np.float32)},
                      _good_metrics(10 * n)) for n in (1, 2)]
    replies.append(_reply(3, {"m.lora_S": (1 - 3 * rng.normal(size=16)).astype(np.float32)},
                          _good_metrics(30)))
    assert ReplyValidator(spec, sent=sent, min_update_cosine=-0.5).screen(replies).rejected == []


BIAS = contract.head_key("classifier.bias")
HEAD_SPECS = {B1: ArraySpec((8, 8), "float32"), HEAD: ArraySpec((3, 64), "float32"),
              BIAS: ArraySpec((3,), "float32")}


def _noise_reply(node: int, *, bias_scale: float = 1.0) -> Message:
    """A DP-like reply: Gaussian updates (from 0) of every array of HEAD_SPECS."""
    rng = np.random.default_rng(node)
    arrays = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in HEAD_SPECS.items()}
    arrays[BIAS] = (bias_scale * arrays[BIAS]).astype(np.float32)
    return _reply(node, arrays, _good_metrics(10 * node))


def test_an_array_too_small_to_judge_alone_is_judged_within_its_group():
    # Two honest noise updates of a 3-class head's bias (3 numbers) differ in norm by 10 x with
    # p = 0.3 % (CI once rejected an honest client so); the head's weight sets the yardstick.
    validator = ReplyValidator(HEAD_SPECS)
    assert not judged_alone(3, 10.0) and judged_alone(3 * 64, 10.0)
    honest = [_noise_reply(1), _noise_reply(2, bias_scale=30.0)]
    assert validator.screen(honest).rejected == []
    # A blow-up of the small array still moves its group past the bar
    blown = validator.screen([_noise_reply(1), _noise_reply(2), _noise_reply(3, bias_scale=1e4)])
    [rejection] = blown.rejected
    assert rejection.node_id == 3
    assert rejection.reason.startswith("the head (all arrays together) changes by")


@pytest.mark.parametrize(("ratio", "smallest"), [(10.0, 6), (3.0, 17), (2.0, 37)])
def test_arrays_are_judged_alone_from_the_size_where_noise_rarely_passes_the_ratio(ratio,
                                                                                   smallest):
    assert not judged_alone(smallest - 1, ratio) and judged_alone(smallest, ratio)


def test_the_norm_ratio_of_two_noise_vectors_follows_the_f_distribution_the_bar_uses():
    # ‖x‖² / ‖y‖² of two independent N(0, I_d) vectors is F(d, d): checked by sampling at
    # d = 3 (a 3-class head's bias), where passing 10 x is common enough to count
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 1_000_000, 3))
    passed = np.mean(np.linalg.norm(x, axis=1) > 10 * np.linalg.norm(y, axis=1))
    expected = stats.f.sf(100, 3, 3)  # 0.00167
    assert abs(passed - expected) < 4 * math.sqrt(expected / 1_000_000)


def test_a_rejection_names_the_node_the_instruction_went_to():
    """The SuperLink's own error reply (node offline, instruction expired) comes from another
    node id; the rejection names the node that was asked."""
    instruction = _instruction(7)
    instruction.metadata.__dict__["_message_id"] = "instruction-to-7"  # a grid sets it on push
    reply = Message(Error(code=3, reason="Node unavailable"), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink sends it
    validator = _strategy().validator(_strategy()._global, 1)
    assert [r.node_id for r in validator.screen([reply]).rejected] == [1]
    [rejection] = validator.screen([reply], asked={"instruction-to-7": 7}).rejected
    assert rejection.node_id == 7 and rejection.failed
