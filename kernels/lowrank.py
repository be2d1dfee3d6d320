"""SVD of a product of thin factors, M = B A, without ever forming the m × n matrix M.

Identity used throughout (thin QR of each factor, then an r × r core):

    B = Q_B R_B,  Aᵀ = Q_A R_A   ⇒   M = Q_B (R_B R_Aᵀ) Q_Aᵀ = Q_B (U_c Σ V_cᵀ) Q_Aᵀ,
    so  U = Q_B U_c,  V = Q_A V_c  (both with orthonormal columns).

Householder QR is stable for rank-deficient factors (B = 0, identical clients): Q stays
orthonormal whatever the rank, so A' = Vᵀ always has orthonormal rows. The big factors are
processed in float32 (float64 if given float64), the r × r cores in float64; results are cast
back to the input dtype. Cost O((m + n) r² + r³) per layer, batched over a leading L axis.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.ndim != 3 or A.ndim != 3:
        raise ValueError(f"expected stacks B (L, m, r) and A (L, r, n); got shapes "
                         f"{tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain: need "
                         "B (L, m, r) and A (L, r, n) with the same L and r")
    if B.device != A.device:
        raise ValueError(f"B is on {B.device} and A on {A.device}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lowrank_svd(B: Tensor, A: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of every M_l = B_l A_l, never forming M_l.

    Parameters
    ----------
    B : (L, m, r) left factors.
    A : (L, r, n) right factors.
    k : number of components to keep (default r; at most min(m, n, r)).

    Returns
    -------
    U : (L, m, k) orthonormal columns.
    S : (L, k) singular values, descending, float64-accurate, in the working dtype.
    Vh : (L, k, n) orthonormal rows.
    """
    _check_pair(B, A)
    L, m, r = B.shape
    n = A.shape[2]
    k = min(r, m, n) if k is None else k
    if not 1 <= k <= min(r, m, n):
        raise ValueError(f"k={k}: must be in [1, min(r, m, n)] = [1, {min(r, m, n)}]")
    work = _work_dtype(B.dtype)
    Q_B, R_B = torch.linalg.qr(B.to(work))  # (L, m, p), (L, p, r), p = min(m, r)
    Q_A, R_A = torch.linalg.qr(A.to(work).mT)  # (L, n, s), (L, s, r), s = min(n, r)
    core = R_B.double() @ R_A.double().mT  # (L, p, s)
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)  # (L,p,t), (L,t), (L,t,s)
    U = Q_B @ U_c[..., :k].to(work)  # (L, m, k)
    Vh = Vh_c[:, :k].to(work) @ Q_A.mT  # (L, k, n)
    return U, S[:, :k].to(work), Vh


def refactorize(B: Tensor, A: Tensor,
                sigma: Literal["B", "sqrt"] = "B") -> tuple[Tensor, Tensor]:
    """FedSVD refactorization of every layer: B' A' = B A, with A' from the right singular vectors.

    Parameters
    ----------
    B : (L, m, r) stacked LoRA B factors (e.g. the clients' weighted mean B̄).
    A : (L, r, n) stacked LoRA A factors (the previous round's A).
    sigma : where Σ goes. ``"B"`` (FedSVD): B' = U_r Σ_r, A' = V_rᵀ with orthonormal rows.
        ``"sqrt"``: B' = U_r Σ_r^½, A' = Σ_r^½ V_rᵀ (rows of A' orthogonal, not orthonormal).

    Returns
    -------
    (B', A') with the shapes and dtype of (B, A). If r > min(m, n), the extra columns of B'
    and rows of A' are zero.
    """
    if sigma not in ("B", "sqrt"):
        raise ValueError(f"sigma={sigma!r}: expected 'B' or 'sqrt'")
    _check_pair(B, A)
    L, m, r = B.shape
    n = A.shape[2]
    k = min(r, m, n)
    U, S, Vh = lowrank_svd(B, A, k)  # (L, m, k), (L, k), (L, k, n)
    if sigma == "B":
        B_new, A_new = U * S[:, None, :], Vh
    else:
        root = S.clamp_min(0).sqrt()
        B_new, A_new = U * root[:, None, :], root[:, :, None] * Vh
    if k < r:  # pad the unusable rank with zeros: B'A' is unchanged
        B_new = torch.cat([B_new, B_new.new_zeros(L, m, r - k)], dim=2)
        A_new = torch.cat([A_new, A_new.new_zeros(L, r - k, n)], dim=1)
    return B_new.to(B.dtype), A_new.to(A.dtype)
