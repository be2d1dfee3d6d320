"""FedAvg-LoRA (FedIT): average both LoRA factors separately.

Zhang et al., ICASSP 2024 (arXiv 2305.05644). Per LoRA layer, W = W0 + s · B A: clients train
A and B under DP-SGD (one DP-SGD step privatises both) and upload both; the server sets
B ← Σ_k p_k B_k and A ← Σ_k p_k A_k, p_k = n_k / Σ n. The aggregation is inexact:
(Σ_k p_k B_k)(Σ_k p_k A_k) ≠ Σ_k p_k B_k A_k, the error FedEx-LoRA and FLoRA remove.
"""

from __future__ import annotations

from strategies.base import LoraStrategy


class FedAvgLoRA(LoraStrategy):
    """Train A and B; average each separately."""

    TRAIN_FACTORS = ("A", "B")

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return "train A and B, average each separately (inexact)"
