"""Baseline strategies (FFA-LoRA, FedAvg-LoRA, FLoRA, FedEx-LoRA, RoLoRA) and merge-sv on fake
replies.

Each test builds a global state and client replies by hand, runs one round of the strategy
without a Flower runtime, and checks the new global state against the method's formula,
computed densely in float64.
"""

import tomllib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import flatten_dict

from common import contract
from common.config import AppConfig
from common.methods import FROM_SCRATCH, METHODS
from kernels import stacked_product
from strategies import FedAvgLoRA, FedExLoRA, FedSVD, FFALoRA, FLoRA, MergeSV, RoLoRA
from strategies.registry import build_strategy, strategy_class
from strategies.server_optimizer import ServerOptimizer
from tests.conftest import ROOT, default_run_config
from tests.helpers import FakeGrid

MODULES = ["enc.0.query", "enc.1.value"]
SHAPES = {"enc.0.query": (7, 5), "enc.1.value": (4, 6)}  # (d_out, d_in)
R, SCALE = 3, 2.0
HEAD = contract.head_key("classifier.weight")
N = (30, 90)  # num-examples of the two replies: p = (0.25, 0.75)
P = np.array(N, dtype=np.float64) / sum(N)


def a_key(m):
    return contract.lora_key(m, "A")


def b_key(m):
    return contract.lora_key(m, "B")


def s_key(m):
    return contract.lora_key(m, "S")


def _tensor(rng, shape) -> torch.Tensor:
    return torch.tensor(rng.normal(size=shape), dtype=torch.float32)


def _global(rng, *, base: bool = False, svd: bool = False) -> dict[str, torch.Tensor]:
    """A and B non-zero (as after some rounds), a head, optionally a ΔW or a σ per layer."""
    state = {}
    for m, (rows, cols) in SHAPES.items():
        state[a_key(m)] = _tensor(rng, (R, cols))
        state[b_key(m)] = _tensor(rng, (rows, R))
        if base:
            state[contract.base_key(m)] = _tensor(rng, (rows, cols))
        if svd:
            state[s_key(m)] = _tensor(rng, (R,))
    state[HEAD] = _tensor(rng, (2, 3))
    return state


def _client_arrays(rng, factors: str) -> dict[str, torch.Tensor]:
    arrays = {HEAD: _tensor(rng, (2, 3))}
    for m, (rows, cols) in SHAPES.items():
        if "A" in factors:
            arrays[a_key(m)] = _tensor(rng, (R, cols))
        if "B" in factors:
            arrays[b_key(m)] = _tensor(rng, (rows, R))
        if "S" in factors:
            arrays[s_key(m)] = _tensor(rng, (R,))
    return arrays


def _reply(node: int, arrays: dict, n: int) -> Message:
    metrics = MetricRecord({contract.NUM_EXAMPLES: n, contract.TRAIN_LOSS: 1.0,
                            contract.EPSILON: 2.0, contract.NOISE_MULTIPLIER: 0.9,
                            contract.BUDGET_EXHAUSTED: 0})
    content = RecordDict({contract.ARRAYS: ArrayRecord(torch_state_dict=arrays),
                          contract.METRICS: metrics})
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def _make(cls, **kwargs):
    # The replies here are random arrays, unrelated to the state sent (heads of 6 numbers): the
    # direction screen would rightly call some of them opposed; these tests check the math of
    # each method's mean, so the weights and updates are not bounded either.
    kwargs.setdefault("min_update_cosine", -1.0)
    kwargs.setdefault("max_weight_ratio", 0.0)
    kwargs.setdefault("bound_updates", False)
    if cls in (FLoRA, FedExLoRA):
        kwargs.setdefault("lora_scale", SCALE)
    return cls(MODULES, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, **kwargs)


def _round(strategy, state, server_round=1, sent=None, seed=1):
    """configure_train + aggregate_train with two replies; return what a test checks."""
    messages = list(strategy.configure_train(server_round, ArrayRecord(torch_state_dict=state),
                                             ConfigRecord(), FakeGrid(2)))
    factors = messages[0].content[contract.CONFIG][contract.TRAIN_FACTORS]
    rng = np.random.default_rng(seed)
    sent = sent or [_client_arrays(rng, factors) for _ in N]
    replies = [_reply(k + 1, arrays, n) for k, (arrays, n) in enumerate(zip(sent, N, strict=True))]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return SimpleNamespace(factors=factors, sent=sent, new=arrays.to_torch_state_dict(),
                           metrics=metrics, messages=messages, replies=replies)


