"""Fake FedSVD rounds whose honest updates carry DP-sized noise, and the attacks on them.

Shapes are the default run's: 12 LoRA layers (6 × query, value) with B (384, 8) and A (8, 384),
and a 20-class head (20, 384) + (20,). Client k's round update is what K = 10 DP-SGD steps at
learning rate 1 add to what it was sent:

    u_k = K · s + Σ_t lr · N(0, σ_k² C² I) / (q_k n_k),

with C = 2, q_k = 1 / ⌈n_k / 32⌉, and σ_k the noise multiplier a client of n_k examples
calibrates for ε = 6, δ = 1e-5 over 100 steps (exactly as :mod:`privacy.policy` does). The
signal s per step is a fixed random direction whose norm makes the per-step noise-to-signal
ratio of the LoRA factors 30 (the low end of the 31–72 measured on the default run,
experiments/sweep-small, its DP diagnostics) and of the head 10 (it takes most of the clipped
norm). ``sent`` is the global state at round 1 (B = 0) or after ``rounds_before`` rounds of
averaged updates of 3 clients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import contract
from privacy import calibrate_noise
from strategies import FedSVD, screens

LAYERS = [f"enc.{i}.{name}" for i in range(6) for name in ("query", "value")]
D, R, CLASSES = 384, 8, 20
HEAD_W, HEAD_B = contract.head_key("classifier.weight"), contract.head_key("classifier.bias")
LR, CLIP, BATCH, STEPS, ROUNDS, EPSILON, DELTA = 1.0, 2.0, 32, 10, 10, 6.0, 1e-5
NSR_LORA, NSR_HEAD = 30.0, 10.0  # per-step noise-to-signal ratios (experiments/sweep-small)


def b_key(module: str) -> str:
    """Array name of a layer's B."""
    return contract.lora_key(module, "B")


def a_key(module: str) -> str:
    """Array name of a layer's A."""
    return contract.lora_key(module, "A")


@functools.lru_cache(maxsize=64)
def noise_std(num_examples: int) -> float:
    """Per-coordinate std of one client's round update: lr σ C √K / (q n)."""
    q = 1.0 / math.ceil(num_examples / BATCH)
    sigma = calibrate_noise(target_epsilon=EPSILON, target_delta=DELTA, sample_rate=q,
                            steps=ROUNDS * STEPS)
    return LR * sigma * CLIP * math.sqrt(STEPS) / (q * num_examples)


@dataclass
class FakeRound:
    """The state a round sent and the signal every honest client's update points along."""

    sent: dict[str, np.ndarray]  # every array of the global state (A, B, head), float32
    signal: dict[str, np.ndarray]  # K · s per trained array (B, head)
    rng: np.random.Generator

    @property
    def trained(self) -> list[str]:
        """The arrays a FedSVD client trains and sends back: every B and the head."""
        return [b_key(m) for m in LAYERS] + [HEAD_W, HEAD_B]

    def honest(self, num_examples: int) -> dict[str, np.ndarray]:
        """One honest reply: sent + K s + DP noise of a client with ``num_examples``."""
        std = noise_std(num_examples)
        return {k: (self.sent[k] + self.signal[k] + std * self.rng.standard_normal(
            self.sent[k].shape)).astype(np.float32) for k in self.trained}


def make_round(seed: int, *, rounds_before: int = 0, reference_examples: int = 1885
               ) -> FakeRound:
    """A round after ``rounds_before`` averaged rounds of 3 clients (0: round 1, B = 0)."""
    rng = np.random.default_rng(seed)
    std = noise_std(reference_examples)
    sent: dict[str, np.ndarray] = {}
    for m in LAYERS:
        sent[a_key(m)] = np.linalg.qr(rng.standard_normal((D, R)))[0].T.astype(np.float32)
        sent[b_key(m)] = np.zeros((D, R), np.float32)
    sent[HEAD_W] = (0.02 * rng.standard_normal((CLASSES, D))).astype(np.float32)
    sent[HEAD_B] = np.zeros(CLASSES, np.float32)
    signal = {}
    for key, nsr in [*((b_key(m), NSR_LORA) for m in LAYERS), (HEAD_W, NSR_HEAD),
                     (HEAD_B, NSR_HEAD)]:
        direction = rng.standard_normal(sent[key].shape)
        per_step_noise = std / math.sqrt(STEPS) * math.sqrt(direction.size)
        signal[key] = STEPS * per_step_noise / nsr * direction / np.linalg.norm(direction)
    fake = FakeRound(sent, signal, rng)
    for _ in honest_history(fake, rounds_before, reference_examples):
        pass
    return fake


def honest_history(fake: FakeRound, rounds: int, reference_examples: int = 1885
                   ) -> Iterator[list[dict[str, np.ndarray]]]:
    """``rounds`` averaged rounds of 3 honest clients: each round's replies, then ``fake.sent``
    moves to their plain mean (A untouched). :func:`make_round`'s history, draw for draw."""
    for _ in range(rounds):
        replies = [fake.honest(reference_examples) for _ in range(3)]
        yield replies
        for key in fake.trained:
            fake.sent[key] = np.mean([r[key] for r in replies], axis=0).astype(np.float32)


