"""Damaged copies of merge sources, for robustness experiments: noise, and half rank.

- :func:`noise_like`: per layer, a random rank-r update whose Frobenius norm equals the
  source's ‖Δ‖_F (a source "replaced by noise of the same norm"): B_n, A_n Gaussian, scaled by
  ‖Δ‖_F / ‖B_n A_n‖_F, with ‖B A‖²_F = tr((BᵀB)(AAᵀ)) from the r × r Grams (no m × n matrix).
- :func:`half_rank`: per layer, the best rank-⌈r/2⌉ approximation of Δ (its top singular
  components, :func:`kernels.lowrank_svd` of the thin factors).

Both take and return ``module -> (B, A)`` with Δ = B A (scale included, as
:attr:`merging.sources.Source.lora` holds it); :func:`save_source` writes such pairs as a peft
adapter (r = alpha = rank, scale 1) that :func:`merging.load_sources` reads back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from kernels import lowrank_svd
from merging.adapter_io import MergedAdapter, merged_config, save_merged
from merging.merge import provenance_entry
from merging.sources import Pair, Source


def frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F from the Grams: sqrt(tr((BᵀB)(AAᵀ))), in float64."""
    B64, A64 = B.double(), A.double()
    return math.sqrt(max(float(torch.trace((B64.T @ B64) @ (A64 @ A64.T))), 0.0))


def noise_like(pairs: Mapping[str, Pair], generator: torch.Generator) -> dict[str, Pair]:
    """Gaussian rank-r updates with each layer's Frobenius norm; shapes and dtypes kept."""
    out: dict[str, Pair] = {}
    for module, (B, A) in pairs.items():
        B_n = torch.randn(B.shape, generator=generator, dtype=torch.float64)
        A_n = torch.randn(A.shape, generator=generator, dtype=torch.float64)
        scale = frobenius(B, A) / frobenius(B_n, A_n)
        out[module] = ((B_n * scale).to(B.dtype), A_n.to(A.dtype))
    return out


def half_rank(pairs: Mapping[str, Pair]) -> dict[str, Pair]:
    """Each layer's best rank-⌈r/2⌉ approximation: (U_k diag(S_k), Vh_k), k = ⌈r/2⌉."""
    out: dict[str, Pair] = {}
    for module, (B, A) in pairs.items():
        k = max(1, math.ceil(A.shape[0] / 2))
        U, S, Vh = lowrank_svd(B[None].float(), A[None].float(), k)
        out[module] = ((U[0] * S[0]).to(B.dtype), Vh[0].to(A.dtype))
    return out


def save_source(folder: str | Path, source: Source, pairs: Mapping[str, Pair], op: str) -> Path:
    """Write ``pairs`` (modules of ``source``) as a peft adapter; ``op`` names the damage."""
    ranks = {A.shape[0] for _, A in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"pairs of several ranks {sorted(ranks)}: one adapter has one rank")
    rank = ranks.pop()
    provenance = {"sources": [provenance_entry(source, 1.0)],
                  "steps": [{"op": op, "rank": rank}]}
    return save_merged(folder, MergedAdapter(merged_config([source], rank), dict(pairs),
                                             provenance))