def _mean(sent, key) -> torch.Tensor:
    return sum(float(p) * s[key].double() for p, s in zip(P, sent, strict=True))


def _exact_update(sent, m) -> torch.Tensor:
    """s Σ_k p_k B_k A_k, densely in float64."""
    return SCALE * sum(float(p) * s[b_key(m)].double() @ s[a_key(m)].double()
                       for p, s in zip(P, sent, strict=True))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


def test_ffa_keeps_a_and_averages_b():
    # Prepare
    state = _global(np.random.default_rng(0))
    # Execute
    out = _round(_make(FFALoRA), state)
    # Assert
    assert out.factors == "B"
    for m in MODULES:
        assert torch.equal(out.new[a_key(m)], state[a_key(m)])
        assert torch.allclose(out.new[b_key(m)].double(), _mean(out.sent, b_key(m)), atol=1e-6)
    assert torch.allclose(out.new[HEAD].double(), _mean(out.sent, HEAD), atol=1e-6)
    assert not any(contract.is_base_key(k) for k in out.new)


def test_fedavg_averages_a_and_b_separately():
    state = _global(np.random.default_rng(0))
    out = _round(_make(FedAvgLoRA), state)
    assert out.factors == "A,B"
    for m in MODULES:
        for key in (a_key(m), b_key(m)):
            assert torch.allclose(out.new[key].double(), _mean(out.sent, key), atol=1e-6)
    assert set(out.new) == set(state)


@pytest.mark.parametrize("with_base", [False, True])
def test_flora_folds_the_stacked_product_into_the_base_and_restarts_lora(with_base):
    # Prepare: with_base: ΔW of earlier rounds is already in the global state
    state = _global(np.random.default_rng(0), base=with_base)
    # Execute
    out = _round(_make(FLoRA, seed=5), state, server_round=3)
    # Assert: ΔW_new − ΔW_old = s Σ p_k B_k A_k; B = 0; A fresh, peft's init range
    assert out.factors == "A,B"
    for m, (rows, cols) in SHAPES.items():
        old = state[contract.base_key(m)].double() if with_base else torch.zeros(rows, cols)
        delta = out.new[contract.base_key(m)].double() - old
        assert _rel(delta, _exact_update(out.sent, m)) < 1e-6
        assert out.new[contract.base_key(m)].dtype == torch.float32
        assert torch.equal(out.new[b_key(m)], torch.zeros(rows, R))
        new_a = out.new[a_key(m)]
        assert new_a.shape == (R, cols) and new_a.dtype == torch.float32
        assert not torch.equal(new_a, state[a_key(m)])
        assert all(not torch.equal(new_a, s[a_key(m)]) for s in out.sent)
        assert float(new_a.abs().max()) <= cols ** -0.5
    assert torch.allclose(out.new[HEAD].double(), _mean(out.sent, HEAD), atol=1e-6)


def test_flora_fresh_a_is_seeded_by_seed_and_round():
    state = _global(np.random.default_rng(0))
    first = _round(_make(FLoRA, seed=5), state, server_round=3).new
    again = _round(_make(FLoRA, seed=5), state, server_round=3, seed=9).new
    next_round = _round(_make(FLoRA, seed=5), state, server_round=4).new
    other_seed = _round(_make(FLoRA, seed=6), state, server_round=3).new
    for m in MODULES:
        assert torch.equal(first[a_key(m)], again[a_key(m)])  # whatever the clients sent
        assert not torch.equal(first[a_key(m)], next_round[a_key(m)])
        assert not torch.equal(first[a_key(m)], other_seed[a_key(m)])


