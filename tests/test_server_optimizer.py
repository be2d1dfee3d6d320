"""Server optimizers (FedAvgM, FedAdam, FedYogi) on every method, and FedSVD's moment transport.

The rules are checked against Flower's own strategies on the same replies; FedSVD's transport
against FedAvgM run in ΔW coordinates, where no basis ever turns; plain averaging against the
methods as they were before the optimizer existed.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from common import contract
from common.config import AppConfig, ConfigError
from kernels import refactorize
from server import checkpoint as ckpt
from server.resume import prepare_run
from strategies import FedAvgLoRA, FedExLoRA, FedSVD, FFALoRA, FLoRA, RoLoRA
from strategies.registry import build_strategy
from strategies.server_optimizer import ServerOptimizer
from tests.conftest import default_run_config
from tests.test_baselines import (
    HEAD,
    MODULES,
    SCALE,
    N,
    _global,
    _make,
    _mean,
    _reply,
    _round,
    a_key,
    b_key,
)

METHODS = [FedSVD, FFALoRA, FedAvgLoRA, FLoRA, FedExLoRA, RoLoRA]


def _effective(state: dict, m: str) -> torch.Tensor:
    """The layer's ΔW relative to W0: base ΔW (if any) + s B A, float64."""
    w = SCALE * state[b_key(m)].double() @ state[a_key(m)].double()
    base = state.get(contract.base_key(m))
    return w if base is None else w + base.double()


def _run(strategy, state, rounds, seed=1):
    """``rounds`` rounds from ``state``; the states after each, and each round's replies."""
    states, sent = [state], []
    for t in range(1, rounds + 1):
        out = _round(strategy, states[-1], server_round=t, seed=seed + t)
        states.append(out.new)
        sent.append(out.sent)
    return states, sent


# --- plain averaging is today's method --------------------------------------------------------