def reply(node: int, arrays: dict[str, np.ndarray], num_examples: int) -> Message:
    """A train reply of ``node`` as :mod:`client.app` sends it."""
    metrics = MetricRecord({contract.NUM_EXAMPLES: int(num_examples), contract.TRAIN_LOSS: 2.0,
                            contract.EPSILON: 4.0, contract.NOISE_MULTIPLIER: 0.6,
                            contract.BUDGET_EXHAUSTED: 0})
    content = RecordDict({contract.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          contract.METRICS: metrics})
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


# --- the attacks ----------------------------------------------------------------------------
# An attack builds the hostile arrays from the honest replies (the attacker is omniscient) and an
# oracle that says whether the round's screens would let its candidates through unflagged: the
# adaptive attacks search for the updates that just pass (the attack that just evades them).

Arrays = dict[str, np.ndarray]
Oracle = Callable[[list[Arrays]], bool]  # the hostile replies' arrays -> none flagged
Attack = Callable[[Sequence[Arrays], FakeRound, Oracle], Arrays]
NORM_RATIO = 9.9  # just under the norm screen's 10 × the others' median


class FakeGrid:
    """The part of a Flower ``Grid`` that ``configure_train`` uses: node ids 1..n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def fedsvd_round(fake: FakeRound, nodes: int, **settings) -> FedSVD:
    """FedSVD with ``settings``, configured for round 2 with ``fake.sent`` for ``nodes`` nodes."""
    strategy = FedSVD(LAYERS, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                      **settings)
    record = ArrayRecord({k: Array(v) for k, v in fake.sent.items()})
    list(strategy.configure_train(2, record, ConfigRecord(), FakeGrid(nodes)))
    return strategy


def screen_oracle(fake: FakeRound, others: Sequence[Arrays], sizes: Sequence[int]) -> Oracle:
    """Whether the default screens flag none of the candidates replied after ``others``.

    ``sizes``: the ``num-examples`` of ``others`` and then of the candidates.
    """
    strategy = fedsvd_round(fake, len(sizes))

    def passes(candidates: list[Arrays]) -> bool:
        replies = [reply(k + 1, a, n) for k, (a, n) in
                   enumerate(zip([*others, *candidates], sizes, strict=True))]
        screening = strategy.validator(strategy._global, 2).screen(replies)
        flagged = {r.node_id for r in [*screening.rejected, *screening.suspects_kept]}
        return not flagged & set(range(len(others) + 1, len(replies) + 1))

    return passes


def _unit(x: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x / norm if norm > 0 else x


def _honest_updates(honest: Sequence[dict[str, np.ndarray]], fake: FakeRound
                    ) -> list[dict[str, np.ndarray]]:
    return [{k: h[k].astype(np.float64) - fake.sent[k] for k in fake.trained} for h in honest]


def _at_norm(honest: Sequence[dict[str, np.ndarray]], fake: FakeRound,
             direction: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """sent + ratio × (the honest update norm's median, per array) × ``direction`` (unit)."""
    updates = _honest_updates(honest, fake)
    return {k: (fake.sent[k] + ratio * float(np.median([np.linalg.norm(u[k]) for u in updates]))
                * direction[k]).astype(np.float32) for k in fake.trained}


def _flip(honest: Sequence[dict[str, np.ndarray]], fake: FakeRound) -> dict[str, np.ndarray]:
    """Per array, the unit vector against the honest replies' mean update."""
    updates = _honest_updates(honest, fake)
    return {k: -_unit(np.mean([u[k] for u in updates], axis=0)) for k in fake.trained}


def _orthogonal(fake: FakeRound, to: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Per array, a random unit vector orthogonal to ``to[key]`` (unit)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in fake.trained:
        x = rng.standard_normal(fake.sent[k].shape)
        out[k] = _unit(x - np.vdot(x, to[k]) * to[k])
    return out


def _largest(passes: Callable[[float], bool], low: float, high: float, steps: int = 14
             ) -> float | None:
    """The largest x in [low, high] with ``passes(x)`` (bisection; None if even ``low`` fails)."""
    if passes(high):
        return high
    if not passes(low):
        return None
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if passes(middle) else (low, middle)
    return low


def adaptive_flip(honest, fake, passes):
    """Flipped B mixed with orthogonal noise: as flipped as the screens let through, at 9.9×.

    The direction t·flip + (1 − t)·noise (per array, normalised) with the largest t in [0, 1]
    that passes, at 9.9 × the honest median norm; if even pure noise fails there, pure noise
    at the largest norm that passes.
    """
    flip = _flip(honest, fake)
    noise = _orthogonal(fake, flip, seed=17)

    def mixed(t: float) -> dict[str, np.ndarray]:
        return {k: _unit(t * flip[k] + (1 - t) * noise[k]) for k in fake.trained}

    t = _largest(lambda t: passes([_at_norm(honest, fake, mixed(t), NORM_RATIO)]), 0.0, 1.0)
    if t is not None:
        return _at_norm(honest, fake, mixed(t), NORM_RATIO)
    ratio = _largest(lambda r: passes([_at_norm(honest, fake, noise, r)]), 0.0,
                     NORM_RATIO) or 0.0
    return _at_norm(honest, fake, noise, ratio)


def random_under_norm(honest, fake, passes):
    """A random direction at the largest norm ≤ 9.9 × the honest median that passes."""
    noise = _orthogonal(fake, _flip(honest, fake), seed=29)
    ratio = _largest(lambda r: passes([_at_norm(honest, fake, noise, r)]), 0.0,
                     NORM_RATIO) or 0.0
    return _at_norm(honest, fake, noise, ratio)


def shrink_under_erase(honest, fake, passes):
    """B → (1 − s) · B_sent with the largest removed share s ≤ 1 that passes."""
    def shrunk(s: float) -> dict[str, np.ndarray]:
        return {k: ((1 - s) * fake.sent[k]).astype(np.float32) for k in fake.trained}

    return shrunk(_largest(lambda s: passes([shrunk(s)]), 0.0, 1.0) or 0.0)


ATTACKS: dict[str, Attack] = {  # one attacker among three
    "adaptive flip (just passes the screens)": adaptive_flip,
    "random, just under the norm screen": random_under_norm,
    "erase: B = 0": lambda h, f, p: {k: np.zeros_like(f.sent[k]) for k in f.trained},
    "erase: B = 1e-3 B_sent": lambda h, f, p: {k: (1e-3 * f.sent[k]).astype(np.float32)
                                               for k in f.trained},
    "shrink, just under the erase screen": shrink_under_erase,
    "flipped B at 9.9x the median norm": lambda h, f, p: _at_norm(h, f, _flip(h, f), NORM_RATIO),
    "B x 1e3": lambda h, f, p: {k: (1e3 * v).astype(np.float32) for k, v in h[0].items()},
    "-B_sent": lambda h, f, p: {k: (-f.sent[k]).astype(np.float32) for k in f.trained},
    "NaN in one array": lambda h, f, p: {**h[0], b_key(LAYERS[3]): np.full(
        (D, R), np.nan, np.float32)},
}


def colluders(honest: Sequence[Arrays], fake: FakeRound, scale: float) -> list[Arrays]:
    """Two identical colluders: each sends sent − ``scale`` × the honest mean update."""
    updates = _honest_updates(honest, fake)
    arrays = {k: (fake.sent[k] - scale * np.mean([u[k] for u in updates], axis=0)
                  ).astype(np.float32) for k in fake.trained}
    return [arrays, arrays]


def adaptive_colluders(honest: Sequence[Arrays], fake: FakeRound, passes: Oracle
                       ) -> list[Arrays]:
    """Two colluders, each flipped B mixed with its own noise, as flipped as passes, at 9.9×.

    Colluder i sends the direction √t · flip + √(1 − t) · noise_i (noise_1 ⟂ noise_2 ⟂ flip,
    per array): their cosine is t, and t is the largest in [0, 1] that lets both pass.
    """
    flip = _flip(honest, fake)
    noises = [_orthogonal(fake, flip, seed=41), _orthogonal(fake, flip, seed=43)]
    for k in fake.trained:  # the second noise orthogonal to the first too
        noises[1][k] = _unit(noises[1][k] - np.vdot(noises[1][k], noises[0][k]) * noises[0][k])

    def pair(t: float) -> list[Arrays]:
        return [_at_norm(honest, fake, {k: math.sqrt(t) * flip[k] + math.sqrt(1 - t) * n[k]
                                        for k in fake.trained}, NORM_RATIO) for n in noises]

    return pair(_largest(lambda t: passes(pair(t)), 0.0, 1.0) or 0.0)


def stacked_update(arrays: dict[str, np.ndarray], fake: FakeRound,
                   keys: Sequence[str] | None = None) -> np.ndarray:
    """The update X − X_sent of ``keys`` (default: every trained array), flattened, float64."""
    keys = fake.trained if keys is None else keys
    return np.concatenate([(arrays[k].astype(np.float64) - fake.sent[k]).ravel() for k in keys])


def weighted_mean(replies: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
                  ) -> dict[str, np.ndarray]:
    """Σ_k p_k X_k with p_k = w_k / Σ w, per array (float64)."""
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return {k: sum(pk * r[k].astype(np.float64) for pk, r in zip(p, replies, strict=True))
            for k in replies[0]}


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """x · y / (‖x‖ ‖y‖); 0 when either is 0 (no direction: the model did not move)."""
    return screens.cosine(x, y)
