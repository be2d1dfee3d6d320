"""Fake FedSVD rounds whose honest updates carry DP-sized noise, and the attacks of issue 14.

Shapes are the default run's: 12 LoRA layers (6 × query, value) with B (384, 8) and A (8, 384),
and a 20-class head (20, 384) + (20,). Client k's round update is what K = 10 DP-SGD steps at
learning rate 1 add to what it was sent:

    u_k = K · s + Σ_t lr · N(0, σ_k² C² I) / (q_k n_k),

with C = 2, q_k = 1 / ⌈n_k / 32⌉, and σ_k the noise multiplier a client of n_k examples
calibrates for ε = 6, δ = 1e-5 over 100 steps (exactly as :mod:`privacy.policy` does). The
signal s per step is a fixed random direction whose norm makes the per-step noise-to-signal
ratio of the LoRA factors 30 (the low end of the 31–72 measured on the default run,
docs/experiments.md, "DP diagnostics") and of the head 10 (it takes most of the clipped
norm). ``sent`` is the global state at round 1 (B = 0) or after ``rounds_before`` rounds of
averaged updates of 3 clients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from common import contract
from privacy import calibrate_noise

LAYERS = [f"enc.{i}.{name}" for i in range(6) for name in ("query", "value")]
D, R, CLASSES = 384, 8, 20
HEAD_W, HEAD_B = contract.head_key("classifier.weight"), contract.head_key("classifier.bias")
LR, CLIP, BATCH, STEPS, ROUNDS, EPSILON, DELTA = 1.0, 2.0, 32, 10, 10, 6.0, 1e-5
NSR_LORA, NSR_HEAD = 30.0, 10.0  # per-step noise-to-signal ratios (docs/experiments.md)


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
    for _ in range(rounds_before):
        replies = [fake.honest(reference_examples) for _ in range(3)]
        for key in fake.trained:
            fake.sent[key] = np.mean([r[key] for r in replies], axis=0).astype(np.float32)
    return fake


def reply(node: int, arrays: dict[str, np.ndarray], num_examples: int) -> Message:
    """A train reply of ``node`` as :mod:`client.app` sends it."""
    metrics = MetricRecord({contract.NUM_EXAMPLES: int(num_examples), contract.TRAIN_LOSS: 2.0,
                            contract.EPSILON: 4.0, contract.NOISE_MULTIPLIER: 0.6,
                            contract.BUDGET_EXHAUSTED: 0})
    content = RecordDict({contract.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          contract.METRICS: metrics})
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


# --- the attacks: (the honest replies' arrays, the round) -> (attacker's arrays, its n) --------

Attack = Callable[[Sequence[dict[str, np.ndarray]], FakeRound, int], tuple[dict, int]]


def _flipped_mean(honest: Sequence[dict[str, np.ndarray]], fake: FakeRound,
                  scale_of_median: float) -> dict[str, np.ndarray]:
    """−(mean of the honest arrays), rescaled to ``scale_of_median`` × their median norm."""
    out = {}
    for key in fake.trained:
        mean = np.mean([h[key] for h in honest], axis=0)
        median = float(np.median([np.linalg.norm(h[key]) for h in honest]))
        out[key] = (-mean / max(np.linalg.norm(mean), 1e-30) * scale_of_median * median
                    ).astype(np.float32)
    return out


ATTACKS: dict[str, Attack] = {
    "n = 1e7, flipped B": lambda h, f, n: (_flipped_mean(h, f, 1.0), 10_000_000),
    "flipped B at 9.9x the median norm": lambda h, f, n: (_flipped_mean(h, f, 9.9), n),
    "B x 1e3": lambda h, f, n: ({k: (1e3 * v).astype(np.float32) for k, v in h[0].items()}, n),
    "-B_sent": lambda h, f, n: ({k: (-f.sent[k]).astype(np.float32) for k in f.trained}, n),
    "NaN in one array": lambda h, f, n: ({**h[0], b_key(LAYERS[3]): np.full(
        (D, R), np.nan, np.float32)}, n),
}


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
    """x · y / (‖x‖ ‖y‖)."""
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
