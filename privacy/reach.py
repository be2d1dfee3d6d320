"""Whether a privacy budget can be met at all, decided in milliseconds, before calibrating σ.

Calibration (:func:`privacy.accounting.calibrate_noise`: Opacus' ``get_noise_multiplier``, or
its bisection after a census) doubles σ from 20 and gives up once it passes Opacus'
``MAX_SIGMA`` = 1e6, so :data:`LARGEST_NOISE` = 10 · 2^16 = 655360 is the most noise it can
settle on: a budget that σ does not meet is refused ("The privacy budget is too low."), but only
after every doubling, each an accountant evaluation that takes seconds at a large q and σ (70 s
for ε = 0.0001, 10 examples, batch 5). :func:`shortfall` decides it first, from two closed forms
of the RDP ε at σ = LARGEST_NOISE (Opacus' orders and its RDP → (ε, δ) conversion, Balle et al.
2020, Thm. 21):

- from below, the RDP of what was spent before (a census) alone: as σ → ∞ the steps' RDP
  vanishes, and under RDP no σ brings ε below it (about 0.103 at δ = 1e-5 with no census, set
  by Opacus' largest order 63);
- from above, the steps as the Gaussian mechanism without subsampling, RDP α T / (2 σ²) at order
  α: a Poisson-subsampled step's output is a mixture of the Gaussian step's and of nothing
  changed, so by the joint quasi-convexity of the Rényi divergence (van Erven & Harremoës 2014,
  Thm. 13) its RDP is at most the Gaussian's.

The accountant itself is asked (seconds) only when neither bound decides.

A schedule within reach can still need more noise than any update survives (a billion rounds
at the defaults: σ ≈ 2305): :func:`noise_above_bound` refuses σ above
``privacy.max-noise-multiplier``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import MAX_SIGMA

from common.config import AppConfig, ConfigError, PrivacyConfig
from privacy.accounting import (
    HistoryEntry,
    calibrate_noise,
    epsilon_of,
    largest_order_is_optimal,
)
from privacy.policy import run_census, sample_rate

ORDERS = RDPAccountant.DEFAULT_ALPHAS
LARGEST_NOISE = 10.0 * 2 ** math.floor(math.log2(MAX_SIGMA / 10))  # 655360, the last σ tried
PRV_ERROR = 0.01  # Opacus' PRV accountant reports ε to within this (its eps_error)
TIGHT = 1e-4  # the bounds agree within this share of ε: either is the ε at LARGEST_NOISE


@dataclass(frozen=True)
class Shortfall:
    """A budget ``epsilon`` that no σ calibration tries can meet.

    ``least``: the ε the schedule spends at σ = :data:`LARGEST_NOISE`, the least it can reach;
    ``floor``: under the ``rdp`` accountant, the ε no σ at all goes below (0 under ``prv``).
    """

    epsilon: float
    least: float
    floor: float
    accountant: str
    delta: float

    @property
    def no_sigma(self) -> bool:
        """Whether no σ at all meets the budget, however large: it is at or below the floor."""
        return self.epsilon <= self.floor

    def reason(self) -> str:
        """What the schedule reaches, and what σ the budget would need."""
        need = (f"no σ at all spends less than {self.floor:.4g} under {self.accountant} at "
                f"δ = {self.delta:g}" if self.no_sigma else
                f"it would need σ > {LARGEST_NOISE:g}")
        return (f"even σ = {LARGEST_NOISE:g}, the most noise calibration tries, spends "
                f"ε = {self.least:.4g} ({self.accountant}, δ = {self.delta:g}): {need}")


def shortfall(epsilon: float, *, delta: float, sample_rate: float, steps: int,
              accountant: str = "rdp", spent: Sequence[HistoryEntry] = ()) -> Shortfall | None:
    """None when a σ <= LARGEST_NOISE keeps ``spent`` + ``steps`` steps at q within (ε, δ).

    Else the :class:`Shortfall`, exactly as calibration would fail (module docstring).
    """
    if math.isinf(epsilon):
        return None
    before = sum((np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=ORDERS))
                  for s, q, n in spent), np.zeros(len(ORDERS)))
    gaussian = np.asarray(compute_rdp(q=1.0, noise_multiplier=LARGEST_NOISE, steps=steps,
                                      orders=ORDERS))
    floor, upper = _epsilon(before, delta), _epsilon(before + gaussian, delta)
    if upper * (1 + TIGHT) + (PRV_ERROR if accountant == "prv" else 0.0) <= epsilon:
        return None  # with a margin for the accountant's rounding
    floor = floor if accountant == "rdp" else 0.0
    if epsilon < floor and upper - floor <= TIGHT * upper:
        return Shortfall(epsilon, upper, floor, accountant, delta)
    least = epsilon_of(accountant, [*spent, (LARGEST_NOISE, sample_rate, steps)], delta)
    return None if least <= epsilon else Shortfall(epsilon, least, floor, accountant, delta)


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    with largest_order_is_optimal():
        return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


def check_reachable(cfg: AppConfig, num_examples: int, where: str) -> None:
    """Refuse (ConfigError) a budget that a client of ``num_examples`` cannot be calibrated for.

    ``where`` names the client: the smallest partition has the largest q, so the most noise.
    """
    if problem := reach_problem(cfg.privacy, rounds=cfg.strategy.num_rounds,
                                local_steps=cfg.train.local_steps,
                                batch_size=cfg.train.batch_size, num_examples=num_examples,
                                census=run_census(cfg.data, cfg.privacy), where=where):
        raise ConfigError([problem])


def reach_problem(privacy: PrivacyConfig, *, rounds: int, local_steps: int, batch_size: int,
                  num_examples: int, census: Sequence[HistoryEntry], where: str) -> str | None:
    """Why no σ keeps a client's run within ``privacy.epsilon``, naming the keys; None if one does.

    The client calibrates σ for R × K steps at q = 1 / ⌈n / batch⌉ after its ``census``, for
    each of ``privacy.trials`` runs together (:func:`privacy.policy.plan_round`).
    """
    if not privacy.is_private:
        return None
    q, trials = sample_rate(num_examples, batch_size), privacy.trials
    steps, spent = trials * rounds * local_steps, [*census] * trials
    short = shortfall(privacy.epsilon, delta=privacy.delta, sample_rate=q, steps=steps,
                      accountant=privacy.accountant, spent=spent)
    schedule = (f"strategy.num-rounds={rounds} × train.local-steps={local_steps}"
                + (f" × privacy.trials={trials}" if trials > 1 else ""))
    client = (f"q = {q:.4g} ({where}, {num_examples} training examples, "
              f"train.batch-size={batch_size})")
    if short is None:
        sigma = noise_above_bound(privacy, sample_rate=q, steps=steps, spent=spent)
        return None if sigma is None else (
            f"{schedule} steps at {client} need σ = {sigma:.4g} for privacy.epsilon="
            f"{privacy.epsilon!r}: above privacy.max-noise-multiplier="
            f"{privacy.max_noise_multiplier!r}, where the noise drowns every step's update; lower "
            "strategy.num-rounds or train.local-steps, raise privacy.epsilon, or raise "
            "privacy.max-noise-multiplier if this much noise is meant")
    fix = (f"raise privacy.epsilon above {short.floor:.4g} (or privacy.delta), or use "
           "privacy.accountant='prv'" if short.no_sigma else
           f"raise privacy.epsilon above {short.least:.4g}, or lower strategy.num-rounds or "
           "train.local-steps")
    return (f"privacy.epsilon={privacy.epsilon!r} is out of reach of {schedule} steps at "
            f"{client}: {short.reason()}; {fix}")


def noise_above_bound(privacy: PrivacyConfig, *, sample_rate: float, steps: int,
                      spent: Sequence[HistoryEntry] = ()) -> float | None:
    """The σ a schedule needs when that is above ``privacy.max-noise-multiplier``; else None.

    Decided by one RDP evaluation at σ = the bound (milliseconds at any number of steps; the
    PRV accountant runs out of memory at ~1e9 steps): ε_RDP ≥ ε_PRV, so a schedule that RDP
    keeps within ε at the bound is within it under either accountant. Only above the bound is
    σ calibrated (RDP), for the message.
    """
    bound = privacy.max_noise_multiplier
    if not privacy.is_private or math.isinf(bound):
        return None
    if epsilon_of("rdp", [*spent, (bound, sample_rate, steps)], privacy.delta) <= privacy.epsilon:
        return None
    return calibrate_noise(target_epsilon=privacy.epsilon, target_delta=privacy.delta,
                           sample_rate=sample_rate, steps=steps, spent=spent)