@pytest.mark.parametrize("with_base", [False, True])
def test_fedex_residual_makes_the_global_update_exact(with_base):
    # Prepare
    state = _global(np.random.default_rng(0), base=with_base)
    # Execute
    out = _round(_make(FedExLoRA), state)
    # Assert: (ΔW_new − ΔW_old) + s B̄ Ā = s Σ p_k B_k A_k, with B̄, Ā the weighted means
    assert out.factors == "A,B"
    for m, (rows, cols) in SHAPES.items():
        B, A = out.new[b_key(m)].double(), out.new[a_key(m)].double()
        assert torch.allclose(B, _mean(out.sent, b_key(m)), atol=1e-6)
        assert torch.allclose(A, _mean(out.sent, a_key(m)), atol=1e-6)
        old = state[contract.base_key(m)].double() if with_base else torch.zeros(rows, cols)
        delta = out.new[contract.base_key(m)].double() - old
        exact = _exact_update(out.sent, m)
        assert _rel(delta + SCALE * B @ A, exact) < 1e-6
        assert _rel(SCALE * B @ A, exact) > 1e-3  # without the residual it would be inexact


def test_rolora_alternates_b_then_a_and_changes_only_that_factor():
    # Prepare
    strategy = _make(RoLoRA)
    state = _global(np.random.default_rng(0))
    # Execute: round 1, then round 2 from round 1's result
    first = _round(strategy, state, server_round=1)
    second = _round(strategy, first.new, server_round=2)
    # Assert
    assert (first.factors, second.factors) == ("B", "A")
    for m in MODULES:
        assert torch.equal(first.new[a_key(m)], state[a_key(m)])
        assert torch.allclose(first.new[b_key(m)].double(), _mean(first.sent, b_key(m)),
                              atol=1e-6)
        assert torch.equal(second.new[b_key(m)], first.new[b_key(m)])
        assert torch.allclose(second.new[a_key(m)].double(), _mean(second.sent, a_key(m)),
                              atol=1e-6)
    assert [_make(RoLoRA).train_factors(r) for r in range(1, 6)] == [
        ("B",), ("A",), ("B",), ("A",), ("B",)]


# --- every method: the factors asked for, the validator, bytes ---------------------------------

ALL = {"fedsvd": (FedSVD, ["B", "B"]), "ffa": (FFALoRA, ["B", "B"]),
       "fedavg": (FedAvgLoRA, ["A,B", "A,B"]), "flora": (FLoRA, ["A,B", "A,B"]),
       "fedex": (FedExLoRA, ["A,B", "A,B"]), "rolora": (RoLoRA, ["B", "A"]),
       "merge-sv": (MergeSV, ["S", "S"])}
WRONG = {"B": "A", "A": "B", "A,B": "B", "S": "B"}


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_strategy_asks_for_its_factors_and_rejects_the_wrong_one(name):
    cls, factors = ALL[name]
    for server_round, want in enumerate(factors, start=1):
        # Prepare: one reply with the factors asked for, one with the wrong factor(s)
        strategy = _make(cls)
        state = _global(np.random.default_rng(server_round), svd=cls is MergeSV)
        messages = list(strategy.configure_train(
            server_round, ArrayRecord(torch_state_dict=state), ConfigRecord(), FakeGrid(2)))
        rng = np.random.default_rng(0)
        good = _reply(1, _client_arrays(rng, want), 10)
        wrong = _reply(2, _client_arrays(rng, WRONG[want]), 10)
        # Execute
        screening = strategy.validator(strategy._global, server_round).screen([good, wrong])
        # Assert
        assert [m.content[contract.CONFIG][contract.TRAIN_FACTORS] for m in messages] == [want] * 2
        assert screening.valid == [good]
        [rejection] = screening.rejected
        assert rejection.node_id == 2 and rejection.reason.startswith("array(s) missing")


