"""A class prior counted under DP: the nodes' label counts through the Gaussian mechanism.

For users who have no public prior (``data.class-prior = "census"``, :mod:`common.class_prior`).
Node i holds training labels y_1 … y_n in {0, …, K − 1}; its counts c_i ∈ ℕ^K,
c_ik = #{j : y_j = k}. Adding or removing one example changes one count by one, so c_i has L2
sensitivity Δ = 1 under the add/remove adjacency that Opacus' Poisson-sampled DP-SGD uses. The
node releases, once per run and before it trains,

    c̃_i = c_i + N(0, σ_c² I_K),    σ_c = ``privacy.census-noise-multiplier``,

the Gaussian mechanism, with Rényi DP ε(α) = α / (2 σ_c²) (Mironov 2017, Prop. 7): exactly
Opacus' subsampled Gaussian at sample rate q = 1 for one step. So the node's ledger records
:func:`census_entry` = (σ_c, 1.0, 1), every ε it reports from then on composes the census with
its DP-SGD steps, and its DP-SGD σ is calibrated after it
(:func:`privacy.accounting.calibrate_noise` with ``spent``), so that the census and all R · K
steps together stay within ε.

The server sums the answers, floors each class at one example and normalises
(:func:`census_prior`): post-processing, no further cost. The noise is drawn from a generator
seeded by the operating system's entropy, never by the run's seed: no public value predicts it.
(Like Opacus without ``secure_mode``, it is floating-point Gaussian noise.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.config import ConfigError, PrivacyConfig
from privacy.accounting import HistoryEntry, epsilon_of

CENSUS_ACTION = "census"  # the ClientApp's query handler: message type "query.census"
CENSUS_RECORD = "census"  # ConfigRecord of a node's answer
NOISY_COUNTS = "noisy-counts"  # its K noisy counts, in the order of the corpus' label names
MIN_COUNT = 1.0  # each class's summed count is floored here before normalising: π̂_k > 0


def census_entry(noise_multiplier: float) -> HistoryEntry:
    """The ledger entry of one census: the Gaussian mechanism is q = 1, one step, at σ_c."""
    return (float(noise_multiplier), 1.0, 1)


def census_epsilon(privacy: PrivacyConfig, runs: int = 1) -> float:
    """ε at ``privacy.delta`` of ``runs`` censuses alone (one per run), as the accountant counts.

    ``runs`` = ``privacy.trials`` for every census of the trials that share the budget
    (:mod:`privacy.trials`).
    """
    entries = [census_entry(privacy.census_noise_multiplier)] * runs
    return epsilon_of(privacy.accountant, entries, privacy.delta)


def check_census_budget(privacy: PrivacyConfig) -> None:
    """Refuse (ConfigError) a census whose ε alone leaves nothing of the budget for training.

    For a run that takes a census (``data.class-prior = "census"``; the caller checks). With
    ``privacy.trials`` = K the K runs' censuses together must leave room; a run without DP
    passes.
    """
    if not privacy.is_private:
        return
    trials = privacy.trials
    spent = census_epsilon(privacy, trials)
    if not spent < privacy.epsilon:
        raise ConfigError([
            f"privacy.census-noise-multiplier={privacy.census_noise_multiplier!r}: the "
            + ("census alone spends" if trials == 1 else
               f"censuses of the privacy.trials={trials} runs alone spend")
            + f" ε = {spent:.3g} of privacy.epsilon={privacy.epsilon!r}, "
            "leaving nothing to train with; raise it (10 adds about 0.03 to ε = 3 beside "
            "DP-SGD) or declare a public data.class-prior"])


def noisy_label_counts(labels: Sequence[int], num_classes: int, noise_multiplier: float,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """The counts of ``labels`` in {0, …, K − 1} plus N(0, σ_c² I_K): (K,) float64.

    ``noise_multiplier`` = 0 returns the exact counts (a run without DP). ``rng``: the
    generator of the noise, a fresh one seeded by the operating system when None (training
    code must leave it None; tests pass one to check the distribution).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"labels outside [0, {num_classes}): {sorted(set(labels.tolist()))[:5]}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier {noise_multiplier!r}: must be finite and >= 0")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if noise_multiplier == 0:
        return counts
    rng = rng if rng is not None else np.random.default_rng()
    return counts + rng.normal(0.0, noise_multiplier, size=num_classes)


def census_prior(answers: Sequence[Sequence[float]],
                 label_names: Sequence[str]) -> dict[str, float]:
    """π̂ from the nodes' noisy counts: Σ_i c̃_i, each floored at :data:`MIN_COUNT`, normalised.

    Returns {class name: share} in the order of ``label_names``, every share > 0 (what
    :func:`common.class_prior.decision_offsets` takes). Raise ValueError without an answer, or
    for an answer of the wrong length.
    """
    if not answers:
        raise ValueError("no node answered the census: there are no counts to estimate a prior")
    if bad := [len(a) for a in answers if len(a) != len(label_names)]:
        raise ValueError(f"a census answer has {bad[0]} counts for {len(label_names)} classes")
    total = np.maximum(np.sum(np.asarray(answers, dtype=np.float64), axis=0), MIN_COUNT)
    shares = total / total.sum()
    return {name: float(s) for name, s in zip(label_names, shares, strict=True)}
