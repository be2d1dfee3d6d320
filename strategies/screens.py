"""The outlier screens of a round's well-formed updates: at most f rejected, never a majority.

Each valid reply k is judged by its *update* u_k = X_k − X_sent (X_sent: the arrays the round
sent), per group of arrays (the LoRA factors together, the head together). Four screens flag a
reply; each flag has a rank, and the worst flagged reply is rejected, the screens are run again
over the replies left, and so on, until none is flagged or the rejection budget

    min(f, ⌊K / 2⌋),   f = ``strategy.num-malicious``, K = well-formed replies,

is spent: a screen never rejects more than f replies, nor more than half of them, so it can
never throw out an honest majority however the attackers arrange their updates. What it cannot
reject stays in the round *bounded* (:func:`strategies.aggregation.bound_updates`); the replies
still flagged then are reported as suspects kept.

1. **norm**, first: ‖u_k‖ > ρ × the median norm of the same update over the *other* replies
   (ρ = ``max_norm_ratio``, default 10; the suspect does not move its own yardstick). Compared
   per group and per array large enough to be judged alone (:func:`judged_alone`), so a blow-up
   of one layer is not diluted by the rest. Rank: the largest ratio first.
2. **erase**: the update removes at least half of the sent state along that state,
   −u_k · X_sent / ‖X_sent‖² ≥ 1/2 (B → 0 removes all of it, B → c · B_sent removes 1 − c,
   B → −B_sent twice), with an alignment no chance gives, cos(u_k, −X_sent) ≥ 4 / √d. Under DP an
   honest update is nearly orthogonal noise to the state (cosine ~ 1/√d). Rank: the largest
   share first.
3. **twins**: two updates closer than independent DP noise allows, cos(u_i, u_j) > |c| (0.5 at
   the default c): the replies of colluders who send one update. Two honest updates share the
   signal but not the noise, so their cosine is about 1 / (1 + r²) for a per-round
   noise-to-signal ratio r (≈ 0.01 on the default run); colluders who add independent noise to
   pass this screen keep at most √|c| of each update along their common direction. Both twins
   are flagged; the first is rejected, which leaves the other one alone. Rank: the highest
   cosine first.
4. **direction**, with three or more replies left: cos(u_k, R) < c (c = ``min_update_cosine``,
   default −0.5), R the coordinate-wise median of the updates left. With fewer than half of the
   replies hostile, every coordinate of R lies within the honest replies' range, so colluders
   cannot drag the reference (the mean of the others could: two identical colluders among five,
   flipped at 3× the honest mean, made every honest reply look opposed to it). Rank: the lowest
   cosine first.

Screens 2 to 4 rest on DP noise making honest updates nearly orthogonal; they are off with
c = −1 (the ServerApp turns them off in non-private runs), and a group of fewer than
(4 / |c|)² = 64 numbers is not screened by direction or twins (:func:`enough_numbers`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from common import contract

MIN_NOISE_Z = 4.0  # a screen applies where honest noise passes its bar with p <= Phi(-4) = 3e-5
MAX_REMOVED_SHARE = 0.5  # the erase screen: an update may not remove half of the sent state
Updates = dict[str, np.ndarray]  # array key -> u_k (float64)


def array_groups(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The non-empty groups of ``keys``, as (name, keys): the LoRA factors, the head."""
    return [(group, members) for group, members in (
        ("LoRA factors", [k for k in keys if not contract.is_head_key(k)]),
        ("head", [k for k in keys if contract.is_head_key(k)])) if members]


def judged_alone(numbers: int, max_norm_ratio: float) -> bool:
    """Whether an array of ``numbers`` values has enough for its own norm comparison.

    The norm ratio of two independent Gaussian vectors of d numbers is √F(d, d); the array is
    judged alone when P(F(d, d) > ratio²) ≤ Φ(−MIN_NOISE_Z) (3e-5), the chance that also bounds
    the direction screen (:func:`enough_numbers`): d ≥ 6 at ratio 10, 17 at 3.
    """
    return bool(stats.f.sf(max_norm_ratio ** 2, numbers, numbers)
                <= stats.norm.sf(MIN_NOISE_Z))


def enough_numbers(numbers: int, min_update_cosine: float) -> bool:
    """Whether a group of d = ``numbers`` values is screened by direction: d c² ≥ MIN_NOISE_Z².

    The cosine of two independent noise vectors of d numbers is about N(0, 1/d): with fewer
    numbers an honest reply falls below c by chance too often (d = 16, c = −0.5: 2 % per
    comparison; merge-sv's σ of a small model is that small).
    """
    return numbers * min_update_cosine ** 2 >= MIN_NOISE_Z ** 2


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """The cosine x · y / (‖x‖ ‖y‖); 0 when either is 0 (no direction to compare)."""
    scale = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.vdot(x, y)) / scale if scale > 0 else 0.0


@dataclass(frozen=True)
class Flag:
    """One screen's verdict on a reply: its rank (lower: worse) and why."""

    rank: tuple[int, float]  # (screen: 0 norm, 1 erase, 2 twins, 3 direction; severity)
    reason: str


@dataclass(frozen=True)
class Verdicts:
    """The outcome of the screens: rejected and kept suspects, by index into the updates."""

    rejected: dict[int, str]
    suspects_kept: dict[int, str]


