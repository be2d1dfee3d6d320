"""Refactorization from r × r Gram matrices: one read pass, float64 cores, one write pass.

With G_A = A Aᵀ = P D Pᵀ, X = G_A^{-½} (so Q = X A has orthonormal rows) and G_B = Bᵀ B:

    M = B A = (B X⁻¹) Q,   MᵀM = Qᵀ K Q  with  K = X⁻¹ G_B X⁻¹ = W Λ Wᵀ  (eigh, descending),
    so  V = Qᵀ W,  A' = Vᵀ = (Wᵀ X) A,  B' = M V = B (X⁻¹ W),  and B'A' = B X⁻¹ W Wᵀ X A = B A.

Only the two Grams (one read of B and A) and the two products with r × r matrices (one read,
one write) touch the big factors; everything r × r is float64. The product identity holds for
any orthogonal W, so an inaccurate G_B only blurs which direction is which, never B'A'.

Safety. A'A'ᵀ − I = X E Xᵀ + O(r ε κ) where E is the float32 rounding of G_A, so the error is
that of G_A amplified by κ(A)². Layers with κ(A) > KAPPA_MAX (or a singular or non-finite G_A)
are redone by the Householder path. For κ(A)² > VERIFY_KAPPA2, A'A'ᵀ is measured (its Gram is
accumulated while each chunk of A' is still in cache) and layers missing 25 ε are redone from
(B', A'), which has the same product. Below VERIFY_KAPPA2 (A already orthonormal, the FedSVD
steady state, or LoRA's Kaiming init with n ≫ r) that measurement would carry the same float32
rounding as G_A itself and is skipped. Graded spectra (σ_r ≲ √ε σ_1) come out mixed from the
float32 G_B; for those layers the Gram of B' is accumulated in the same pass and one more r × r
rotation resolves the small directions (:func:`refine`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels.lowrank import refactorize_householder, work_dtype

KAPPA_MAX = 4.0  # largest κ(A) for which one Gram pass is accurate enough
VERIFY_KAPPA2 = 2.0  # measure A'A'ᵀ only above this κ(A)²
GRADED = 1e-4  # λ_min / λ_max of K below which B' is checked (and maybe rotated again)
REFINE_TOL = 1e-3  # largest cosine between columns of B' left without a second rotation
CHUNK_BYTES = 2 << 20  # CPU: stream layers through a cache-sized buffer (in place, casts)


class Cores(NamedTuple):
    """Per-layer r × r float64 maps B' = B T_B, A' = T_A A, and which checks each layer needs."""

    T_B: Tensor  # (L, r, r) X⁻¹ W; identity where not ok
    T_A: Tensor  # (L, r, r) Wᵀ X = T_B⁻¹; identity where not ok
    ok: Tensor  # (L,) G_A finite, nonsingular, κ(A) ≤ KAPPA_MAX
    verify: Tensor  # (L,) κ(A)² > VERIFY_KAPPA2: measure A'A'ᵀ
    graded: Tensor  # (L,) λ_min(K) < GRADED λ_max(K): measure B'ᵀB'


def gram_cores(G_B: Tensor, G_A: Tensor) -> Cores:
    """The r × r float64 cores of the Gram path (module docstring).

    Parameters
    ----------
    G_B : Tensor, shape (L, r, r)
        Bᵀ B, float64.
    G_A : Tensor, shape (L, r, r)
        A Aᵀ, float64.

    Returns
    -------
    Cores
        T_B, T_A (L, r, r) and the masks ok, verify, graded (L,).
    """
    eye = torch.eye(G_A.shape[-1], dtype=G_A.dtype, device=G_A.device).expand_as(G_A)
    finite = torch.isfinite(G_B).all(dim=(1, 2)) & torch.isfinite(G_A).all(dim=(1, 2))
    G_A = torch.where(finite[:, None, None], G_A, eye)  # LAPACK must never see NaN
    D, P = torch.linalg.eigh(G_A)  # (L, r), (L, r, r), ascending
    ok = finite & (D[:, 0] > 0) & (D[:, 0] * KAPPA_MAX**2 >= D[:, -1])
    verify = D[:, 0] * VERIFY_KAPPA2 < D[:, -1]
    D = torch.where(ok[:, None], D, torch.ones_like(D))  # bad layers: X = I, then fall back
    P = torch.where(ok[:, None, None], P, eye)
    X = (P * D.rsqrt()[:, None, :]) @ P.mT  # (L, r, r) G_A^{-1/2}
    X_inv = (P * D.sqrt()[:, None, :]) @ P.mT  # (L, r, r) G_A^{1/2}
    G_B = torch.where(ok[:, None, None], G_B, torch.zeros_like(G_B))
    K = X_inv @ G_B @ X_inv  # (L, r, r) Gram of B X⁻¹
    lam, W = torch.linalg.eigh((K + K.mT) / 2)  # ascending
    W = W.flip(-1)  # (L, r, r) columns by descending σ²
    # Sign convention shared with the Householder path: diag(A'Aᵀ) = diag(Wᵀ X G_A) ≥ 0.
    overlap = torch.diagonal(W.mT @ X_inv, dim1=1, dim2=2)  # (L, r)
    W = W * torch.where(overlap < 0, -1.0, 1.0).to(W.dtype)[:, None, :]
    keep = ok[:, None, None]
    graded = ok & (lam[:, 0] < GRADED * lam[:, -1])
    return Cores(torch.where(keep, X_inv @ W, eye), torch.where(keep, W.mT @ X, eye), ok,
                 ok & verify, graded)


def _chunks(L: int, layer_bytes: int, device: torch.device) -> list[slice]:
    """Slices of the layer axis: cache-sized chunks on CPU, one slice on accelerators."""
    size = L if device.type != "cpu" else max(1, CHUNK_BYTES // max(layer_bytes, 1))
    return [slice(i, min(i + size, L)) for i in range(0, L, size)]


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _direct(out: Tensor, x: Tensor) -> bool:
    """Whether bmm may write straight into ``out`` (same dtype, contiguous, no aliasing)."""
    return out.dtype == x.dtype and out.is_contiguous() and not _same_memory(out, x)


def apply_cores(B: Tensor, A: Tensor, cores: Cores, B_out: Tensor,
                A_out: Tensor) -> tuple[Tensor, Tensor]:
    """B_out = B T_B and A_out = T_A A, chunk by chunk, with the Grams the checks need.

    B, A are in the working dtype; B_out, A_out may be B, A themselves (in place) or have
    another dtype (they are then written through a cache-sized buffer).

    Returns
    -------
    G_B' : Tensor, shape (L, r, r)
        float64 B'ᵀ B' where ``cores.graded`` (identity elsewhere), accumulated in cache.
    G_A' : Tensor, shape (L, r, r)
        float64 A' A'ᵀ where ``cores.verify`` (identity elsewhere), in working precision.
    """
    L, r, n = A.shape
    T_B, T_A = cores.T_B.to(A.dtype), cores.T_A.to(A.dtype)
    direct_B, direct_A = _direct(B_out, B), _direct(A_out, A)
    G_B = torch.eye(r, dtype=A.dtype, device=A.device).repeat(L, 1, 1)  # (L, r, r)
    G_A = G_B.clone()
    for s in _chunks(L, (B.shape[1] + n) * r * A.element_size(), A.device):
        cols = torch.bmm(B[s], T_B[s], out=B_out[s]) if direct_B else torch.bmm(B[s], T_B[s])
        if bool(cores.graded[s].any()):
            torch.bmm(cols.mT, cols, out=G_B[s])  # (l, r, r) while the columns are in cache
        if not direct_B:
            B_out[s].copy_(cols)
        rows = torch.bmm(T_A[s], A[s], out=A_out[s]) if direct_A else torch.bmm(T_A[s], A[s])
        if bool(cores.verify[s].any()):
            torch.bmm(rows, rows.mT, out=G_A[s])  # (l, r, r)
        if not direct_A:
            A_out[s].copy_(rows)
    return G_B.double(), G_A.double()


def refine(G_B: Tensor, B_out: Tensor, A_out: Tensor, ok: Tensor) -> None:
    """Rotate (B', A') in place where the columns of B' are not orthogonal enough.

    Float32 rounding of Bᵀ B is ε‖B‖², so directions with σ_i ≲ √ε σ_1 come out mixed. In
    B' = B T_B the Gram error is ε‖b'_i‖‖b'_j‖, relative to each column (one-sided Jacobi), so
    one float64 eigh of G_B' = B'ᵀ B' = W Λ Wᵀ and B' ← B' W, A' ← Wᵀ A' resolves them. The
    rotation is orthogonal: B'A' and A'A'ᵀ are unchanged. Only layers in ``ok`` whose normalized
    off-diagonal |G_ij| / √(G_ii G_jj) exceeds REFINE_TOL are touched (one more pass).
    """
    d = torch.diagonal(G_B, dim1=1, dim2=2).clamp_min(torch.finfo(G_B.dtype).tiny).sqrt()
    C = G_B / d[:, :, None] / d[:, None, :]  # (L, r, r) cosines between columns of B'
    off = (C - torch.diag_embed(torch.diagonal(C, dim1=1, dim2=2))).abs().amax(dim=(1, 2))
    idx = (ok & (off > REFINE_TOL)).nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    _, W = torch.linalg.eigh(G_B[idx])
    W = W.flip(-1)  # (l, r, r) descending σ²
    W = W * torch.where(torch.diagonal(W, dim1=1, dim2=2) < 0, -1.0, 1.0)[:, None, :]
    work = work_dtype(B_out.dtype, A_out.dtype)
    W = W.to(work)
    B_out[idx] = (B_out[idx].to(work) @ W).to(B_out.dtype)  # (l, m, r)
    A_out[idx] = (W.mT @ A_out[idx].to(work)).to(A_out.dtype)  # (l, r, n)


def refactorize_gram(B: Tensor, A: Tensor, B_out: Tensor, A_out: Tensor) -> Tensor:
    """B' = U Σ, A' = Vᵀ of every B A by the Gram path, written into B_out, A_out.

    Parameters
    ----------
    B : Tensor, shape (L, m, r)
    A : Tensor, shape (L, r, n)
        Input stacks, any real floating dtype, r ≤ min(m, n).
    B_out : Tensor, shape (L, m, r)
    A_out : Tensor, shape (L, r, n)
        Output stacks; may be B and A themselves (in place).

    Returns
    -------
    Tensor, shape (L,), bool
        Which layers were redone by the Householder fallback.
    """
    work = work_dtype(B.dtype, A.dtype)
    Bw, Aw = B.to(work), A.to(work)  # no copy for float32 input
    G_B = (Bw.mT @ Bw).double()  # (L, r, r)
    G_A = (Aw @ Aw.mT).double()  # (L, r, r)
    cores = gram_cores(G_B, G_A)
    G_Bnew, G_Anew = apply_cores(Bw, Aw, cores, B_out, A_out)  # (L, r, r) each
    eye = torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
    tol = 25 * torch.finfo(work).eps  # 3e-6 in float32: a 1e-5 guarantee with margin
    ok = cores.ok & ((G_Anew - eye).abs().amax(dim=(1, 2)) <= tol)
    refine(G_Bnew, B_out, A_out, ok & cores.graded)
    redo = ~ok
    if bool(redo.any()):  # redo from the inputs, or in place from (B', A'): same product
        idx = redo.nonzero().squeeze(1)
        src_B = B_out if _same_memory(B_out, B) else B
        src_A = A_out if _same_memory(A_out, A) else A
        B_fix, A_fix = refactorize_householder(src_B[idx].to(work), src_A[idx].to(work))
        B_out[idx] = B_fix.to(B_out.dtype)
        A_out[idx] = A_fix.to(A_out.dtype)
    return redo
