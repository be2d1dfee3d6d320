"""Merge several low-rank deltas by pooling their rank-one SVD components (never m × n).

AXIS (arXiv 2508.19353): each source Δ_s = B_s A_s = Σ_i σ_si u_si v_siᵀ gives its rank-one
triplets to one pool; the top-k triplets are summed, Δ = Σ_(top k) σ u vᵀ, and re-orthogonalized
by a second SVD, because vectors from different sources are not orthogonal. Each source's
triplets come from the FedSVD refactorization (:func:`kernels.refactorize`, r × r Gram cores:
B' = U Σ, A' = Vᵀ); the sum is kept factored, Δ = (U_sel Σ_sel) V_selᵀ, and its SVD comes from
QRs of the two thin factors and a k × k float64 core (:func:`kernels.lowrank_svd`). One more
source is folded in by Brand's incremental SVD (Brand 2006, Sec. 2): project it on the current
bases, QR the residuals and take the SVD of a (k + r) × (k + r) core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from kernels.lowrank import check_finite, check_pair, lowrank_svd, work_dtype
from kernels.refactor import refactorize

RankBy = Literal["sigma", "normalized", "quota"]
RANK_BY: tuple[str, ...] = get_args(RankBy)


class SVDFactors(NamedTuple):
    """A batched thin SVD U diag(S) Vh: U (L, m, k), S (L, k) descending, Vh (L, k, n)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def pair(self) -> tuple[Tensor, Tensor]:
        """(B, A) = (U diag(S), Vh): the LoRA pair with Σ in B, as FedSVD stores it."""
        return self.U * self.S[:, None, :], self.Vh


def _scores(S: list[Tensor], S_w: list[Tensor], k: int, rank_by: RankBy) -> Tensor:
    """(L, R) selection scores of the pooled components; the top k of each row are kept.

    S are the sources' singular values, S_w the same scaled by |w_s|.
    """
    raw = torch.cat(S_w, dim=1)  # (L, R)
    if rank_by == "sigma":
        return raw
    if rank_by == "normalized":  # σ / σ_max of its source: big deltas do not dominate
        # from the unscaled σ, so equal spectra tie exactly whatever the weights' rounding
        return torch.cat([s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny) for s in S], dim=1)
    quota = k // len(S)  # each source's own top quota first, the rest by raw σ
    bonus = torch.cat([(torch.arange(s.shape[1], device=s.device) < quota).to(s.dtype)
                       .expand_as(s) for s in S_w], dim=1)
    return raw / raw.amax(dim=1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny) + 2 * bonus


def _top_k(scores: Tensor, raw: Tensor, k: int) -> Tensor:
    """(L, k) indices of the k best scores; ties go to the larger |w| σ, then the earlier source.

    Ties are common, not corner cases: with ``rank_by="normalized"`` every source's top
    component scores exactly 1. Two stable sorts make the choice deterministic.
    """
    by_raw = torch.sort(raw, dim=1, descending=True, stable=True).indices  # (L, R)
    by_score = torch.sort(torch.gather(scores, 1, by_raw), dim=1, descending=True,
                          stable=True).indices  # (L, R)
    return torch.gather(by_raw, 1, by_score[:, :k])


