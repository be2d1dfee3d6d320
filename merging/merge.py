"""Merge N LoRA deltas per layer by their top-K rank-one SVD components (AXIS, never m × n).

AXIS (arXiv 2508.19353): each source's Δ_s = s_s B_s A_s = Σ_i σ_si u_si v_siᵀ gives its
rank-one triplets to one pool per layer; the top K (by σ, σ / σ_s1, or a per-source quota;
optionally × a source weight w_s) are summed and re-orthogonalized, Δ = U diag(S) Vh, and
written as a rank-K LoRA pair B = U diag(S), A = Vh with alpha = K (scale 1). Both SVDs are
:func:`kernels.top_components` on stacks of same-shaped layers, from the thin factors only.

Adding one source to an existing merge is Brand's update (:func:`kernels.add_source`) of the
saved merge, whose SVD is recovered from its factors (:func:`kernels.lowrank_svd`, exact up to
rounding). It is the rank-K truncation of (merge + w Δ_new): the same as merging all sources
from scratch when nothing is dropped (K = K₀ + r_new, and K = all components from scratch) or
when the new source is orthogonal to the merge; otherwise the best rank-K approximation of
merge + w Δ_new (Eckart–Young), whereas a merge from scratch selects among the pooled
components. Selection by ``rank_by`` applies to merges from scratch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from kernels import SVDFactors, add_source, lowrank_svd, top_components
from kernels.merge import RankBy
from merging.adapter_io import MergedAdapter, merged_config
from merging.sources import Pair, Source, SourceError

GroupFn = Callable[[list[tuple[Tensor, Tensor]]], SVDFactors]


@torch.no_grad()
def map_groups(sources: Sequence[Mapping[str, Pair]], fn: GroupFn) -> dict[str, Pair]:
    """Apply ``fn`` once per group of layers with equal (m, n) and per-source ranks.

    Each source's layers of a group are stacked to (L, m, r_s), (L, r_s, n); ``fn`` maps the
    list of stacks to an :class:`SVDFactors`, returned per module as (U diag(S), Vh). The
    stacks are new tensors, owned by ``fn``: it may overwrite them.
    """
    names = list(sources[0])
    for i, source in enumerate(sources[1:], 1):
        if set(source) != set(names):
            raise ValueError(f"source {i} has other modules than source 0")
    groups: dict[tuple, list[str]] = {}
    for name in names:
        key = (sources[0][name][0].shape[0], sources[0][name][1].shape[1],
               tuple(s[name][1].shape[0] for s in sources))
        groups.setdefault(key, []).append(name)
    out: dict[str, Pair] = {}
    for group in groups.values():
        stacks = [(torch.stack([s[n][0] for n in group]),  # (L, m, r_s)
                   torch.stack([s[n][1] for n in group]))  # (L, r_s, n)
                  for s in sources]
        B, A = fn(stacks).pair()  # (L, m, K), (L, K, n)
        out.update((n, (B[i], A[i])) for i, n in enumerate(group))
    return {name: out[name] for name in names}


def merge_pairs(sources: Sequence[Mapping[str, Pair]], k: int, rank_by: RankBy = "sigma",
                weights: Sequence[float] | None = None) -> dict[str, Pair]:
    """Module -> (B (m, k), A (k, n)) of the top-k pooled components of every source.

    ``sources`` are module -> (s · B_s, A_s) mappings (scale folded in, any ranks); see
    :func:`kernels.top_components` for ``rank_by`` and ``weights``. A has orthonormal rows, B
    orthogonal columns of norms S (descending).
    """
    return map_groups(sources, lambda stacks: top_components(stacks, k, rank_by, weights,
                                                             overwrite_sources=True))


def add_pairs(merged: Mapping[str, Pair], source: Mapping[str, Pair], k: int,
              weight: float = 1.0) -> dict[str, Pair]:
    """Module -> (B, A) of the rank-k truncation of merged + weight · source (Brand's update).

    ``merged`` may be any scaled LoRA pairs (a saved merge, or a single adapter): its SVD is
    taken from its factors first. Needs k ≤ k₀ + r and k₀ + r ≤ min(m, n).
    """
    def update(stacks: list[tuple[Tensor, Tensor]]) -> SVDFactors:
        (B0, A0), (B, A) = stacks
        return add_source(SVDFactors(*lowrank_svd(B0, A0)), B, A, k, weight)

    return map_groups([merged, source], update)


def merge_adapters(sources: Sequence[Source], rank: int, rank_by: RankBy = "sigma",
                   weights: Sequence[float] | None = None,
                   dense_rank: int | None = None) -> MergedAdapter:
    """Merge loaded sources into one rank-``rank`` LoRA adapter (module docstring).

    Parameters
    ----------
    sources : sequence of Source
        From :func:`merging.load_sources` (checked against each other).
    rank : int
        K, the rank of the merged adapter.
    rank_by : {"sigma", "normalized", "quota"}
        Selection score (:func:`kernels.top_components`).
    weights : sequence of float, optional
        One per source; default 1.
    dense_rank : int, optional
        Rank of the truncated SVD of dense parts (full models, base_delta); default ``rank``,
        which loses nothing for the selection: no source gives more than K components.
    """
    weights = source_weights(sources, weights)
    pairs = merge_pairs([s.factors(dense_rank or rank) for s in sources], rank, rank_by,
                        weights)
    return assemble(sources, weights, pairs, rank, {"method": "axis", "rank_by": rank_by,
                                                    "dense_rank": dense_rank or rank})


def add_adapter(merged: Source, source: Source, rank: int | None = None, weight: float = 1.0,
                dense_rank: int | None = None,
                provenance: dict | None = None) -> MergedAdapter:
    """Fold one more source into a saved merge (or any adapter) by Brand's update.

    ``rank`` defaults to the merge's rank K₀; ``rank = K₀ + r`` keeps everything. Dense parts of
    ``source`` enter as their rank-``dense_rank`` SVD (default ``rank``). ``provenance`` (the
    merge's ``merge.json``) is extended with this step.
    """
    k0 = next(iter(merged.lora.values()))[1].shape[0]
    rank = rank or k0
    try:
        pairs = add_pairs(merged.factors(k0), source.factors(dense_rank or rank), rank, weight)
    except ValueError as exc:
        raise SourceError(source.name, f"cannot be added to {merged.name}: {exc}") from exc
    history = dict(provenance or {"sources": [provenance_entry(merged, 1.0)], "steps": []})
    history["sources"] = [*history["sources"], provenance_entry(source, weight)]
    history["steps"] = [*history["steps"], {"op": "add", "method": "brand", "rank": rank,
                                            "dense_rank": dense_rank or rank}]
    return MergedAdapter(merged_config([merged, source], rank), pairs, history)


def source_weights(sources: Sequence[Source], weights: Sequence[float] | None) -> list[float]:
    """One float weight per source (default 1); raise if the count differs."""
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources: give one each")
    return weights


def provenance_entry(source: Source, weight: float) -> dict:
    """How ``merge.json`` lists one source."""
    return {"path": source.name, "kind": source.kind, "weight": weight}


def assemble(sources: Sequence[Source], weights: list[float], pairs: dict[str, Pair], rank: int,
             step: dict) -> MergedAdapter:
    """A merge from scratch of ``sources``: its config, pairs and provenance (one step)."""
    return MergedAdapter(merged_config(sources, rank), pairs, {
        "sources": [provenance_entry(s, w) for s, w in zip(sources, weights, strict=True)],
        "steps": [{"op": "merge", "rank": rank, **step}]})