@dataclass(frozen=True)
class UpdateScreens:
    """The three screens over the updates of a round's well-formed replies.

    Parameters
    ----------
    sizes : the number of values of each expected array, by key.
    sent : the arrays as sent (float64), by key; absent: 0.
    max_norm_ratio : ρ of the norm screen; 0 or inf: off.
    min_update_cosine : c of the direction screen; -1: the direction and erase screens off.
    num_malicious : f, the most replies the screens may reject in a round.
    """

    sizes: Mapping[str, int]
    sent: Mapping[str, np.ndarray]
    max_norm_ratio: float
    min_update_cosine: float
    num_malicious: int

    def judge(self, updates: Sequence[Updates]) -> Verdicts:
        """Reject the worst flagged update, rescreen the rest; stop at the budget."""
        budget = min(self.num_malicious, len(updates) // 2)
        norms = [self._unit_norms(u) for u in updates]
        flat = [{g: np.concatenate([u[k].ravel() for k in keys]) for g, keys in self._groups}
                for u in updates]
        alive, rejected = list(range(len(updates))), {}
        while flags := self._flags(norms, flat, alive):
            if len(rejected) >= budget:
                return Verdicts(rejected, {i: f.reason for i, f in sorted(flags.items())})
            worst = min(flags, key=lambda i: flags[i].rank)
            rejected[worst] = flags[worst].reason
            alive.remove(worst)
        return Verdicts(rejected, {})

    @property
    def _groups(self) -> list[tuple[str, list[str]]]:
        return array_groups(list(self.sizes))

    @property
    def _norm_units(self) -> list[tuple[str, list[str]]]:
        """Each array judged alone, then each group as a whole."""
        return ([(f"array {key!r}", [key]) for key, d in self.sizes.items()
                 if judged_alone(d, self.max_norm_ratio)]
                + [(f"the {group} (all arrays together)", keys) for group, keys in self._groups])

    def _unit_norms(self, update: Updates) -> dict[str, float]:
        if not self.max_norm_ratio or math.isinf(self.max_norm_ratio):
            return {}
        return {what: math.sqrt(sum(float(np.vdot(update[k], update[k])) for k in keys))
                for what, keys in self._norm_units}

    def _flags(self, norms: list[dict[str, float]], flat: list[dict[str, np.ndarray]],
               alive: list[int]) -> dict[int, Flag]:
        """Each alive reply's worst flag (only the flagged ones)."""
        flags: dict[int, Flag] = {}
        for i in alive:
            found = [self._norm_flag(norms, alive, i)]
            if self.min_update_cosine > -1:
                found += [self._erase_flag(flat[i]), self._twin_flag(flat, alive, i),
                          self._direction_flag(flat, alive, i)]
            if found := [f for f in found if f is not None]:
                flags[i] = min(found, key=lambda f: f.rank)
        return flags

    def _norm_flag(self, norms: list[dict[str, float]], alive: list[int], i: int) -> Flag | None:
        worst: Flag | None = None
        for what, norm in norms[i].items():
            median = statistics.median(norms[j][what] for j in alive if j != i) if len(
                alive) > 1 else 0.0
            if median > 0 and norm > self.max_norm_ratio * median:
                flag = Flag((0, -norm / median), (
                    f"{what} changes by {norm:.4g} (Frobenius norm of the update), more than "
                    f"{self.max_norm_ratio:g} × the other replies' median {median:.4g}"))
                worst = flag if worst is None or flag.rank < worst.rank else worst
        return worst

    def _erase_flag(self, flat: dict[str, np.ndarray]) -> Flag | None:
        for group, keys in self._groups:
            sent = np.concatenate([self.sent.get(k, np.zeros(self.sizes[k])).ravel()
                                   for k in keys])
            squared = float(np.vdot(sent, sent))
            if squared == 0:
                continue  # nothing was sent to erase (B = 0 in round 1)
            update = flat[group]
            removed = -float(np.vdot(update, sent)) / squared
            alignment = -cosine(update, sent)
            if removed >= MAX_REMOVED_SHARE and alignment >= MIN_NOISE_Z / math.sqrt(sent.size):
                return Flag((1, -removed), (
                    f"its update of the {group} removes {removed:.0%} of the state it was sent, "
                    f"along that state (cosine {alignment:.3f} with its negative): the reply "
                    "erases the global model"))
        return None

    def _screened_groups(self) -> list[str]:
        """The groups with enough numbers for the direction and twin screens."""
        return [group for group, keys in self._groups
                if enough_numbers(sum(self.sizes[k] for k in keys), self.min_update_cosine)]

    def _twin_flag(self, flat: list[dict[str, np.ndarray]], alive: list[int],
                   i: int) -> Flag | None:
        worst: Flag | None = None
        for group in self._screened_groups():
            for j in alive:
                value = cosine(flat[i][group], flat[j][group]) if j != i else 0.0
                if value > -self.min_update_cosine and (worst is None or -value < worst.rank[1]):
                    worst = Flag((2, -value), (
                        f"its update of the {group} is a twin of another reply's (cosine "
                        f"{value:.3f} > {-self.min_update_cosine:g}; independent DP noise keeps "
                        "honest updates near 0): one of two colluders"))
        return worst

    def _direction_flag(self, flat: list[dict[str, np.ndarray]], alive: list[int],
                        i: int) -> Flag | None:
        if len(alive) < 3:
            return None  # with two replies the median is their mean: neither can be told apart
        worst: Flag | None = None
        for group in self._screened_groups():
            reference = np.median(np.stack([flat[j][group] for j in alive]), axis=0)
            value = cosine(flat[i][group], reference)
            if value < self.min_update_cosine:
                flag = Flag((3, value), (
                    f"its update of the {group} points against the replies' coordinate-wise "
                    f"median update (cosine {value:.3f} < strategy.min-update-cosine="
                    f"{self.min_update_cosine:g})"))
                worst = flag if worst is None or flag.rank < worst.rank else worst
        return worst
