"""Batched, device-agnostic low-rank decompositions for every LoRA layer at once (torch only).

- :func:`refactorize` (L, m, r) / (L, r, n) stacks -> B' = UΣ, A' = Vᵀ with B'A' = BA (FedSVD).
- :func:`refactorize_pairs` the same on a name -> (B, A) mapping of mixed shapes.
- :func:`lowrank_svd` truncated SVD of B A; :func:`refactorize_householder` the robust path.
- :func:`top_components` / :func:`add_source` merge several deltas by their top SVD components.
- :func:`stacked_product` Σ_k w_k B_k A_k through stacked factors (FLoRA, FedEx-LoRA; m × n).
- :func:`effective_rank`, :func:`intruder_similarity` / :func:`count_intruders`,
  :func:`row_orthonormality_gap`: the spectrum of an update against W0 (``fedsvd-spectrum``).

None of them forms an m × n matrix, except :func:`stacked_product`, whose result is the dense
update itself, and the spectrum kernels, which take the dense weights; big factors stay
float32 (float64 if given), cores are float64.
"""

from kernels.grouping import group_by_shape, refactorize_pairs
from kernels.lowrank import lowrank_svd, refactorize_householder
from kernels.merge import SVDFactors, add_source, top_components
from kernels.refactor import refactorize
from kernels.spectrum import (
    count_intruders,
    effective_rank,
    intruder_similarity,
    row_orthonormality_gap,
)
from kernels.stacking import stacked_product

__all__ = ["SVDFactors", "add_source", "count_intruders", "effective_rank", "group_by_shape",
           "intruder_similarity", "lowrank_svd", "refactorize", "refactorize_householder",
           "refactorize_pairs", "row_orthonormality_gap", "stacked_product", "top_components"]