@torch.no_grad()
def top_components(sources: Sequence[tuple[Tensor, Tensor]], k: int, rank_by: RankBy = "sigma",
                   weights: Sequence[float] | None = None,
                   overwrite_sources: bool = False) -> SVDFactors:
    """Rank-k SVD of the sum of the top-k rank-one components pooled across sources.

    Δ = Σ_{(s, i) ∈ top k} w_s σ_si u_si v_siᵀ, returned re-orthogonalized as U diag(S) Vh.

    Parameters
    ----------
    sources : sequence of (B_s (L, m, r_s), A_s (L, r_s, n))
        Low-rank deltas Δ_s = B_s A_s of the same L, m, n; ranks r_s may differ.
    k : int
        Components kept, 1 ≤ k ≤ Σ_s min(m, n, r_s) (and k ≤ min(m, n)).
    rank_by : {"sigma", "normalized", "quota"}
        ``"sigma"``: by |w_s| σ_si (AXIS, raw σ); ``"normalized"``: by σ_si / σ_s1, so each
        source's spectrum counts relative to its own top; ``"quota"``: each source keeps its own
        top ⌊k / T⌋, the remaining slots go by |w_s| σ_si.
    weights : sequence of float, optional
        w_s, scaling source s (task-arithmetic λ or a data share); default 1. A negative w_s
        subtracts the source.
    overwrite_sources : bool
        Let the per-source refactorization write into the sources' own tensors instead of new
        ones (as SciPy's ``overwrite_a``): for callers that stacked the sources themselves.
        Saves one allocation of every source's factors, which at 16 sources of RoBERTa-large
        shapes is 100 MB of first-touch page faults, a third of the merge.

    Returns
    -------
    SVDFactors
        U (L, m, k), S (L, k) descending, Vh (L, k, n), in the working dtype of the sources
        (float32, or float64 if any source is float64). ``.pair()`` gives (U S, Vh).
    """
    if not sources:
        raise ValueError("top_components needs at least one (B, A) source")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}: one of {RANK_BY}")
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
    for B, A in sources:
        check_pair(B, A)
        if (B.shape[0], B.shape[1], A.shape[2]) != (sources[0][0].shape[0],
                                                     sources[0][0].shape[1],
                                                     sources[0][1].shape[2]):
            raise ValueError(f"source B {tuple(B.shape)}, A {tuple(A.shape)} does not match the "
                             f"first source's (L, m, n) = {tuple(sources[0][0].shape[:2])}, "
                             f"{sources[0][1].shape[2]}")
    work = work_dtype(*(t.dtype for pair in sources for t in pair))
    parts = [_components(B.to(work), A.to(work), overwrite_sources) for B, A in sources]
    m, n = sources[0][0].shape[1], sources[0][1].shape[2]
    pool = sum(S.shape[1] for _, S, _, _ in parts)
    if not 1 <= k <= min(pool, m, n):
        raise ValueError(f"k={k}: need 1 ≤ k ≤ min(pooled components {pool}, m {m}, n {n})")
    S_w = [S * abs(w) for (_, S, _, _), w in zip(parts, weights, strict=True)]
    raw = torch.cat(S_w, dim=1)  # (L, R)
    idx = _top_k(_scores([S for _, S, _, _ in parts], S_w, k, rank_by), raw, k)  # (L, k)
    B_sel, Vh_sel = _gather_selected(parts, weights, idx)  # (L, m, k), (L, k, n)
    return SVDFactors(*lowrank_svd(B_sel, Vh_sel, k))


