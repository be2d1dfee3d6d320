import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import contract
from strategies import FedSVD
from tests.helpers import FakeGrid

MODULES = ["enc.0.query", "enc.0.value", "enc.1.query"]
SHAPES = {"enc.0.query": (12, 10), "enc.0.value": (12, 10), "enc.1.query": (6, 9)}  # (m, n)
R = 3


def global_state(rng) -> dict[str, torch.Tensor]:
    state = {}
    for m in MODULES:
        rows, cols = SHAPES[m]
        state[contract.lora_key(m, "A")] = torch.tensor(rng.normal(size=(R, cols)),
                                                        dtype=torch.float32)
        state[contract.lora_key(m, "B")] = torch.zeros(rows, R)
    state[contract.head_key("classifier.weight")] = torch.zeros(4, 5)
    return state


def train_reply(rng, n: int, exhausted: int = 0) -> tuple[Message, dict]:
    arrays = {contract.lora_key(m, "B"): torch.tensor(rng.normal(size=(SHAPES[m][0], R)),
                                                      dtype=torch.float32) for m in MODULES}
    arrays[contract.head_key("classifier.weight")] = torch.tensor(rng.normal(size=(4, 5)),
                                                                  dtype=torch.float32)
    metrics = MetricRecord({contract.NUM_EXAMPLES: n, contract.TRAIN_LOSS: 1.0,
                            contract.EPSILON: 2.0 + n / 100, contract.NOISE_MULTIPLIER: 0.9,
                            contract.BUDGET_EXHAUSTED: exhausted})
    content = RecordDict({contract.ARRAYS: ArrayRecord(torch_state_dict=arrays),
                          contract.METRICS: metrics})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN), arrays


def _run_round(svd_period: int, server_round: int = 1):
    rng = np.random.default_rng(0)
    state = global_state(rng)
    # 2 valid replies (the exhausted one is not) make an update with min_train_nodes=2
    # (no bounded weights or updates: the test checks FedSVD's algebra on the plain mean)
    strategy = FedSVD(MODULES, svd_period=svd_period, fraction_train=1.0, min_train_nodes=2,
                      min_available_nodes=3, max_weight_ratio=0.0, bound_updates=False)
    messages = list(strategy.configure_train(server_round, ArrayRecord(torch_state_dict=state),
                                             ConfigRecord(), FakeGrid(3)))
    assert all(m.content[contract.CONFIG][contract.TRAIN_FACTORS] == "B" for m in messages)
    replies = [train_reply(rng, 30), train_reply(rng, 90), train_reply(rng, 500, exhausted=1)]
    arrays, metrics = strategy.aggregate_train(server_round, [m for m, _ in replies])
    return state, [a for _, a in replies], arrays.to_torch_state_dict(), metrics, messages


def test_fedsvd_refactorizes_the_weighted_mean_of_b_times_previous_a():
    # Prepare / Execute
    state, sent, new, metrics, messages = _run_round(svd_period=1)
    # Assert: B'A' = (0.25 B_1 + 0.75 B_2) A_prev, A' has orthonormal rows, exhausted excluded
    for m in MODULES:
        a_key, b_key = contract.lora_key(m, "A"), contract.lora_key(m, "B")
        b_mean = 0.25 * sent[0][b_key].double() + 0.75 * sent[1][b_key].double()
        target = b_mean @ state[a_key].double()
        got = new[b_key].double() @ new[a_key].double()
        assert torch.linalg.norm(got - target) / torch.linalg.norm(target) < 1e-5
        gram = new[a_key].double() @ new[a_key].double().T
        assert torch.allclose(gram, torch.eye(R, dtype=torch.float64), atol=1e-5)
        sv = torch.linalg.svdvals(target)[:R]
        assert torch.allclose(torch.linalg.norm(new[b_key].double(), dim=0), sv, rtol=1e-4)
    head = contract.head_key("classifier.weight")
    expected_head = 0.25 * sent[0][head] + 0.75 * sent[1][head]
    assert torch.allclose(new[head], expected_head, atol=1e-6)
    assert metrics["clients-exhausted"] == 1 and metrics["clients-trained"] == 2
    assert metrics["epsilon-max"] == pytest.approx(2.9)
    assert metrics["bytes-down"] == sum(m.content[contract.ARRAYS].count_bytes() for m in messages)
    assert metrics["bytes-up"] == 3 * ArrayRecord(torch_state_dict=sent[0]).count_bytes()


def test_between_svd_rounds_b_is_averaged_and_a_kept():
    state, sent, new, _, _ = _run_round(svd_period=2, server_round=1)
    for m in MODULES:
        a_key, b_key = contract.lora_key(m, "A"), contract.lora_key(m, "B")
        assert torch.equal(new[a_key], state[a_key])
        assert torch.allclose(new[b_key], 0.25 * sent[0][b_key] + 0.75 * sent[1][b_key],
                              atol=1e-6)


def test_round_with_only_exhausted_clients_keeps_the_global_adapter():
    rng = np.random.default_rng(1)
    strategy = FedSVD(MODULES, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    list(strategy.configure_train(1, ArrayRecord(torch_state_dict=global_state(rng)),
                                  ConfigRecord(), FakeGrid(1)))
    arrays, metrics = strategy.aggregate_train(1, [train_reply(rng, 10, exhausted=1)[0]])
    assert arrays is None and metrics is None


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="svd_period=0"):
        FedSVD(MODULES, svd_period=0)
    with pytest.raises(ValueError, match="lora_modules is empty"):
        FedSVD([])