@pytest.mark.parametrize("cls", METHODS)
def test_none_is_bit_identical_to_the_method_without_an_optimizer(cls):
    state = _global(np.random.default_rng(0))
    plain, _ = _run(_make(cls), state, 3)
    none, _ = _run(_make(cls, server_optimizer=ServerOptimizer("none")), state, 3)
    for a, b in zip(plain, none, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", METHODS)
def test_avgm_with_rate_one_and_no_momentum_follows_plain_averaging(cls):
    # The optimizer's whole path (server_step, product_step, FedSVD's transport) with step = Δ
    # gives today's model, up to float32 rounding.
    state = _global(np.random.default_rng(0))
    plain, _ = _run(_make(cls), state, 3)
    stepped, _ = _run(_make(cls, server_optimizer=ServerOptimizer("avgm", 1.0, 0.0)), state, 3)
    for a, b in zip(plain[1:], stepped[1:], strict=True):
        for m in MODULES:
            assert torch.allclose(_effective(a, m), _effective(b, m), rtol=1e-5, atol=1e-5)
        assert torch.allclose(a[HEAD], b[HEAD], atol=1e-6)


def test_fedsvd_plain_round_is_the_refactorized_mean():
    state = _global(np.random.default_rng(0))
    out = _round(_make(FedSVD, server_optimizer=ServerOptimizer("none")), state)
    for m in MODULES:
        mean_b = _mean(out.sent, b_key(m)).float()
        B, A = refactorize(mean_b[None], state[a_key(m)][None])
        assert torch.allclose(out.new[b_key(m)], B[0], atol=1e-6)
        assert torch.allclose(out.new[a_key(m)], A[0], atol=1e-6)


# --- the rules are Flower's --------------------------------------------------------------------

def _flower(kind):
    common = dict(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                  weighted_by_key=contract.NUM_EXAMPLES, arrayrecord_key=contract.ARRAYS)
    if kind == "avgm":
        return FedAvgM(server_learning_rate=0.7, server_momentum=0.9, **common)
    cls = FedAdam if kind == "adam" else FedYogi
    return cls(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3, **common)


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi"])
def test_each_rule_equals_flowers_strategy_on_the_same_replies(kind):
    # FFA-LoRA trains B and the head in fixed coordinates: Flower's strategy over those arrays
    # must move them exactly as this project's optimizer does, round after round.
    rate = 0.7 if kind == "avgm" else 0.05
    ours = _make(FFALoRA, server_optimizer=ServerOptimizer(kind, rate, 0.9, 0.99, 1e-3))
    flower = _flower(kind)
    state = _global(np.random.default_rng(0))
    trained = [k for k in state if k == HEAD or k.endswith("lora_B")]
    theirs = {k: state[k].numpy() for k in trained}
    for t in range(1, 4):
        out = _round(ours, state, server_round=t, seed=t)
        if kind == "avgm":
            flower.current_arrays = ArrayRecord({k: Array(v) for k, v in theirs.items()})
        else:
            flower.current_arrays = dict(theirs)
        replies = [_reply(k + 1, {key: a[key] for key in trained}, n)
                   for k, (a, n) in enumerate(zip(out.sent, N, strict=True))]
        arrays, _ = flower.aggregate_train(t, replies)
        theirs = {k: np.asarray(arrays[k].numpy(), dtype=np.float32) for k in trained}
        state = out.new
        for k in trained:
            np.testing.assert_allclose(state[k].numpy(), theirs[k], rtol=2e-5, atol=2e-6)
        assert any(not np.allclose(state[k].numpy(), _mean(out.sent, k).numpy(), atol=1e-3)
                   for k in trained)  # the optimizer did move away from the mean


# --- FedSVD: the moments follow the refactorization -------------------------------------------

def _fedavgm_in_delta_w(states, sent_per_round, rate, momentum):
    """FedAvgM on ΔW = s B A directly (dense, float64): no basis turns, nothing to transport.

    FedSVD's clients train B with the A of the state they received, so the mean update of round
    t is s (B̄ − B) A in that state's coordinates (``states[t - 1]``); the momentum and ΔW are
    accumulated densely from there.
    """
    effective = {m: _effective(states[0], m) for m in MODULES}
    velocity: dict[str, torch.Tensor] = {}
    out = []
    for received, sent in zip(states, sent_per_round, strict=False):
        for m in MODULES:
            B, A = received[b_key(m)].double(), received[a_key(m)].double()
            delta = SCALE * (_mean(sent, b_key(m)) - B) @ A
            velocity[m] = delta if m not in velocity else momentum * velocity[m] + delta
            effective[m] = effective[m] + rate * velocity[m]
        out.append({m: effective[m].clone() for m in MODULES})
    return out


@pytest.mark.parametrize("transport", [True, False])
def test_fedsvd_with_fedavgm_is_fedavgm_on_delta_w(transport, monkeypatch):
    # Prepare: A orthonormal (as after FedSVD's first round), replies whose B move the state
    state = _global(np.random.default_rng(0))
    for m in MODULES:
        B, A = refactorize(state[b_key(m)][None], state[a_key(m)][None])
        state[b_key(m)], state[a_key(m)] = B[0], A[0]
    strategy = _make(FedSVD, server_optimizer=ServerOptimizer("avgm", 0.8, 0.9))
    if not transport:  # without the transport the moments stay in stale coordinates
        monkeypatch.setattr(ServerOptimizer, "transport", lambda self, key, T: None)
    # Execute
    states, sent = _run(strategy, state, 4)
    # Assert
    want = _fedavgm_in_delta_w(states, sent, 0.8, 0.9)
    errors = [max(float(torch.linalg.norm(_effective(s, m) - w[m]) / torch.linalg.norm(w[m]))
                  for m in MODULES) for s, w in zip(states[1:], want, strict=True)]
    if transport:
        assert max(errors) < 1e-5
    else:
        assert errors[0] < 1e-5 and max(errors[1:]) > 1e-2


def test_transport_is_exact_for_adam_under_a_signed_permutation():
    # Adam's diagonal is equivariant under signed permutations: steps in the old coordinates,
    # then the transport, equal the same steps taken in the new coordinates all along.
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(5, 3, generator=g) for _ in range(3)]
    P = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # A' = P A
    inverse = P.T  # P⁻¹ for a signed permutation
    old, new = ServerOptimizer("adam", 0.1), ServerOptimizer("adam", 0.1)
    for t, d in enumerate(deltas[:2], start=1):
        old.step(t, {"b": d})
        new.step(t, {"b": d @ inverse})
    old.transport("b", P)
    assert torch.allclose(old.first["b"], new.first["b"], atol=1e-6)
    assert torch.allclose(old.second["b"], new.second["b"], atol=1e-6)
    assert torch.allclose(old.step(3, {"b": deltas[2] @ inverse})["b"],
                          new.step(3, {"b": deltas[2] @ inverse})["b"], atol=1e-6)


def test_transport_by_a_rotation_keeps_each_rows_second_moment():
    g = torch.Generator().manual_seed(1)
    opt = ServerOptimizer("yogi", 0.1)
    opt.step(1, {"b": torch.randn(6, 4, generator=g)})
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    m, v = opt.first["b"].double(), opt.second["b"].double()
    opt.transport("b", Q.float())
    assert torch.allclose(opt.first["b"].double(), m @ Q.T, atol=1e-5)  # m T⁻¹, T⁻¹ = Tᵀ
    assert torch.allclose(opt.second["b"].double().sum(1), v.sum(1), rtol=1e-5)
    assert (opt.second["b"] >= 0).all()


# --- FLoRA and FedEx-LoRA step on the exact ΔW update -----------------------------------------

@pytest.mark.parametrize("cls", [FLoRA, FedExLoRA])
def test_product_methods_move_the_model_by_the_step_of_the_exact_update(cls):
    state = _global(np.random.default_rng(0), base=True)
    opt = ServerOptimizer("adam", 0.05)
    out = _round(_make(cls, server_optimizer=opt), state, server_round=1)
    reference = ServerOptimizer("adam", 0.05)
    for m in MODULES:
        before = _effective(state, m) if cls is FedExLoRA else state[contract.base_key(m)].double()
        products = SCALE * sum(float(p) * s[b_key(m)].double() @ s[a_key(m)].double()
                               for p, s in zip(np.array(N) / sum(N), out.sent, strict=True))
        exact = products - (_effective(state, m) - state[contract.base_key(m)].double()
                            if cls is FedExLoRA else 0)
        step = reference.step(1, {m: exact})[m].double()
        assert torch.allclose(_effective(out.new, m), before + step, rtol=1e-4, atol=1e-5)
        assert set(opt.first) == {contract.base_key(m) for m in MODULES} | {HEAD}