def _components(B: Tensor, A: Tensor,
                overwrite: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One source's rank-one components: U diag(S) (L, m, t), S (L, t), Vh (L, t, n), order.

    t = min(m, n, r). FedSVD's refactorization (:func:`kernels.refactorize`: two r × r Grams,
    float64 cores, one pass over the factors, per-layer Householder fallback) gives B' = U Σ and
    A' = Vh; S are the column norms of B', sorted descending, and ``order`` (L, t) maps sorted
    positions to columns (the Gram path may order near-equal σ otherwise). U alone is never
    needed: the merge sums σ u vᵀ. Several times cheaper than :func:`lowrank_svd`, whose two
    Householder QRs work in LAPACK panels only r wide. ``overwrite``: write into B and A.
    """
    t = min(B.shape[1], A.shape[2], B.shape[2])
    # (L, m, r), (L, r, n); beyond t: zero columns / rows
    B_new, A_new = refactorize(B, A, out=(B, A) if overwrite else None)
    B_new, A_new = B_new[:, :, :t], A_new[:, :t]
    norms = torch.diagonal(B_new.mT @ B_new, dim1=1, dim2=2).sqrt()  # (L, t), one bmm pass
    S, order = torch.sort(norms, dim=1, descending=True, stable=True)  # (L, t), (L, t)
    return B_new, S, A_new, order


def _gather_selected(parts: list[tuple[Tensor, Tensor, Tensor, Tensor]], weights: list[float],
                     idx: Tensor) -> tuple[Tensor, Tensor]:
    """w_s σ u (L, m, k) and vᵀ (L, k, n) of the selected pooled components.

    Pooled index j of source s (offset o_s) is column ``order_s[j − o_s]`` of its U Σ. Only the
    selected columns and rows are copied, source by source: the sources' factors are never
    concatenated into (L, m, R).
    """
    L, k = idx.shape
    m, n = parts[0][0].shape[1], parts[0][2].shape[2]
    B_sel = parts[0][0].new_zeros(L, m, k)
    Vh_sel = parts[0][2].new_zeros(L, k, n)
    offset = 0
    for (US, S, Vh, order), w in zip(parts, weights, strict=True):
        local = idx - offset  # (L, k)
        offset += S.shape[1]
        layer, slot = ((local >= 0) & (local < S.shape[1])).nonzero(as_tuple=True)  # (N,) each
        if layer.numel() == 0:
            continue
        col = order[layer, local[layer, slot]]  # (N,) columns of this source's U Σ
        B_sel[layer, :, slot] = w * US[layer, :, col]  # (N, m)
        Vh_sel[layer, slot, :] = Vh[layer, col, :]  # (N, n)
    return B_sel, Vh_sel


@torch.no_grad()
def add_source(factorization: SVDFactors | tuple[Tensor, Tensor, Tensor], B: Tensor, A: Tensor,
               k: int, weight: float = 1.0) -> SVDFactors:
    """Brand's incremental SVD: the rank-k truncation of U diag(S) Vh + w B A.

    With V = Vhᵀ, P = Uᵀ B, B − U P = J R_J (QR), P_A = Vh Aᵀ and Aᵀ − V P_A = K R_K, the sum is
    [U J] ([diag S, 0; 0, 0] + w [P; R_J][P_A; R_K]ᵀ) [V K]ᵀ, so only the (k₀ + r)-sized core
    is decomposed. Projections are done twice (classical Gram–Schmidt with reorthogonalization).

    Parameters
    ----------
    factorization : SVDFactors or (U, S, Vh)
        Current U (L, m, k₀) with orthonormal columns, S (L, k₀), Vh (L, k₀, n) with
        orthonormal rows, e.g. from :func:`top_components`.
    B : Tensor, shape (L, m, r)
    A : Tensor, shape (L, r, n)
        The new source B A.
    k : int
        Rank kept, 1 ≤ k ≤ k₀ + r; k₀ + r ≤ min(m, n) is required.
    weight : float
        w, the scale of the new source.

    Returns
    -------
    SVDFactors
        U (L, m, k), S (L, k) descending, Vh (L, k, n). Equal to the SVD of the full sum
        truncated to k; with k ≥ k₀ + r nothing is dropped, so adding every source of
        :func:`top_components` one by one equals pooling them all with k = all components.
    """
    U, S, Vh = factorization
    check_pair(B, A)
    check_pair(U, Vh)
    if U.shape[:2] != B.shape[:2] or Vh.shape[2] != A.shape[2]:
        raise ValueError(f"source B {tuple(B.shape)}, A {tuple(A.shape)} does not match the "
                         f"factorization U {tuple(U.shape)}, Vh {tuple(Vh.shape)}")
    _, m, k0 = U.shape
    n, r = A.shape[2], A.shape[1]
    if k0 + r > min(m, n):
        raise ValueError(f"k₀ + r = {k0} + {r} exceeds min(m, n) = {min(m, n)}: the bases "
                         "[U J] cannot be orthonormal; merge from scratch with top_components")
    if not 1 <= k <= k0 + r:
        raise ValueError(f"k={k}: need 1 ≤ k ≤ k₀ + r = {k0 + r}")
    work = work_dtype(U.dtype, B.dtype, A.dtype)
    U, Vh, B, A = U.to(work), Vh.to(work), B.to(work), A.to(work)
    P_B, J, R_J = _project_out(U, B)  # (L, k0, r), (L, m, r), (L, r, r)
    P_A, K, R_K = _project_out(Vh.mT, A.mT)  # (L, k0, r), (L, n, r), (L, r, r)
    left = torch.cat([P_B, R_J], dim=1).double()  # (L, k0 + r, r)
    right = torch.cat([P_A, R_K], dim=1).double()  # (L, k0 + r, r)
    core = weight * left @ right.mT  # (L, k0 + r, k0 + r)
    core[:, :k0, :k0] += torch.diag_embed(S.double())
    check_finite(core, "the Brand core")
    U_c, S_c, Vh_c = torch.linalg.svd(core)  # (L, q, q), (L, q), (L, q, q)
    U_new = torch.cat([U, J], dim=2) @ U_c[:, :, :k].to(work)  # (L, m, k)
    Vh_new = Vh_c[:, :k].to(work) @ torch.cat([Vh, K.mT], dim=1)  # (L, k, n)
    return SVDFactors(U_new, S_c[:, :k].to(work), Vh_new)


def _project_out(Q: Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """X = Q P + J R with Qᵀ J = 0: returns P (L, k, r), J (L, d, r), R (L, r, r).

    Q (L, d, k) has orthonormal columns. Two rounds of projection keep J orthogonal to Q to
    working precision; Householder QR keeps J orthonormal even if X lies in span(Q).
    """
    P = Q.mT @ X  # (L, k, r)
    X = X - Q @ P  # (L, d, r)
    P2 = Q.mT @ X
    X = X - Q @ P2
    J, R = torch.linalg.qr(X)  # (L, d, r), (L, r, r)
    # Where X is (nearly) in span(Q), J is an arbitrary orthonormal basis that may overlap Q
    # (QR of 0 gives identity columns): project J as well and re-normalize; J R is unchanged
    # to working precision because Qᵀ X ≈ 0.
    J = J - Q @ (Q.mT @ J)
    J = J - Q @ (Q.mT @ J)
    J, R_J = torch.linalg.qr(J)  # (L, d, r), (L, r, r) ≈ I where X had full rank
    return P + P2, J, R_J @ R
