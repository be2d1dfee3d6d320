"""Apply a batched kernel to a model's LoRA layers: group by shape, stack, scatter back by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from kernels.lowrank import refactorize

Pair = tuple[Tensor, Tensor]  # (B (m, r), A (r, n))


def group_by_shape(pairs: Mapping[str, Pair]) -> dict[tuple, list[str]]:
    """Names of layers grouped by (B shape, A shape, dtype, device), in insertion order."""
    groups: dict[tuple, list[str]] = {}
    for name, (B, A) in pairs.items():
        key = (tuple(B.shape), tuple(A.shape), B.dtype, A.dtype, B.device)
        groups.setdefault(key, []).append(name)
    return groups


def refactorize_pairs(pairs: Mapping[str, Pair],
                      sigma: Literal["B", "sqrt"] = "B") -> dict[str, Pair]:
    """:func:`kernels.refactorize` on every layer, one batched call per shape group.

    ``pairs`` maps a layer name to (B (m, r), A (r, n)); the result maps the same names, in
    the same order, to (B' (m, r), A' (r, n)) with B' A' = B A and orthonormal rows of A'.
    """
    out: dict[str, Pair] = {}
    for names in group_by_shape(pairs).values():
        B = torch.stack([pairs[n][0] for n in names])  # (L, m, r)
        A = torch.stack([pairs[n][1] for n in names])  # (L, r, n)
        B_new, A_new = refactorize(B, A, sigma=sigma)
        for i, name in enumerate(names):
            out[name] = (B_new[i], A_new[i])
    return {name: out[name] for name in pairs}