def test_rolora_keeps_moments_for_the_factor_of_each_round():
    state = _global(np.random.default_rng(0))
    opt = ServerOptimizer("adam", 0.05)
    _run(_make(RoLoRA, server_optimizer=opt), state, 2)
    assert {k for k in opt.first if "lora" in k} == {b_key(m) for m in MODULES} | {
        a_key(m) for m in MODULES}


# --- settings, checkpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("strategy.server-optimizer", "sgd"),
                                       ("strategy.server-learning-rate", 0.0),
                                       ("strategy.server-momentum", 1.0),
                                       ("strategy.server-beta2", -0.1),
                                       ("strategy.server-tau", 0.0)])
def test_bad_server_optimizer_settings_are_refused_by_key(key, value):
    with pytest.raises(ConfigError, match=key):
        AppConfig.from_run_config({**default_run_config(), key: value})


def test_the_registry_builds_the_configured_optimizer():
    cfg = AppConfig.from_run_config({**default_run_config(), "strategy.server-optimizer": "yogi",
                                     "strategy.server-learning-rate": 0.02})
    layout = SimpleNamespace(modules=MODULES, scale=SCALE)
    opt = build_strategy(cfg, layout).server_optimizer
    assert (opt.kind, opt.learning_rate, opt.momentum, opt.beta2, opt.tau) == (
        "yogi", 0.02, 0.9, 0.99, 1e-3)


def test_checkpoint_keeps_the_moments(tmp_path):
    cfg = AppConfig.from_run_config({**default_run_config(), "strategy.server-optimizer": "adam"})
    opt = ServerOptimizer("adam", 0.1)
    opt.step(1, {"layer.lora_B": torch.randn(5, 4), HEAD: torch.randn(2, 3)})
    arrays = ArrayRecord(torch_state_dict={"layer.lora_B": torch.zeros(5, 4)})
    ckpt.save_checkpoint(tmp_path, server_round=1, arrays=arrays, cfg=cfg, rows=[],
                         optimizer=opt.state_dict())
    loaded = ckpt.load_checkpoint(tmp_path, cfg)
    assert set(loaded.arrays) == {"layer.lora_B"}
    again = ServerOptimizer("adam", 0.1)
    again.load_state_dict(loaded.optimizer)
    for key in opt.first:
        assert torch.equal(again.first[key], opt.first[key])
        assert torch.equal(again.second[key], opt.second[key])


def test_a_resumed_run_continues_with_the_moments_it_saved(tmp_path):
    # Prepare: a run whose round 2 was checkpointed with its moments
    settings = {**default_run_config(), "strategy.server-optimizer": "adam"}
    cfg = AppConfig.from_run_config(settings)
    resumed = AppConfig.from_run_config({**settings, "output.resume": True})
    evaluator = SimpleNamespace(rows=[], restore=lambda rows: None)
    state = _global(np.random.default_rng(0))
    crashed = _make(FFALoRA, server_optimizer=ServerOptimizer("adam", 0.05))
    run, _ = prepare_run(crashed, evaluator, tmp_path, cfg, ArrayRecord(torch_state_dict=state))
    states, _ = _run(crashed, state, 2)
    run.save(2, ArrayRecord(torch_state_dict=states[-1]))
    # Execute: a new process resumes, and round 3 goes on from the same moments
    fresh = _make(FFALoRA, server_optimizer=ServerOptimizer("adam", 0.05))
    _, arrays = prepare_run(fresh, evaluator, tmp_path, resumed, ArrayRecord(torch_state_dict={}))
    after_resume = _round(fresh, arrays.to_torch_state_dict(), server_round=3, seed=7).new
    uninterrupted = _round(crashed, states[-1], server_round=3, seed=7).new
    # Assert
    assert fresh.server_optimizer.first  # not started from zero moments
    assert all(torch.equal(after_resume[k], uninterrupted[k]) for k in uninterrupted)


def test_fedsvd_keeps_the_row_space_of_its_first_a_so_the_moments_never_lose_a_direction():
    # B̄ A_prev has the rows of A_prev, so every A′ = T A_prev spans the first A's rows: the
    # transport only re-expresses the moments, it never drops a part of them.
    state = _global(np.random.default_rng(0))
    states, _ = _run(_make(FedSVD, server_optimizer=ServerOptimizer("adam", 0.05)), state, 4)
    for m in MODULES:
        first = state[a_key(m)].double()
        projector = first.T @ torch.linalg.solve(first @ first.T, first)  # onto row(A_0)
        for later in states[1:]:
            A = later[a_key(m)].double()
            assert torch.allclose(A @ projector, A, atol=1e-5)
            assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=A.dtype), atol=1e-5)