@pytest.mark.parametrize("name", sorted(ALL))
def test_bytes_are_those_of_the_arrays_sent_and_received(name):
    # Prepare: a state with ΔW for the methods that keep one (it is broadcast)
    cls, _ = ALL[name]
    state = _global(np.random.default_rng(0), base=cls in (FLoRA, FedExLoRA),
                    svd=cls is MergeSV)
    # Execute
    out = _round(_make(cls), state)
    # Assert
    down = sum(m.content[contract.ARRAYS].count_bytes() for m in out.messages)
    assert down == 2 * ArrayRecord(torch_state_dict=state).count_bytes()
    assert out.metrics["bytes-down"] == down
    assert out.metrics["bytes-up"] == sum(m.content[contract.ARRAYS].count_bytes()
                                          for m in out.replies)
    lora_only = {k: v for k, v in state.items() if not contract.is_base_key(k)}
    if cls in (FLoRA, FedExLoRA):
        assert down > 2 * ArrayRecord(torch_state_dict=lora_only).count_bytes()
        assert all(contract.base_key(m) in out.new for m in MODULES)  # sent next round


def test_registry_covers_every_configured_name_and_passes_the_lora_scale():
    assert set(METHODS) == set(ALL)
    layout = SimpleNamespace(modules=MODULES, scale=SCALE)
    for name in METHODS:
        merged = {"strategy.merged-adapter": "merged/", "strategy.server-optimizer": "none"} \
            if name not in FROM_SCRATCH else {}
        cfg = AppConfig.from_run_config({"strategy.name": name, "strategy.svd-period": 2,
                                         "seed": 4, **merged})
        strategy = build_strategy(cfg, layout)
        assert type(strategy) is strategy_class(name) is ALL[name][0]
        assert strategy.lora_modules == MODULES
    assert build_strategy(AppConfig.from_run_config({"strategy.name": "flora", "seed": 4}),
                          layout).seed == 4
    assert build_strategy(AppConfig.from_run_config({"strategy.name": "fedex"}),
                          layout).lora_scale == SCALE
    assert build_strategy(AppConfig.from_run_config({"strategy.svd-period": 2}),
                          layout).svd_period == 2


