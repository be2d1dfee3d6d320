"""FedSVD refactorization of stacked LoRA pairs: B' A' = B A, A' = top right singular vectors.

FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805, Sec. 3): after averaging B, the server
re-factors M = B̄ A_prev = U Σ Vᵀ as A ← Vᵀ[:r] (orthonormal rows) and B ← U[:, :r] Σ[:r], so
the model function is unchanged and ‖A‖₂ = 1 for the next round's DP-SGD on B.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.gram import refactorize_gram
from kernels.lowrank import Sigma, check_pair, check_sigma, refactorize_householder, split_sqrt


@torch.no_grad()
def refactorize(B: Tensor, A: Tensor, sigma: Sigma = "B", *,
                out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Re-factor every M_l = B_l A_l as B'_l A'_l from its SVD, never forming M_l (m × n).

    With M = U Σ Vᵀ (thin SVD, singular values descending):
    ``sigma="B"`` (FedSVD's choice): B' = U_r Σ_r, A' = V_rᵀ, so A' A'ᵀ = I_r;
    ``sigma="sqrt"`` (the paper's ablation): B' = U_r Σ_r^½, A' = Σ_r^½ V_rᵀ, so the rows of A'
    are orthogonal but not orthonormal (A' A'ᵀ = Σ_r).

    Parameters
    ----------
    B : Tensor, shape (L, m, r)
        Stacked LoRA B factors, e.g. the clients' weighted mean B̄ of each layer.
    A : Tensor, shape (L, r, n)
        Stacked LoRA A factors (the previous round's A).
    sigma : {"B", "sqrt"}
        Which factor carries the singular values.
    out : tuple of Tensor, optional
        (B_out (L, m, r), A_out (L, r, n)) to write the result into, on the device of B; may be
        (B, A) themselves to refactorize in place (no new memory for the big factors).

    Returns
    -------
    B_new : Tensor, shape (L, m, r)
        U_r Σ_r (or U_r Σ_r^½), dtype and device of B (or out[0]).
    A_new : Tensor, shape (L, r, n)
        V_rᵀ (or Σ_r^½ V_rᵀ), dtype and device of A (or out[1]).

    Notes
    -----
    Method: r × r Gram matrices of B and A, float64 eigen-decompositions, one pass writing
    B' = B T_B and A' = T_A A (``kernels.gram``: about 4 (m + n) r² flops per layer), with a
    per-layer fallback to Householder QR of both factors (``kernels.lowrank``) when κ(A) > 4 or
    A is rank-deficient, when the measured orthonormality of A' misses 25 ε (checked for
    κ(A)² > 2), or when r > min(m, n). B' A' = B A up to rounding of the
    working precision (float32, or float64 for float64 inputs; bfloat16 and float16 are computed
    in float32 and rounded back). If rank(B A) < r (B = 0, identical clients), the missing
    directions of A' are taken from the row space of A, still orthonormal; B = 0 gives B' = 0
    exactly. If r > n, A' can only hold n orthonormal rows and its last r − n rows (and those
    columns of B') are zero. Signs follow diag(A' Aᵀ) ≥ 0, so an already refactorized pair is
    returned unchanged up to rounding.

    Raises
    ------
    ValueError
        If the shapes do not chain (the message names both shapes), sigma is unknown, ``out``
        does not match, or the inputs are not finite.
    TypeError
        If an input is not a real floating point tensor.
    """
    check_sigma(sigma)
    check_pair(B, A)
    B_out, A_out = _outputs(B, A, out)
    L, m, r = B.shape
    if L == 0:
        return B_out, A_out
    if r <= min(m, A.shape[2]):
        refactorize_gram(B, A, B_out, A_out)
    else:  # structurally rank-deficient: only Householder gives exact zeros and full rank A'
        B_new, A_new = refactorize_householder(B, A)
        B_out.copy_(B_new)
        A_out.copy_(A_new)
    if sigma == "sqrt":
        B_new, A_new = split_sqrt(B_out, A_out)
        B_out.copy_(B_new)
        A_out.copy_(A_new)
    return B_out, A_out


def _outputs(B: Tensor, A: Tensor, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """New output stacks like (B, A), or the validated ``out`` pair."""
    if out is None:
        return torch.empty_like(B), torch.empty_like(A)
    B_out, A_out = out
    if B_out.shape != B.shape or A_out.shape != A.shape:
        raise ValueError(f"out has shapes {tuple(B_out.shape)} and {tuple(A_out.shape)}; need "
                         f"those of B {tuple(B.shape)} and A {tuple(A.shape)}")
    if B_out.device != B.device or A_out.device != A.device:
        raise ValueError(f"out is on {B_out.device} / {A_out.device}, inputs on {B.device}")
    if not (B_out.is_floating_point() and A_out.is_floating_point()):
        raise TypeError(f"out must be floating point; got {B_out.dtype} and {A_out.dtype}")
    return B_out, A_out
