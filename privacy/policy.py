"""A node's privacy policy: what it may spend, decided before a round trains.

For a client with n training examples, expected batch b, local steps K per round and R rounds:

- δ must be < 1/n (:func:`check_delta`): a larger δ allows leaking one whole example;
- Poisson sampling rate q = 1 / ⌈n / b⌉ (:func:`sample_rate`), exactly as Opacus'
  ``DPDataLoader`` samples;
- one noise multiplier σ for the whole run, the smallest with ε_acc(σ, q, T = R · K) ≤ ε at δ
  (:func:`privacy.accounting.calibrate_noise`): the node could be sampled every round. It is
  computed once and then reused from the node's ledger, so it never changes within a run; what
  the ledger already holds when σ is calibrated (a DP label census, :mod:`privacy.census`) is
  composed in: ε_acc(ledger + (σ, q, T)) ≤ ε;
- with ``privacy.trials`` = M > 1 the run is one of M runs of this schedule that share ε
  (learning-rate tuning, :mod:`privacy.trials`): σ is calibrated for their plain composition,
  ε_acc(ledger + M × (census + (σ, q, T))) ≤ ε, and a ledger that spans runs and already ends
  in earlier trials of the same schedule reuses their σ;
- a round is refused when the ledger's ε after its K more steps would exceed ε
  (:meth:`RoundPrivacy.exhausted`): a node never goes past its budget;
- a ledger that spans runs (a SuperNode's ledger file) holds the steps of earlier
  runs: σ is calibrated per run after all of them, and a run that finds the ledger within
  :data:`SPENT_TOLERANCE` of the budget is refused before it calibrates (that is where a run
  calibrated for the whole budget ends);
- the budget is ε = min(``privacy.epsilon``, the node's own ``max-epsilon``): the run config,
  which the server's operator chooses, can lower what a node spends but never raise it past
  the node's cap (a run without noise, ε = inf, is refused by a node with a cap).

Client subsampling by the server is not counted as amplification: the server is untrusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import AppConfig, ConfigError, DataConfig, PrivacyConfig
from privacy.accounting import HistoryEntry, PrivacyLedger
from privacy.census import census_entry
from privacy.trials import calibrate_trials

# Opacus' calibration tolerance: a σ calibrated for ε spends between ε − 0.01 and ε. A ledger
# already that close to the budget has nothing left that a new run could be calibrated for.
SPENT_TOLERANCE = 0.01


def check_delta(delta: float, num_examples: int, where: str) -> None:
    """Raise ConfigError unless δ < 1/n: a larger δ allows leaking one whole example.

    ``num_examples`` is n, the number of training examples whose privacy δ protects (a
    client's partition; the server checks the whole training split before round 1).
    """
    if num_examples >= 1 and not delta < 1 / num_examples:
        raise ConfigError([f"privacy.delta={delta!r}: must be < 1/n = {1 / num_examples:.3g} "
                           f"(n = {num_examples} training examples of {where})"])


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = 1 / ⌈n / batch⌉, exactly as Opacus' DPDataLoader uses it."""
    if num_examples < 1:
        raise ValueError(f"{num_examples} training examples: a client needs at least one "
                         "(this node's partition is empty: nothing to train on)")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: must be >= 1")
    return 1.0 / math.ceil(num_examples / batch_size)


@dataclass(frozen=True)
class RoundPrivacy:
    """What a node's next round may spend: its DP-SGD parameters and whether it may train."""

    noise_multiplier: float  # σ of the whole run
    sample_rate: float  # q
    steps: int  # K, the round's DP-SGD steps
    epsilon_after: float  # the ledger's ε after this round's steps (inf without noise)
    exhausted: bool  # True: those steps would exceed the budget; the node must not train


def node_budget(privacy: PrivacyConfig, max_epsilon: float | None) -> float:
    """The ε a node may reach: ``privacy.epsilon``, capped by the node's own ``max-epsilon``."""
    return privacy.epsilon if max_epsilon is None else min(privacy.epsilon, max_epsilon)


def plan_round(cfg: AppConfig, ledger: PrivacyLedger, *, num_examples: int,
               noise_multiplier: float | None, where: str,
               max_epsilon: float | None = None) -> RoundPrivacy:
    """The next round of a node that holds ``ledger`` and ``num_examples`` training examples.

    K = ``train.local-steps``, T = ``strategy.num-rounds`` × K; ``noise_multiplier`` is the
    node's σ from an earlier round of this run (None: calibrate it now, after what ``ledger``
    already holds: a census, or the steps of earlier runs). The budget is
    :func:`node_budget` (``max_epsilon``: the node config's cap, None for none). Raise
    :class:`ConfigError` if δ ≥ 1/n (private runs only; ``where`` names the node). Without
    noise (ε = inf) nothing is ever exhausted, unless the node has a cap. A ledger within
    :data:`SPENT_TOLERANCE` of the budget before σ is calibrated is exhausted, with σ = inf.
    """
    privacy, steps = cfg.privacy, cfg.train.local_steps
    q = sample_rate(num_examples, cfg.train.batch_size)
    budget = node_budget(privacy, max_epsilon)
    if not privacy.is_private:  # no noise: only a node with a finite cap refuses
        return RoundPrivacy(0.0, q, steps, math.inf, exhausted=math.isfinite(budget))
    check_delta(privacy.delta, num_examples, where)
    if noise_multiplier is None and ledger.history:
        spent = ledger.epsilon(privacy.delta)
        if spent > budget - SPENT_TOLERANCE:
            return RoundPrivacy(math.inf, q, steps, spent, exhausted=True)
    sigma = noise_multiplier if noise_multiplier is not None else calibrate_trials(
        history=ledger.history, target_epsilon=budget, target_delta=privacy.delta,
        sample_rate=q, steps=cfg.strategy.num_rounds * steps, trials=privacy.trials,
        census=run_census(cfg.data, privacy), accountant=privacy.accountant)
    after = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps,
                                 delta=privacy.delta)
    return RoundPrivacy(sigma, q, steps, after, exhausted=after > budget)


def run_census(data: DataConfig, privacy: PrivacyConfig) -> list[HistoryEntry]:
    """What one run releases before it trains: ``[census_entry(σ_c)]`` with a census, else [].

    A census is ``data.class-prior = "census"``; σ_c is ``privacy``'s (0 in a run without DP).
    """
    return [census_entry(privacy.census_noise)] if data.class_prior_census else []


def check_census_fits(privacy: PrivacyConfig, ledger: PrivacyLedger, *,
                      max_epsilon: float | None, where: str) -> None:
    """Refuse (ConfigError) a census that would take ``ledger`` to the budget or past it.

    The census is the Gaussian mechanism (:func:`privacy.census.census_entry`); what the ledger
    holds already (earlier runs of a node whose ledger spans runs) counts first.
    """
    budget = node_budget(privacy, max_epsilon)
    sigma_c, q_c, steps_c = census_entry(privacy.census_noise_multiplier)
    after = ledger.epsilon_after(noise_multiplier=sigma_c, sample_rate=q_c, steps=steps_c,
                                 delta=privacy.delta)
    if not after < budget:
        raise ConfigError([
            f"{where} refuses the census: its ledger holds ε = "
            f"{ledger.epsilon(privacy.delta):.4g} already (earlier runs), and the census "
            f"(privacy.census-noise-multiplier={privacy.census_noise_multiplier!r}) would take "
            f"it to {after:.4g}, not below its budget {budget:g}; this node's budget is spent"])
