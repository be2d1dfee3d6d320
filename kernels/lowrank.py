"""SVD of a product of thin factors, M = B A, without ever forming the m × n matrix M.

Identity used throughout (thin Householder QR of each factor, then a small core):

    B = Q_B R_B,  Aᵀ = Q_A R_A   ⇒   M = Q_B (R_B R_Aᵀ) Q_Aᵀ = Q_B (U_c Σ V_cᵀ) Q_Aᵀ,
    so  U = Q_B U_c,  V = Q_A V_c  (both with orthonormal columns).

Householder QR is backward stable whatever the rank of the factor (B = 0 at round 0, identical
clients, duplicated columns): Q stays orthonormal, so A' = Vᵀ always has orthonormal rows. The
big factors are processed in float32 (float64 if either input is float64; bfloat16/float16 are
upcast), the cores in float64, and results are cast back to the input dtypes. Cost per layer is
O((m + n) r² + r³) flops instead of O(m n min(m, n)), batched over a leading L axis (no Python
loop over layers). Nothing here is differentiable: all kernels run under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Sigma = Literal["B", "sqrt"]


def check_pair(B: Tensor, A: Tensor) -> None:
    """Raise unless B (L, m, r) and A (L, r, n) are chainable real floating stacks on one device.

    Raises
    ------
    TypeError
        If either tensor is not real floating point.
    ValueError
        If the shapes do not chain, a dimension other than L is zero, or the devices differ.
    """
    if not (B.is_floating_point() and A.is_floating_point()):
        raise TypeError(f"B and A must be real floating point tensors; got {B.dtype} and "
                        f"{A.dtype} (cast with .float())")
    if B.ndim != 3 or A.ndim != 3:
        raise ValueError(f"expected stacks B (L, m, r) and A (L, r, n); got shapes "
                         f"B {tuple(B.shape)} and A {tuple(A.shape)} (for one layer, use "
                         "B[None] and A[None])")
    if B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain: need "
                         "B (L, m, r) and A (L, r, n) with the same L and r")
    if 0 in B.shape[1:] or A.shape[2] == 0:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)}: m, r and n must be ≥ 1")
    if B.device != A.device:
        raise ValueError(f"B is on {B.device} and A on {A.device}; move both to one device")


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Precision of the big factors: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_finite(core: Tensor, what: str) -> None:
    """Raise ValueError if a small (L, p, q) core holds NaN or ±inf (then so did the inputs)."""
    if not bool(torch.isfinite(core).all()):
        raise ValueError(f"{what} contains NaN or inf; the input factors are not finite (or "
                         "overflow float32: rescale them)")


def _core_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Thin QR of both factors and the full SVD of the float64 core.

    Returns Q_B (L, m, p), U_c (L, p, p), S (L, t), Vh_c (L, s, s), Q_A (L, n, s) with
    p = min(m, r), s = min(n, r), t = min(p, s). Vh_c is square, so Vh_c Q_Aᵀ has s
    orthonormal rows even when the rank of B A is below s.
    """
    work = work_dtype(B.dtype, A.dtype)
    Q_B, R_B = torch.linalg.qr(B.to(work))  # (L, m, p), (L, p, r)
    Q_A, R_A = torch.linalg.qr(A.to(work).mT)  # (L, n, s), (L, s, r)
    core = R_B.double() @ R_A.double().mT  # (L, p, s) = Q_Bᵀ M Q_A
    check_finite(core, "the core R_B R_Aᵀ")
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=True)  # (L,p,p), (L,t), (L,s,s)
    # Sign convention (SVD signs are arbitrary): row i of A' = Vh_c Q_Aᵀ has a nonnegative
    # overlap with row i of A, i.e. diag(A' Aᵀ) = diag(Vh_c R_A) ≥ 0. A fixed point of
    # refactorize (A orthonormal, B with orthogonal columns) is then returned unchanged.
    t = S.shape[-1]
    overlap = torch.diagonal(Vh_c @ R_A.double()[..., :, : Vh_c.shape[-1]], dim1=-2, dim2=-1)
    flip = torch.where(overlap < 0, -1.0, 1.0).to(torch.float64)  # (L, s)
    Vh_c = Vh_c * flip[..., :, None]
    U_c = torch.cat([U_c[..., :t] * flip[..., None, :t], U_c[..., t:]], dim=-1)
    return Q_B, U_c, S, Vh_c, Q_A


