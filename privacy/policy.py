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
- a round is refused when the ledger's ε after its K more steps would exceed ε
  (:meth:`RoundPrivacy.exhausted`): a node never goes past its budget.

Client subsampling by the server is not counted as amplification: the server is untrusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import AppConfig, ConfigError
from privacy.accounting import PrivacyLedger, calibrate_noise


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


def plan_round(cfg: AppConfig, ledger: PrivacyLedger, *, num_examples: int,
               noise_multiplier: float | None, where: str) -> RoundPrivacy:
    """The next round of a node that holds ``ledger`` and ``num_examples`` training examples.

    K = ``train.local-steps``, T = ``strategy.num-rounds`` × K; ``noise_multiplier`` is the
    node's σ from an earlier round of this run (None: calibrate it now, after what ``ledger``
    already holds). Raise
    :class:`ConfigError` if δ ≥ 1/n (private runs only; ``where`` names the node). Without
    noise (ε = inf) nothing is ever exhausted.
    """
    privacy, steps = cfg.privacy, cfg.train.local_steps
    q = sample_rate(num_examples, cfg.train.batch_size)
    if not privacy.is_private:
        return RoundPrivacy(0.0, q, steps, math.inf, exhausted=False)
    check_delta(privacy.delta, num_examples, where)
    sigma = noise_multiplier if noise_multiplier is not None else calibrate_noise(
        target_epsilon=privacy.epsilon, target_delta=privacy.delta, sample_rate=q,
        steps=cfg.strategy.num_rounds * steps, accountant=privacy.accountant,
        spent=ledger.history)
    after = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps,
                                 delta=privacy.delta)
    return RoundPrivacy(sigma, q, steps, after, exhausted=after > privacy.epsilon)
