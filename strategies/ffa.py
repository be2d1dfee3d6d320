"""FFA-LoRA: Improving LoRA in Privacy-preserving Federated Learning.

Sun et al., ICLR 2024 (arXiv 2403.12313). Per LoRA layer, W = W0 + s · B A:

1. A is fixed at its random initialisation for the whole run and never trained;
2. clients train only B under DP-SGD and upload B_k;
3. the server averages B̄ = Σ_k p_k B_k, p_k = n_k / Σ n. Since A is shared,
   B̄ A = Σ_k p_k B_k A: the aggregation is exact, and only B (half the factors) is uploaded.

It is FedSVD without the refactorization (A stays the random init, not orthonormal).
"""

from __future__ import annotations

from strategies.base import LoraStrategy


class FFALoRA(LoraStrategy):
    """Train and average B; A stays at its initial random value for ever."""

    TRAIN_FACTORS = ("B",)

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return "train B only, average it; A frozen at its random init"
