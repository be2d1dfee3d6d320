"""Batched, device-agnostic low-rank decompositions for every LoRA layer at once (torch only)."""

from kernels.grouping import group_by_shape, refactorize_pairs
from kernels.lowrank import lowrank_svd, refactorize

__all__ = ["group_by_shape", "lowrank_svd", "refactorize", "refactorize_pairs"]
