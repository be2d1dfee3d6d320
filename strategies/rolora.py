"""RoLoRA: alternating optimization of the LoRA factors.

Chen et al., NeurIPS 2025 (arXiv 2502.01755). Per LoRA layer, W = W0 + s · B A, rounds
alternate which factor every client trains:

1. odd rounds: clients train B with A frozen; the server sets B ← Σ_k p_k B_k;
2. even rounds: clients train A with B frozen; the server sets A ← Σ_k p_k A_k.

In each round the other factor is the same on every client, so the average is exact
(Σ_k p_k B_k A = B̄ A), and each upload is one factor. B starts at 0, so B goes first: a first
round on A would have zero gradient.
"""

from __future__ import annotations

from common.contract import Factor
from strategies.base import LoraStrategy


class RoLoRA(LoraStrategy):
    """Train and average B in odd rounds, A in even rounds."""

    def train_factors(self, server_round: int) -> tuple[Factor, ...]:
        """B in odd rounds, A in even rounds."""
        return ("B",) if server_round % 2 == 1 else ("A",)

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return "alternate: train B (odd rounds) or A (even rounds), average it"
