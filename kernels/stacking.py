"""The weighted sum of several LoRA products by stacking their factors (FLoRA, FedEx-LoRA)."""

from __future__ import annotations

import torch
from torch import Tensor


def stacked_product(B: Tensor, A: Tensor, weights: Tensor) -> Tensor:
    """Σ_k w_k B_k A_k as one product of stacked factors, in float64.

    [w_1 B_1 … w_K B_K] (m, K r) times [A_1; …; A_K] (K r, n) equals Σ_k w_k B_k A_k exactly
    (FLoRA, Wang et al., NeurIPS 2024): the clients' factors are never averaged separately.

    Parameters
    ----------
    B : (K, m, r) the clients' B factors.
    A : (K, r, n) the clients' A factors.
    weights : (K,) the clients' weights w_k (FLoRA, FedEx-LoRA: p_k = n_k / Σ n).

    Returns
    -------
    (m, n) float64 tensor on the factors' device.
    """
    if B.ndim != 3 or A.ndim != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"expected B (K, m, r) and A (K, r, n), got {tuple(B.shape)} and "
                         f"{tuple(A.shape)}")
    if weights.shape != (B.shape[0],):
        raise ValueError(f"expected weights ({B.shape[0]},), got {tuple(weights.shape)}")
    K, m, r = B.shape
    w = weights.to(device=B.device, dtype=torch.float64)
    B_stack = (w[:, None, None] * B.double()).permute(1, 0, 2).reshape(m, K * r)  # (m, K r)
    A_stack = A.double().reshape(K * r, A.shape[2])  # (K r, n)
    return B_stack @ A_stack
