"""σ for one of K runs that share one budget: learning-rate tuning whose privacy cost is counted.

A run with ``privacy.trials = K`` is one of K runs of the same schedule (the same sample rate q,
the same T = rounds × local steps, the same census if any) that together may spend ε. The runs
compose: plain composition, the accountant adding their RDP curves (PRV: convolving their
privacy random variables). So σ is the smallest with

    ε_acc(P + K × (census + (σ, q, T))) ≤ ε,

P the node's ledger before the first of them. Composition does not depend on the order, so this
is one run of K · T steps after K censuses: ``calibrate_noise(steps=K·T, spent=P + K × census)``
(:func:`calibrate_trials`). K = 1 is exactly a run's own calibration. The validation scores
that choose among the trials are not privatised: the guarantee covers the trained adapters
(Papernot & Steinke, ICLR 2022, private selection, would need DP scores and a random number
of trials).

A ledger that spans runs (a SuperNode's, :mod:`client.ledger`) holds the earlier trials when a
later one starts. Calibrating after them for K more runs would give each trial more noise than
the one before, and a (K+1)-th would still find room. Instead the run recognises earlier trials
at the end of the ledger (:func:`earlier_trials`: entries (σ*, q, ·) of this sample rate and
census entries), recomputes σ_K from the ledger P that they leave, and reuses σ* when it is
exactly σ_K: every trial runs at the same σ, K trials that take all their steps end within
Opacus' tolerance of ε, and a (K+1)-th finds the budget spent
(:data:`privacy.policy.SPENT_TOLERANCE`). A ledger that does not end in such trials (another
run in between, a different schedule) gets a fresh calibration for K runs after all it holds:
more noise, never more ε.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from privacy.accounting import HistoryEntry, calibrate_noise, epsilon_of


def calibrate_trials(*, history: Sequence[HistoryEntry], target_epsilon: float,
                     target_delta: float, sample_rate: float, steps: int, trials: int,
                     census: Sequence[HistoryEntry] = (), accountant: str = "rdp") -> float:
    """σ of one of ``trials`` runs of ``steps`` steps at q that together stay within (ε, δ).

    ``history``: the node's ledger now (this run's census, if it answered one, already in it);
    ``census``: what each run releases before training ([] or ``[census_entry(σ_c)]``). With
    ``trials = 1``: :func:`privacy.accounting.calibrate_noise` after ``history``, unchanged.
    Else the σ of the earlier trials when ``history`` ends in them (module docstring), or a
    fresh σ for this run and ``trials − 1`` more after ``history``.
    """
    if trials < 1:
        raise ValueError(f"trials={trials}: must be >= 1")

    def calibrate(spent: list[HistoryEntry], total_steps: int) -> float:
        return calibrate_noise(target_epsilon=target_epsilon, target_delta=target_delta,
                               sample_rate=sample_rate, steps=total_steps,
                               accountant=accountant, spent=spent)

    if trials == 1:
        return calibrate(list(history), steps)
    prior, sigma_seen = earlier_trials(history, census=census, sample_rate=sample_rate)
    if sigma_seen is not None and calibrate([*prior, *census * trials],
                                            trials * steps) == sigma_seen:
        return sigma_seen
    return calibrate([*history, *census * (trials - 1)], trials * steps)


def earlier_trials(history: Sequence[HistoryEntry], *, census: Sequence[HistoryEntry],
                   sample_rate: float) -> tuple[list[HistoryEntry], float | None]:
    """(the ledger before the trials at its end, their σ), or (``history``, None) if none.

    From the end: census entries, then the last DP-SGD entry; if its sample rate is
    ``sample_rate``, its σ is σ* and every trailing entry (σ*, q, ·) or census entry belongs to
    the trials (Opacus merges the steps of consecutive trials at one σ into one entry).
    """
    rest = list(history)
    while rest and rest[-1] in census:
        rest.pop()
    if not rest or rest[-1][1] != sample_rate:
        return list(history), None
    sigma = rest[-1][0]
    while rest and (rest[-1] in census or rest[-1][:2] == (sigma, sample_rate)):
        rest.pop()
    return rest, sigma


@dataclass(frozen=True)
class TrialsPlan:
    """σ of K runs sharing ε, against one run's σ, and what one run and all K spend."""

    trials: int
    noise_multiplier: float
    one_run_noise_multiplier: float
    epsilon_one_run: float  # one trial alone (census included)
    epsilon_all: float  # the K trials composed

    @property
    def multiplier(self) -> float:
        """σ_K / σ_1: how much more noise each trial carries than a run with the whole budget."""
        return self.noise_multiplier / self.one_run_noise_multiplier


def plan_trials(trials: Sequence[int], *, epsilon: float, delta: float, sample_rate: float,
                steps: int, census: Sequence[HistoryEntry] = (),
                accountant: str = "rdp") -> list[TrialsPlan]:
    """For each K of ``trials``: σ_K (:func:`calibrate_trials` on a fresh ledger) and its ε."""
    def sigma(k: int) -> float:
        return calibrate_trials(history=list(census), target_epsilon=epsilon,
                                target_delta=delta, sample_rate=sample_rate, steps=steps,
                                trials=k, census=census, accountant=accountant)

    one = sigma(1)
    plans = []
    for k in trials:
        s = sigma(k)
        run = [*census, (s, sample_rate, steps)]
        plans.append(TrialsPlan(k, s, one, epsilon_of(accountant, run, delta),
                                epsilon_of(accountant, run * k, delta)))
    return plans


def trials_table(plans: Sequence[TrialsPlan]) -> list[str]:
    """The planner's table of :func:`plan_trials`, one line per K."""
    lines = ["trials K        σ   σ / σ(K=1)   ε of one trial   ε of all K (composed)"]
    lines += [f"{p.trials:8d}  {p.noise_multiplier:7.4f}  {p.multiplier:10.2f}x  "
              f"{p.epsilon_one_run:15.4f}  {p.epsilon_all:22.4f}" for p in plans]
    return lines
