"""Noise calibration and a client's cumulative privacy ledger, on Opacus accountants.

A client runs DP-SGD with one noise multiplier σ for the whole run, fixed up front from its
budget: σ = min{σ : ε_acc(σ, q, T) ≤ ε_target at δ}, with sample rate q = batch / n_local and
T = rounds × local steps, the most steps it could ever take (it may be sampled every round).
Client subsampling by the server is *not* counted as amplification: the server is untrusted.
The ledger keeps the accountant's history [(σ, q, steps), ...] across rounds, so the reported
ε covers every step the client has ever taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
) -> float:
    """Smallest σ such that ``steps`` Poisson-subsampled Gaussian steps stay within (ε, δ).

    Returns 0.0 for ``target_epsilon = inf`` (no noise).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate}: must be in (0, 1] "
                         "(is train.batch-size larger than the local dataset?)")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    if math.isinf(target_epsilon):
        return 0.0
    with largest_order_is_optimal():
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
        ))


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
        return _epsilon(self.accountant, self.history, delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """ε the client would have after ``steps`` more steps at (σ, q)."""
        planned = self.history + [(noise_multiplier, sample_rate, steps)]
        return _epsilon(self.accountant, planned, delta)

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

    def save(self, path: str | os.PathLike, *, noise_multiplier: float) -> None:
        """Write the history and the run's σ to ``path`` as JSON, atomically.

        A temporary file in the same folder is fsync'ed, then renamed over ``path``
        (``os.replace``), so a crash leaves either the old or the new ledger, never a torn one.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"accountant": self.accountant, "noise-multiplier": float(noise_multiplier),
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
    def load(cls, path: str | os.PathLike, accountant: str) -> tuple[PrivacyLedger, float]:
        """Inverse of :meth:`save`: (ledger on ``accountant``, σ); raise ValueError if corrupt."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            history = [(float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"]))
                       for e in payload["history"]]
            return cls(accountant, history), float(payload["noise-multiplier"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"privacy state file {path} is unreadable ({exc}); refusing to "
                             "train with an unknown privacy history") from exc


def _epsilon(accountant: str, history: list[HistoryEntry], delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = list(history)
    with largest_order_is_optimal():
        return float(acc.get_epsilon(delta=delta))
