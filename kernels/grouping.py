"""Apply a batched kernel to a model's LoRA layers: group by shape, stack, scatter back by name."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from torch import Tensor

from kernels.lowrank import Sigma, check_sigma
from kernels.refactor import refactorize

Pair = tuple[Tensor, Tensor]  # (B (m, r), A (r, n))


def group_by_shape(pairs: Mapping[str, Pair]) -> dict[Hashable, list[str]]:
    """Group layer names by (B shape, A shape, dtypes, device), keeping insertion order.

    Parameters
    ----------
    pairs : Mapping[str, tuple[Tensor, Tensor]]
        Layer name -> (B (m, r), A (r, n)).

    Returns
    -------
    dict
        Group key -> names of the layers in that group, each list in insertion order.

    Raises
    ------
    ValueError
        If a pair is not a (B (m, r), A (r, n)) pair of 2-D tensors with matching r.
    """
    groups: dict[Hashable, list[str]] = {}
    for name, pair in pairs.items():
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"pairs[{name!r}] must be a (B, A) tuple; got {type(pair).__name__}")
        B, A = pair
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"pairs[{name!r}]: B {tuple(B.shape)} and A {tuple(A.shape)} do "
                             "not chain; need B (m, r) and A (r, n)")
        key = (tuple(B.shape), tuple(A.shape), B.dtype, A.dtype, B.device, A.device)
        groups.setdefault(key, []).append(name)
    return groups


@torch.no_grad()
def refactorize_pairs(pairs: Mapping[str, Pair], sigma: Sigma = "B") -> dict[str, Pair]:
    """:func:`kernels.refactorize` on every layer of a model, one batched call per shape group.

    Layers are grouped by (shape, dtype, device), each group is stacked to (L, m, r) and
    (L, r, n), refactorized in place in those stacks (one call per group), and the results are
    returned by name as views of the stacks. The inputs are never modified.

    Parameters
    ----------
    pairs : Mapping[str, tuple[Tensor, Tensor]]
        Layer name -> (B (m, r), A (r, n)); layers may have different shapes.
    sigma : {"B", "sqrt"}
        Which factor carries Σ (see :func:`kernels.refactorize`).

    Returns
    -------
    dict[str, tuple[Tensor, Tensor]]
        The same names in the same order -> (B' (m, r), A' (r, n)) with B' A' = B A, the rows
        of A' orthonormal (sigma="B"), dtypes and devices of the inputs. The tensors of one
        group are views into one stacked result.
    """
    check_sigma(sigma)
    out: dict[str, Pair] = {}
    for names in group_by_shape(pairs).values():
        B = torch.stack([pairs[n][0] for n in names])  # (L, m, r)
        A = torch.stack([pairs[n][1] for n in names])  # (L, r, n)
        B_new, A_new = refactorize(B, A, sigma=sigma, out=(B, A))  # in our own stacks
        out.update((name, (B_new[i], A_new[i])) for i, name in enumerate(names))
    return {name: out[name] for name in pairs}
