"""The defaults fitted to a client's data size and budget: the planner's ``--recommend``.

The defaults (``pyproject.toml``, the dataclasses of ``common.config``) were chosen on the
default task, whose smallest client holds :data:`REFERENCE_EXAMPLES` posts, at ε = 3
(``experiments/defaults-pilot``). The rule, fixed before it was applied to anyone's data:

1. Keep the default batch B₀, steps K₀, learning rate and rounds while the smallest client
   holds at least one expected batch (n ≥ B₀; with fewer it refuses to train).
2. Otherwise halve B and double K, which keeps the examples per round B · K, until n ≥ B, down
   to :data:`MIN_BATCH_SIZE`.

A smaller batch is not a way to less noise: a client with n examples samples each with
probability q = 1 / ⌈n / B⌉ per step, and at equal compute B · K the round noise
σ / (B · √K) falls as B grows even though σ rises with q (``--batch-sizes`` shows it; at n = 200
and ε = 3, B = 16 has 1.11× the round noise of B = 32). So the rule changes B only where the
client could not train at all.

What it reports for the chosen schedule: σ planned for every step of the run (R · K steps at
rate q, as clients calibrate it) and the round noise, the noise-to-signal of one round's summed
update up to C / ‖g‖, relative to the default task's at ε = 3. Above
:data:`NOISY` times the reference it says so: this data and budget are noisier than the setting
the defaults were chosen in, and a larger ε or more examples per client (fewer, larger clients)
is what lowers it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import PrivacyConfig, StrategyConfig, TrainConfig, fewer_than_one_batch
from common.run_config import override_text
from privacy.accounting import calibrate_noise
from privacy.policy import sample_rate
from privacy.reach import reach_problem

REFERENCE_EXAMPLES = 1445  # the default task's smallest client (20 Newsgroups, Dirichlet 0.5)
REFERENCE_EPSILON = 3.0
MIN_BATCH_SIZE = 8
NOISY = 2.0  # relative round noise above which the recommendation warns


@dataclass(frozen=True)
class Recommendation:
    """A client schedule for n examples at (ε, δ), and the noise it costs."""

    examples: int
    epsilon: float
    delta: float
    batch_size: int
    local_steps: int
    learning_rate: float
    rounds: int
    noise_multiplier: float
    reference_round_noise: float
    reasons: tuple[str, ...]

    @property
    def round_noise(self) -> float:
        """σ / (B · √K): noise-to-signal of one round's summed update, up to C / ‖g‖."""
        return self.noise_multiplier / (self.batch_size * math.sqrt(self.local_steps))

    @property
    def relative_noise(self) -> float:
        """Round noise over the default task's at ε = 3 (0 when both are noiseless)."""
        if self.reference_round_noise == 0:
            return 0.0
        return self.round_noise / self.reference_round_noise

    def run_config(self) -> str:
        """The ``--run-config`` overrides that apply this schedule."""
        keys = {"train.batch-size": self.batch_size, "train.local-steps": self.local_steps,
                "train.learning-rate": self.learning_rate, "strategy.num-rounds": self.rounds,
                "privacy.epsilon": self.epsilon}
        return override_text(keys)


def fitted_batch(examples: int, default_batch: int) -> int:
    """The default batch, halved while the client holds fewer than one batch, not below 8."""
    batch = default_batch
    while examples < batch and batch // 2 >= MIN_BATCH_SIZE:
        batch //= 2
    return batch


def recommend(examples: int, epsilon: float, delta: float | None = None,
              accountant: str = "rdp") -> Recommendation:
    """The defaults fitted to ``examples`` (the smallest client's) at ``epsilon`` (module rule).

    Raises ``ValueError`` when the client holds fewer examples than the smallest batch, or when
    no σ calibration tries meets ``epsilon`` over the fitted schedule (decided in milliseconds by
    :func:`privacy.reach.reach_problem`, before any calibration).
    """
    train, strategy = TrainConfig(), StrategyConfig()
    delta = PrivacyConfig().delta if delta is None else delta
    batch = fitted_batch(examples, train.batch_size)
    if fewer_than_one_batch(examples, batch):
        raise ValueError(f"{examples} examples: fewer than one batch of {batch}; a client "
                         "with fewer examples refuses to train")
    steps = max(1, train.local_steps * train.batch_size // batch)
    reasons = []
    if batch != train.batch_size:
        reasons.append(f"train.batch-size {batch} (default {train.batch_size}): n = {examples} "
                       f"< {train.batch_size}, fewer than one batch of the default")
        reasons.append(f"train.local-steps {steps} (default {train.local_steps}): the same "
                       f"{train.batch_size * train.local_steps} examples per round")
    if problem := reach_problem(PrivacyConfig(epsilon=epsilon, delta=delta, accountant=accountant),
                                rounds=strategy.num_rounds, local_steps=steps, batch_size=batch,
                                num_examples=examples, census=(), where="the smallest client"):
        raise ValueError(problem)
    sigma = _sigma(examples, batch, steps, strategy.num_rounds, epsilon, delta, accountant)
    reference = _sigma(REFERENCE_EXAMPLES, train.batch_size, train.local_steps,
                       strategy.num_rounds, REFERENCE_EPSILON, delta, accountant)
    return Recommendation(
        examples=examples, epsilon=epsilon, delta=delta, batch_size=batch, local_steps=steps,
        learning_rate=train.learning_rate, rounds=strategy.num_rounds, noise_multiplier=sigma,
        reference_round_noise=reference / (train.batch_size * math.sqrt(train.local_steps)),
        reasons=tuple(reasons))


def _sigma(examples: int, batch: int, steps: int, rounds: int, epsilon: float, delta: float,
           accountant: str) -> float:
    """σ for R · K steps at q = 1 / ⌈n / B⌉, as clients calibrate it (0 for ε = inf)."""
    return calibrate_noise(target_epsilon=epsilon, target_delta=delta,
                           sample_rate=sample_rate(examples, batch), steps=rounds * steps,
                           accountant=accountant)


def describe(rec: Recommendation) -> list[str]:
    """The lines ``--recommend`` prints: the schedule, why it differs, its noise, the overrides."""
    train = TrainConfig()
    lines = [f"recommended for n = {rec.examples} examples on the smallest client, "
             f"ε = {rec.epsilon:g}, δ = {rec.delta:g}:",
             f"  train.batch-size = {rec.batch_size}, train.local-steps = {rec.local_steps}, "
             f"train.learning-rate = {rec.learning_rate:g}, strategy.num-rounds = {rec.rounds}"]
    lines += [f"  {reason}" for reason in rec.reasons] or [
        f"  the defaults as they are (n >= one batch of {train.batch_size})"]
    if math.isinf(rec.epsilon):
        lines.append("  no noise (ε = inf)")
    else:
        lines.append(f"  noise multiplier σ = {rec.noise_multiplier:.4f} over "
                     f"{rec.rounds * rec.local_steps} steps; round noise σ/(B·√K) = "
                     f"{rec.round_noise:.4f}, {rec.relative_noise:.2f}× the default task's "
                     f"at ε = {REFERENCE_EPSILON:g} (n = {REFERENCE_EXAMPLES})")
        if rec.relative_noise > NOISY:
            lines.append(f"  noisier than {NOISY:g}× the setting the defaults were chosen in: "
                         "expect less learning; a larger ε or more examples per client "
                         "(fewer, larger clients) lowers it")
    lines.append(f"run config: --run-config '{rec.run_config()}'")
    return lines
