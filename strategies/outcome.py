"""What became of a round's replies: the log lines, and whether the round stops the run."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.common.logger import log

from strategies.validation import Screening


class RoundFailed(RuntimeError):
    """A round cannot train: every sampled client failed, or too few replies were valid."""


def all_failed(screening: Screening, late: list[int]) -> bool:
    """Whether no sampled client answered other than with a Flower error (and some were asked)."""
    answered = screening.valid or screening.exhausted or screening.num_rejected
    return not answered and bool(screening.num_failed or late)


def failure_summary(server_round: int, screening: Screening, late: list[int],
                    round_timeout: float) -> str:
    """One line: every client of the round failed, and their distinct reasons."""
    reasons = list(dict.fromkeys(r.reason for r in screening.rejected))
    if late:
        reasons.append(f"no reply within strategy.round-timeout={round_timeout:g} s "
                       f"(node(s) {', '.join(map(str, late))})")
    shown = "; ".join(reasons[:3]) + (f"; ... ({len(reasons) - 3} more)" if len(reasons) > 3
                                      else "")
    return (f"round {server_round}: all {len(screening.rejected) + len(late)} sampled "
            f"client(s) failed, so nothing can be trained: {shown}")


def log_screening(screening: Screening) -> None:
    """One WARNING per rejected reply and per suspect kept; one INFO line for spent budgets."""
    for rejection in screening.rejected:
        log(WARNING, "aggregate_train: rejected the reply of node %d: %s",
            rejection.node_id, rejection.reason)
    for suspect in screening.suspects_kept:
        log(WARNING, "aggregate_train: kept the reply of node %d with its influence bounded "
            "(strategy.num-malicious replies already rejected): %s", suspect.node_id,
            suspect.reason)
    if screening.exhausted:
        log(INFO, "aggregate_train: %d client(s) skipped the round: privacy budget spent",
            len(screening.exhausted))
