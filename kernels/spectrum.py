"""The spectrum of a LoRA update against its pretrained weight: effective rank and intruders.

Shapes follow ``nn.Linear``: W0 (L, m, n) = (L, d_out, d_in), ΔW = s · B A with B (L, m, r) and
A (L, r, n), W = W0 + ΔW. Everything is batched over the leading L (a stack of same-shape
layers), computed in float32 (float64 if given; bfloat16/float16 are upcast) and returned as
float32/int64 on the inputs' device.

- :func:`effective_rank` of singular values: Roy & Vetterli, "The effective rank: a measure
  of effective dimensionality" (EUSIPCO 2007), the exponential of the Shannon entropy of the
  L1-normalised singular values:
  erank(σ) = exp(H(p)), p_i = σ_i / Σ_j σ_j, H(p) = −Σ_i p_i log p_i (0 log 0 = 0).
  It is 1 for a rank-one matrix, q for q equal singular values and 0 here for a zero matrix
  (which has no direction at all; Roy & Vetterli leave it undefined).
- :func:`intruder_similarity` / :func:`count_intruders`: Shuttleworth, Andreas, Torralba &
  Sharma, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228),
  Algorithm 1. With W0 = U0 Σ0 V0ᵀ and W = U Σ Vᵀ (thin SVDs, singular values descending), the
  j-th left singular vector y_j = U[:, j] of W is an *intruder dimension* when
  max_i |cos(y_j, x_i)| < ε over every left singular vector x_i = U0[:, i] of W0
  (i ≤ min(m, n)), counted among the top k (j ≤ k). The vectors are unit, so the cosine is the
  dot product; |·| because a singular vector's sign is arbitrary. The paper sweeps ε and
  examines a small k; peft's ``reduce_intruder_dimension`` (``peft.tuners.lora.intruders``),
  which implements the paper, defaults to k = 10 and ε = 0.5, as does this project.
- :func:`row_orthonormality_gap`: ‖A Aᵀ − I_r‖_F, 0 exactly when the r rows of A (r, n) are
  orthonormal (FedSVD's refactorization keeps them so: A ← Vᵀ).

Where W0 has repeated singular values its singular vectors within that eigenspace are not
unique, and the cosine against one basis of it is basis dependent; pretrained weights have
distinct singular values, test matrices should too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _work(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 already."""
    return t if t.dtype == torch.float64 else t.float()


def _check_stack(name: str, t: Tensor) -> None:
    if t.ndim != 3 or 0 in t.shape[1:]:
        raise ValueError(f"{name} must be a stack (L, rows, cols) of non-empty matrices; got "
                         f"shape {tuple(t.shape)} (for one matrix, pass {name}[None])")


@torch.no_grad()
def effective_rank(singular_values: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank exp(H(σ / ‖σ‖₁)) of each row of (L, p) singular values.

    Returns (L,) float32; 0 where every σ_i is 0. Order does not matter; σ_i must be ≥ 0.
    """
    if singular_values.ndim != 2:
        raise ValueError(f"expected singular values (L, p); got {tuple(singular_values.shape)}")
    s = singular_values.double()
    if bool((s < 0).any()):
        raise ValueError("singular values must be >= 0")
    total = s.sum(dim=1, keepdim=True)  # (L, 1)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)  # (L, p); 0 rows stay 0
    entropy = -torch.special.xlogy(p, p).sum(dim=1)  # (L,), 0 log 0 = 0
    return torch.where(total[:, 0] > 0, entropy.exp(), 0.0).float()


@torch.no_grad()
def intruder_similarity(W0: Tensor, W: Tensor, k: int = 10) -> Tensor:
    """For each of the top-k left singular vectors y_j of W, max_i |⟨y_j, x_i⟩| over W0's.

    Parameters
    ----------
    W0 : (L, m, n) the pretrained weights.
    W : (L, m, n) the fine-tuned weights W0 + ΔW.
    k : how many of W's top singular vectors to examine (capped at min(m, n)).

    Returns
    -------
    (L, min(k, m, n)) float32 in [0, 1], column j for W's (j+1)-th largest singular value; an
    entry below ε marks an intruder (:func:`count_intruders`).
    """
    _check_stack("W0", W0)
    if W.shape != W0.shape:
        raise ValueError(f"W {tuple(W.shape)} and W0 {tuple(W0.shape)} differ in shape")
    if k < 1:
        raise ValueError(f"k={k}: examine at least one singular vector")
    U0 = torch.linalg.svd(_work(W0), full_matrices=False).U  # (L, m, p), p = min(m, n)
    U = torch.linalg.svd(_work(W), full_matrices=False).U[..., :k]  # (L, m, k')
    cosines = (U.mT @ U0).abs()  # (L, k', p): |⟨y_j, x_i⟩|
    return cosines.amax(dim=2).float()  # (L, k')


def count_intruders(similarity: Tensor, epsilon: float = 0.5) -> Tensor:
    """The intruders of each layer: entries of (L, k) similarities below ``epsilon``, (L,) int64."""
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon={epsilon}: a cosine threshold in (0, 1]")
    return (similarity < epsilon).sum(dim=1)


@torch.no_grad()
def row_orthonormality_gap(A: Tensor) -> Tensor:
    """‖A Aᵀ − I_r‖_F for each A (r, n) of the stack (L, r, n): (L,) float32, 0 if orthonormal."""
    _check_stack("A", A)
    A = _work(A)
    gram = A @ A.mT  # (L, r, r)
    eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(gram - eye).float()  # Frobenius, (L,)