@torch.no_grad()
def lowrank_svd(B: Tensor, A: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of every M_l = B_l A_l, never forming the m × n matrix M_l.

    M = Q_B R_B R_Aᵀ Q_Aᵀ with Householder QRs B = Q_B R_B and Aᵀ = Q_A R_A, and the float64
    core R_B R_Aᵀ = U_c Σ V_cᵀ, so U = Q_B U_c and Vᵀ = V_cᵀ Q_Aᵀ (module docstring).

    Parameters
    ----------
    B : Tensor, shape (L, m, r)
        Left factors.
    A : Tensor, shape (L, r, n)
        Right factors.
    k : int, optional
        Number of components to keep, 1 ≤ k ≤ min(m, n, r) (the rank bound of B A). Default
        min(m, n, r).

    Returns
    -------
    U : Tensor, shape (L, m, k)
        Left singular vectors, orthonormal columns, dtype of B.
    S : Tensor, shape (L, k)
        Singular values, descending, computed in float64, returned in the dtype of B.
    Vh : Tensor, shape (L, k, n)
        Right singular vectors as orthonormal rows, dtype of A.

    Raises
    ------
    ValueError
        On shapes that do not chain, k out of range, or non-finite inputs.
    """
    check_pair(B, A)
    _, m, r = B.shape
    n = A.shape[2]
    kmax = min(m, n, r)
    k = kmax if k is None else k
    if not 1 <= k <= kmax:
        raise ValueError(f"k={k} is out of range: B {tuple(B.shape)} and A {tuple(A.shape)} "
                         f"need 1 ≤ k ≤ min(m, n, r) = {kmax}")
    work = work_dtype(B.dtype, A.dtype)
    Q_B, U_c, S, Vh_c, Q_A = _core_svd(B, A)
    U = Q_B @ U_c[..., :k].to(work)  # (L, m, k)
    Vh = Vh_c[..., :k, :].to(work) @ Q_A.mT  # (L, k, n)
    return U.to(B.dtype), S[..., :k].to(B.dtype), Vh.to(A.dtype)


@torch.no_grad()
def refactorize_householder(B: Tensor, A: Tensor,
                            sigma: Sigma = "B") -> tuple[Tensor, Tensor]:
    """:func:`kernels.refactorize` by Householder QR of both factors (robust reference path).

    Same contract as :func:`kernels.refactorize`; slower, but backward stable for any rank or
    conditioning. Used as the fallback of the Gram path.
    """
    check_sigma(sigma)
    check_pair(B, A)
    r = B.shape[2]
    work = work_dtype(B.dtype, A.dtype)
    Q_B, U_c, S, Vh_c, Q_A = _core_svd(B, A)
    t = S.shape[-1]  # min(m, n, r): the rank bound of B A
    # B' = U Σ (identity: B A = (Q_B U_c Σ)(V_cᵀ Q_Aᵀ)); directions of V beyond rank t get a
    # zero column in B', so A' keeps s = min(n, r) orthonormal rows even when m < r.
    B_new = Q_B @ (U_c[..., :t] * S[..., None, :]).to(work)  # (L, m, t)
    A_new = Vh_c.to(work) @ Q_A.mT  # (L, s, n)
    B_new = _pad(B_new, 2, r)  # (L, m, r)
    A_new = _pad(A_new, 1, r)  # (L, r, n): zero rows only if r > n (no room in R^n)
    if sigma == "sqrt":
        B_new, A_new = split_sqrt(B_new, A_new)
    return B_new.to(B.dtype), A_new.to(A.dtype)


def check_sigma(sigma: str) -> None:
    """Raise ValueError unless ``sigma`` is "B" or "sqrt"."""
    if sigma not in ("B", "sqrt"):
        raise ValueError(f"sigma={sigma!r}: expected 'B' (B' = UΣ, A' = Vᵀ, FedSVD) or 'sqrt' "
                         "(B' = UΣ^½, A' = Σ^½Vᵀ)")


def split_sqrt(B_new: Tensor, A_new: Tensor) -> tuple[Tensor, Tensor]:
    """Move Σ^½ from B' = UΣ to A' = Vᵀ: returns (UΣ^½, Σ^½Vᵀ), product unchanged.

    σ_i is taken as the float64 norm of column i of B' (exact for what B' holds), so each
    rank-one term b_i a_iᵀ is only rescaled: (b_i / √σ_i)(√σ_i a_i)ᵀ. A zero column stays zero
    and zeroes its row of A'.
    """
    S = torch.linalg.vector_norm(B_new.double(), dim=1)  # (L, r)
    root = S.sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return ((B_new.double() * inv[:, None, :]).to(B_new.dtype),  # (L, m, r)
            (A_new.double() * root[:, :, None]).to(A_new.dtype))  # (L, r, n)


def _pad(x: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pad dimension ``dim`` of ``x`` up to ``size``."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