@pytest.mark.parametrize("path", sorted((ROOT / "simulations" / "conf").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_experiment_override_builds_a_valid_config(path):
    overrides = flatten_dict(tomllib.loads(path.read_text()))
    cfg = AppConfig.from_run_config({**default_run_config(), **overrides})
    assert cfg.strategy.name in METHODS


def test_stacked_product_equals_the_weighted_sum_of_products():
    rng = np.random.default_rng(3)
    B = torch.tensor(rng.normal(size=(4, 6, 2)), dtype=torch.float32)
    A = torch.tensor(rng.normal(size=(4, 2, 5)), dtype=torch.float32)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    want = sum(w[k] * B[k].double() @ A[k].double() for k in range(4))
    got = stacked_product(B, A, w)
    assert got.dtype == torch.float64 and _rel(got, want) < 1e-12
    with pytest.raises(ValueError, match="expected B"):
        stacked_product(B, A.transpose(1, 2), w)
    with pytest.raises(ValueError, match="expected weights"):
        stacked_product(B, A, w[:3])


def test_merge_sv_averages_sigma_and_keeps_u_and_v():
    # Prepare: a state in SVD form (U, V, σ per layer)
    state = _global(np.random.default_rng(0), svd=True)
    # Execute
    out = _round(_make(MergeSV), state)
    # Assert: σ̄ = Σ p_k σ_k, U and V unchanged, so s U diag(σ̄) Vᵀ = Σ p_k s U diag(σ_k) Vᵀ
    assert out.factors == "S"
    for m in MODULES:
        assert torch.equal(out.new[a_key(m)], state[a_key(m)])
        assert torch.equal(out.new[b_key(m)], state[b_key(m)])
        assert torch.allclose(out.new[s_key(m)].double(), _mean(out.sent, s_key(m)), atol=1e-6)
        U, V = state[b_key(m)].double(), state[a_key(m)].double()
        got = U @ torch.diag(out.new[s_key(m)].double()) @ V
        want = sum(float(p) * U @ torch.diag(s[s_key(m)].double()) @ V
                   for p, s in zip(P, out.sent, strict=True))
        assert _rel(got, want) <= 1e-6
    assert torch.allclose(out.new[HEAD].double(), _mean(out.sent, HEAD), atol=1e-6)
    # Each upload is R floats per layer (plus the head), far less than B
    assert all(set(a) == {HEAD, *map(s_key, MODULES)} for a in out.sent)


def test_merge_sv_folds_sigma_into_b_then_continues_as_fedsvd():
    # Prepare: σ for one round, then FedSVD
    state = _global(np.random.default_rng(0), svd=True)
    strategy = _make(MergeSV, sv_rounds=1)
    # Execute: round 1 trains σ, round 2 trains B
    first = _round(strategy, state, server_round=1)
    second = _round(strategy, first.new, server_round=2, seed=2)
    # Assert: after round 1 the update is unchanged, now carried by B (σ = 1)
    assert (first.factors, second.factors) == ("S", "B")
    for m in MODULES:
        sigma = _mean(first.sent, s_key(m))
        want = state[b_key(m)].double() @ torch.diag(sigma) @ state[a_key(m)].double()
        got = first.new[b_key(m)].double() @ first.new[a_key(m)].double()
        assert _rel(got, want) <= 1e-6
        assert torch.equal(first.new[s_key(m)], torch.ones(R))
        # Round 2 is FedSVD's: B̄ A_prev refactorized, A orthonormal rows, σ still 1
        A = second.new[a_key(m)].double()
        assert torch.allclose(A @ A.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
        want = _mean(second.sent, b_key(m)) @ first.new[a_key(m)].double()
        assert _rel(second.new[b_key(m)].double() @ A, want) <= 1e-5
        assert torch.equal(second.new[s_key(m)], torch.ones(R))
    with pytest.raises(ValueError, match="sv_rounds=-1"):
        _make(MergeSV, sv_rounds=-1)


def test_merge_sv_with_fedadam_steps_sigma_and_b_starts_its_moments_after_the_fold():
    # Prepare: σ for one round, then FedSVD, under FedAdam
    state = _global(np.random.default_rng(0), svd=True)
    strategy = _make(MergeSV, sv_rounds=1, server_optimizer=ServerOptimizer("adam", 0.03))
    reference = ServerOptimizer("adam", 0.03)  # the same rule, on the arrays by hand
    # Execute
    first = _round(strategy, state, server_round=1)
    second = _round(strategy, first.new, server_round=2, seed=2)
    # Assert: round 1 moved σ by FedAdam's step from σ̄ − σ, not to σ̄; U, V unchanged; the fold
    # carries σ into B exactly
    deltas = {s_key(m): (_mean(first.sent, s_key(m)) - state[s_key(m)].double()).float()
              for m in MODULES} | {HEAD: (_mean(first.sent, HEAD) - state[HEAD].double()).float()}
    steps = reference.step(1, deltas)
    for m in MODULES:
        sigma = state[s_key(m)].double() + steps[s_key(m)].double()
        assert not torch.allclose(sigma, _mean(first.sent, s_key(m)), atol=1e-3)
        want = state[b_key(m)].double() @ torch.diag(sigma) @ state[a_key(m)].double()
        got = first.new[b_key(m)].double() @ first.new[a_key(m)].double()
        assert _rel(got, want) <= 1e-5
        assert torch.equal(first.new[a_key(m)], state[a_key(m)])
        assert torch.equal(first.new[s_key(m)], torch.ones(R))
    head = state[HEAD].double() + steps[HEAD].double()
    torch.testing.assert_close(first.new[HEAD].double(), head)
    # Round 2 is FedSVD's under FedAdam: B's first step, from fresh moments, then the
    # refactorization of B A_prev (A orthonormal rows)
    b_steps = ServerOptimizer("adam", 0.03).step(2, {
        b_key(m): (_mean(second.sent, b_key(m)) - first.new[b_key(m)].double()).float()
        for m in MODULES})
    for m in MODULES:
        B = first.new[b_key(m)].double() + b_steps[b_key(m)].double()
        want = B @ first.new[a_key(m)].double()
        got = second.new[b_key(m)].double() @ second.new[a_key(m)].double()
        assert _rel(got, want) <= 1e-5
        assert torch.equal(second.new[s_key(m)], torch.ones(R))
    assert AppConfig.from_run_config({**default_run_config(), "strategy.name": "merge-sv",
                                      "strategy.merged-adapter": "x",
                                      "strategy.server-optimizer": "adam"}).strategy.svd_form
