"""Sending only what changed: the same global arrays as the whole state, for fewer bytes."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import Error as FlowerError
from hypothesis import given, settings
from hypothesis import strategies as st

from client.received_state import HELD_STATE, StateMismatch, apply_changes, received_state
from common import contract
from kernels import refactorize
from kernels.rotation import rotate_rows, rotation_between
from strategies import FedSVD
from strategies.broadcast import ChangesBroadcast, FullBroadcast
from strategies.merge_sv import MergeSV
from tests.helpers import FakeGrid

MODULES = ["enc.0.query", "enc.0.value", "enc.1.query"]
SHAPES = {"enc.0.query": (12, 10), "enc.0.value": (12, 10), "enc.1.query": (6, 9)}  # (m, n)
R = 3
HEAD = contract.head_key("classifier.weight")


# --- the kernel -----------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), r=st.integers(1, 6), n=st.integers(1, 20), seed=st.integers(0, 99))
def test_rotate_rows_is_the_product_and_the_same_bits_for_any_thread_count(L, r, n, seed):
    g = torch.Generator().manual_seed(seed)
    T, A = torch.randn(L, r, r, generator=g), torch.randn(L, r, n, generator=g)
    out = rotate_rows(T, A)
    assert out.dtype == torch.float32 and out.shape == (L, r, n)
    assert torch.allclose(out.double(), T.double() @ A.double(), rtol=1e-6, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = rotate_rows(T, A)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, out)


def test_a_fedsvd_a_is_a_map_of_the_previous_a_and_a_fresh_one_is_not():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 8, 64, generator=g) / 8  # LoRA's A: full row rank, not orthonormal
    _, A_new = refactorize(torch.randn(4, 32, 8, generator=g), A)
    T, residual = rotation_between(A_new, A)
    assert float(residual.max()) < 1e-6
    snapped = rotate_rows(T, A)
    assert torch.allclose(snapped, A_new, atol=1e-6)
    gram = snapped.double() @ snapped.double().transpose(1, 2)
    assert torch.allclose(gram, torch.eye(8, dtype=torch.float64).expand_as(gram), atol=1e-6)
    _, residual = rotation_between(torch.randn(4, 8, 64, generator=g), A)
    assert float(residual.min()) > 0.5


# --- a federation of fake clients -----------------------------------------------------------------

def _initial_state(rng, shapes, r, head) -> dict[str, torch.Tensor]:
    state = {}
    for m, (rows, cols) in shapes.items():
        state[contract.lora_key(m, "A")] = torch.tensor(rng.normal(size=(r, cols)) / cols,
                                                        dtype=torch.float32)
        state[contract.lora_key(m, "B")] = torch.zeros(rows, r)
    state[HEAD] = torch.tensor(rng.normal(size=head), dtype=torch.float32)
    return state


def _reply(msg: Message, state: ArrayRecord, server_round: int, *, train_head: bool) -> Message:
    """A deterministic 'training' of B (and the head): what node and round alone decide."""
    g = torch.Generator().manual_seed(1000 * server_round + msg.metadata.dst_node_id)
    tensors = state.to_torch_state_dict()
    arrays = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in tensors.items()
              if k.endswith(".lora_B") or (train_head and contract.is_head_key(k))}
    metrics = MetricRecord({contract.NUM_EXAMPLES: 10 * msg.metadata.dst_node_id,
                            contract.TRAIN_LOSS: 1.0, contract.EPSILON: 1.0,
                            contract.NOISE_MULTIPLIER: 1.0, contract.BUDGET_EXHAUSTED: 0})
    return Message(RecordDict({contract.ARRAYS: ArrayRecord(torch_state_dict=arrays),
                               contract.METRICS: metrics}), reply_to=msg)


def _federation(broadcast, rounds: int, *, nodes: int = 3, train_head: bool = True,
                sampled=None, failing=(), shapes=None, r=R, head=(4, 5)):
    """Run ``rounds`` rounds; return the global states and every round's messages.

    ``sampled(round) -> node ids`` are the nodes online in a round (default: all), all of which
    the strategy samples; nodes in ``failing`` (round, node) reply with an error. Each node
    keeps its own Context and rebuilds the state of every message it gets, which must equal the
    server's to the bit.
    """
    rng = np.random.default_rng(0)
    shapes = shapes or SHAPES
    strategy = FedSVD(list(shapes), train_head=train_head, fraction_train=1.0, min_train_nodes=1,
                      min_available_nodes=1, max_norm_ratio=0, broadcast=broadcast)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                for n in range(1, nodes + 1)}
    arrays = ArrayRecord(torch_state_dict=_initial_state(rng, shapes, r, head))
    states, sent = [arrays], []
    for server_round in range(1, rounds + 1):
        online = sampled(server_round) if sampled else range(1, nodes + 1)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                 OnlineGrid(online)))
        assert {m.metadata.dst_node_id for m in messages} == set(online)
        sent.append(messages)
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if (server_round, node) in failing:
                replies.append(Message(FlowerError(code=0, reason="client crashed"),
                                       reply_to=msg))
                continue
            state = received_state(msg.content, contexts[node])
            assert contract.state_digest(state) == contract.state_digest(arrays)
            replies.append(_reply(msg, state, server_round, train_head=train_head))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        states.append(arrays)
    return strategy, states, sent, contexts


class OnlineGrid(FakeGrid):
    """A grid whose online nodes are the given ids."""

    def __init__(self, online) -> None:
        self.online = list(online)

    def get_node_ids(self) -> list[int]:
        return self.online


def _bytes(messages) -> int:
    return sum(m.content[contract.ARRAYS].count_bytes() for m in messages)


@pytest.mark.parametrize("train_head", [True, False])
def test_changes_and_whole_state_give_the_same_global_arrays_over_three_rounds(train_head):
    _, full_states, full_sent, _ = _federation(FullBroadcast(), 3, train_head=train_head)
    strategy, states, sent, _ = _federation(ChangesBroadcast(MODULES), 3, train_head=train_head)
    for ours, theirs in zip(states, full_states, strict=True):
        ours, theirs = ours.to_torch_state_dict(), theirs.to_torch_state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:  # A snapped to rotate_rows(T, A_prev): float32 rounding apart
            assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6), key
    # Round 1: the whole state to everyone; then B (+ a trained head) and the maps of A
    assert _bytes(sent[0]) == _bytes(full_sent[0])
    for messages in sent[1:]:
        for msg in messages:
            keys = set(msg.content[contract.ARRAYS].keys())
            expected = {contract.lora_key(m, "B") for m in MODULES} | \
                {contract.rotation_key(m) for m in MODULES} | ({HEAD} if train_head else set())
            assert keys == expected
            assert msg.content[contract.CONFIG][contract.BROADCAST_BASE]
        assert _bytes(messages) < _bytes(full_sent[1])
    assert strategy.training_metrics.of(2)["bytes-down"] == _bytes(sent[1])


@pytest.mark.parametrize("train_head", [True, False])
def test_the_default_layout_downloads_at_most_six_tenths_of_the_whole_state(train_head):
    # all-MiniLM-L6-v2 with LoRA r = 8 on query and value: 12 layers 384 × 384, 20 classes
    shapes = {f"layer.{i}.{w}": (384, 384) for i in range(6) for w in ("query", "value")}
    kwargs = dict(train_head=train_head, shapes=shapes, r=8, head=(20, 384))
    _, _, full_sent, _ = _federation(FullBroadcast(), 2, **kwargs)
    _, _, sent, _ = _federation(ChangesBroadcast(list(shapes)), 2, **kwargs)
    ratio = _bytes(sent[1]) / _bytes(full_sent[1])
    assert ratio <= (0.6 if train_head else 0.5), ratio


def test_a_node_that_missed_rounds_gets_every_map_since_in_order():
    def sampled(server_round):  # node 3 sits out rounds 2 and 3
        return (1, 2) if server_round in (2, 3) else (1, 2, 3)

    _, _, sent, _ = _federation(ChangesBroadcast(MODULES), 4, sampled=sampled)
    late = next(m for m in sent[3] if m.metadata.dst_node_id == 3)
    maps = late.content[contract.ARRAYS][contract.rotation_key(MODULES[0])].numpy()
    assert maps.shape == (3, R, R)  # rounds 1, 2 and 3 each turned A
    on_time = next(m for m in sent[3] if m.metadata.dst_node_id == 1)
    assert on_time.content[contract.ARRAYS][contract.rotation_key(MODULES[0])].shape == (1, R, R)


def test_a_node_whose_reply_failed_gets_the_whole_state_next_round():
    _, _, sent, _ = _federation(ChangesBroadcast(MODULES), 3, failing={(2, 2)})
    by_node = {m.metadata.dst_node_id: m for m in sent[2]}
    assert contract.BROADCAST_BASE not in by_node[2].content[contract.CONFIG]
    assert contract.lora_key(MODULES[0], "A") in by_node[2].content[contract.ARRAYS]
    assert contract.BROADCAST_BASE in by_node[1].content[contract.CONFIG]


def test_a_node_that_lacks_the_base_or_rebuilds_another_state_refuses_the_round():
    _, states, sent, contexts = _federation(ChangesBroadcast(MODULES), 2)
    partial = sent[1][0]
    stranger = Context(run_id=1, node_id=9, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(StateMismatch, match="holds state none"):
        received_state(partial.content, stranger)
    config = ConfigRecord({**partial.content[contract.CONFIG],
                           contract.BROADCAST_DIGEST: "0" * 64})
    node = contexts[partial.metadata.dst_node_id]
    node.state.array_records[HELD_STATE] = states[0]  # the base the message was made for
    tampered = RecordDict({contract.ARRAYS: partial.content[contract.ARRAYS],
                           contract.CONFIG: config})
    with pytest.raises(StateMismatch, match="the rebuilt global state has digest"):
        received_state(tampered, node)
    with pytest.raises(StateMismatch, match="lacks"):
        apply_changes(ArrayRecord(), partial.content[contract.ARRAYS])


def test_merge_sv_sends_u_and_v_once():
    rng = np.random.default_rng(1)
    state = {}
    for m in MODULES:
        rows, cols = SHAPES[m]
        q_u, _ = np.linalg.qr(rng.normal(size=(rows, R)))
        q_v, _ = np.linalg.qr(rng.normal(size=(cols, R)))
        state[contract.lora_key(m, "B")] = torch.tensor(q_u, dtype=torch.float32)
        state[contract.lora_key(m, "A")] = torch.tensor(q_v.T, dtype=torch.float32)
        state[contract.lora_key(m, "S")] = torch.ones(R)
    strategy = MergeSV(MODULES, train_head=False, fraction_train=1.0, min_train_nodes=2,
                       min_available_nodes=2, max_norm_ratio=0,
                       broadcast=ChangesBroadcast(MODULES))
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                for n in (1, 2)}
    arrays = ArrayRecord(torch_state_dict=state)
    for server_round in (1, 2, 3):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                 FakeGrid(2)))
        if server_round > 1:
            for msg in messages:
                assert set(msg.content[contract.ARRAYS].keys()) == \
                    {contract.lora_key(m, "S") for m in MODULES}
        replies = []
        for msg in messages:
            held = received_state(msg.content, contexts[msg.metadata.dst_node_id])
            assert contract.state_digest(held) == contract.state_digest(arrays)
            sigma = {contract.lora_key(m, "S"): held[contract.lora_key(m, "S")].numpy() * 1.1
                     for m in MODULES}
            metrics = MetricRecord({contract.NUM_EXAMPLES: 10, contract.TRAIN_LOSS: 1.0,
                                    contract.EPSILON: 1.0, contract.NOISE_MULTIPLIER: 1.0,
                                    contract.BUDGET_EXHAUSTED: 0})
            replies.append(Message(RecordDict({
                contract.ARRAYS: ArrayRecord({k: _array(v) for k, v in sigma.items()}),
                contract.METRICS: metrics}), reply_to=msg))
        arrays, _ = strategy.aggregate_train(server_round, replies)


def _array(values: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(values, dtype=np.float32))
