"""Noise calibration and a client's cumulative privacy ledger, on Opacus accountants.

A client runs DP-SGD with one noise multiplier σ for the whole run, fixed up front from its
budget: σ = min{σ : ε_acc(σ, q, T) ≤ ε_target at δ}, with sample rate q = batch / n_local and
T = rounds × local steps, the most steps it could ever take (it may be sampled every round).
Client subsampling by the server is *not* counted as amplification: the server is untrusted.
The ledger keeps the accountant's history [(σ, q, steps), ...] across rounds, so the reported
ε covers every step the client has ever taken. A release before training (the DP label census
of :mod:`privacy.census`) is in the history too, and σ is then calibrated for the T steps
*after* it: ε_acc(history + (σ, q, T)) ≤ ε_target.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

HistoryEntry = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps)


@contextlib.contextmanager
def largest_order_is_optimal() -> Iterator[None]:
    """Opacus' "Optimal order is the largest alpha" UserWarning off for the block.

    The RDP → (ε, δ) conversion minimises over Opacus' default orders (up to 63); when the
    minimum sits at the largest, the ε reported is still a valid upper bound, only not the
    tightest (it happens after few steps, when ε is small). Noise calibration and every
    reported ε use the same orders, so the budget check is consistent. The filters are
    restored after the block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                category=UserWarning)
        yield


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    spent: Sequence[HistoryEntry] = (),
) -> float:
    """Smallest σ such that ``steps`` Poisson-subsampled Gaussian steps stay within (ε, δ).

    With ``spent`` (an accountant history already taken, e.g. a census), the smallest σ with
    ε_acc(spent + (σ, q, steps)) ≤ ε, to Opacus' tolerance of 0.01 below ε; ValueError when
    ``spent`` alone leaves no ε. Returns 0.0 for ``target_epsilon = inf`` (no noise).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate}: must be in (0, 1] "
                         "(is train.batch-size larger than the local dataset?)")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    if math.isinf(target_epsilon):
        return 0.0
    if spent:
        return _calibrate_after(list(spent), target_epsilon=target_epsilon,
                                target_delta=target_delta, sample_rate=sample_rate, steps=steps,
                                accountant=accountant)
    with largest_order_is_optimal():
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
        ))


def _calibrate_after(spent: list[HistoryEntry], *, target_epsilon: float, target_delta: float,
                     sample_rate: float, steps: int, accountant: str,
                     tolerance: float = 0.01) -> float:
    """Bisection of Opacus' ``get_noise_multiplier``, on the history ``spent`` + (σ, q, steps).

    ε(σ) falls from inf (σ → 0) to ε(spent) (σ → inf), so a σ within ``tolerance`` below the
    target exists iff ε(spent) < target.
    """
    def eps(sigma: float) -> float:
        return epsilon_of(accountant, spent + [(sigma, sample_rate, steps)], target_delta)

    already = epsilon_of(accountant, spent, target_delta)
    if not already < target_epsilon:
        raise ValueError(f"the history already spends ε = {already:.4g} of the target "
                         f"{target_epsilon:g}: no σ leaves room for {steps} steps")
    low, high = 0.0, 10.0
    while (eps_high := eps(high)) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no σ ≤ 1e6 keeps {steps} steps within ε = {target_epsilon:g}")
    for _ in range(200):
        if eps_high >= target_epsilon - tolerance:
            break
        mid = (low + high) / 2
        if (eps_mid := eps(mid)) <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


@dataclass
class PrivacyLedger:
    """Every DP-SGD step a client has taken, as an Opacus accountant history."""

    accountant: str = "rdp"
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def make_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's history."""
        acc = create_accountant(self.accountant)
        acc.history = list(self.history)
        return acc

    def epsilon(self, delta: float) -> float:
        """Cumulative ε at ``delta`` over the whole history (0 if no step, inf if σ = 0)."""
        return epsilon_of(self.accountant, self.history, delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """ε the client would have after ``steps`` more steps at (σ, q)."""
        planned = self.history + [(noise_multiplier, sample_rate, steps)]
        return epsilon_of(self.accountant, planned, delta)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, storable in a Flower ConfigRecord."""
        return {
            "noise-multipliers": [float(s) for s, _, _ in self.history],
            "sample-rates": [float(q) for _, q, _ in self.history],
            "steps": [int(n) for _, _, n in self.history],
        }

    @classmethod
    def from_dict(cls, accountant: str, data: dict) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`."""
        rows = zip(data.get("noise-multipliers", []), data.get("sample-rates", []),
                   data.get("steps", []), strict=True)
        return cls(accountant, [(float(s), float(q), int(n)) for s, q, n in rows])

    def save(self, path: str | os.PathLike, *, noise_multiplier: float | None,
             extra: Mapping[str, str] | None = None) -> None:
        """Write the history and the run's σ (None before calibration) to ``path``, atomically.

        ``extra``: more top-level fields (e.g. the run σ belongs to), ignored by :meth:`load`.
        A temporary file in the same folder is fsync'ed, then renamed over ``path``
        (``os.replace``), so a crash leaves either the old or the new ledger, never a torn one.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sigma = None if noise_multiplier is None else float(noise_multiplier)
        payload = {"accountant": self.accountant, "noise-multiplier": sigma, **(extra or {}),
                   "history": [{"noise-multiplier": float(s), "sample-rate": float(q),
                                "steps": int(n)} for s, q, n in self.history]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, accountant: str) -> tuple[PrivacyLedger, float | None]:
        """Inverse of :meth:`save`: (ledger on ``accountant``, σ or None); ValueError if corrupt."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            history = [(float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"]))
                       for e in payload["history"]]
            sigma = payload["noise-multiplier"]
            return cls(accountant, history), None if sigma is None else float(sigma)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"privacy state file {path} is unreadable ({exc}); refusing to "
                             "train with an unknown privacy history") from exc


def epsilon_of(accountant: str, history: Sequence[HistoryEntry], delta: float) -> float:
    """ε at ``delta`` of ``history`` [(σ, q, steps), ...] (0 if empty, inf if a σ is 0).

    A q = 1 entry (the Gaussian mechanism) makes the PRV accountant take log(1 − q) = −inf, a
    case its formula handles; numpy's divide-by-zero warning for it is silenced.
    """
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = list(history)
    with largest_order_is_optimal(), np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=delta))
