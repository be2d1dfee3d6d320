"""Baselines to compare the AXIS merge with: task arithmetic, TIES, and peft's SVD merge.

- Task arithmetic (Ilharco et al., ICLR 2023, Eq. 1): Δ = Σ_s w_s Δ_s, truncated to rank K to
  be saved as LoRA. The sum stays factored, [w_1 B_1 … w_T B_T] [A_1; …; A_T] (stacked ranks),
  and its truncated SVD comes from :func:`kernels.lowrank_svd`: no m × n matrix. It is the
  operator of peft's ``add_weighted_adapter(combination_type="svd")``, which forms every ΔW.
- TIES (Yadav et al., NeurIPS 2023, Sec. 3): trim each τ_s = w_s Δ_s to its top ``density``
  fraction of magnitudes, elect γ = sgn(Σ_s τ̂_s), average the kept entries whose sign is γ
  (disjoint mean). Trimming and electing act on single entries, so TIES needs each layer's
  dense Δ_s (m × n per source): it runs per layer, on the targeted modules only, and the result
  is truncated to rank K by a dense SVD. Trimming is per layer (as in peft), not over the whole
  model as in the paper; weights scale τ_s before the election (peft elects on the unweighted
  τ_s: the same for equal weights).
- peft: :func:`peft_svd` loads the adapters into one ``PeftModel`` and calls
  ``add_weighted_adapter(..., combination_type="svd", svd_rank=K)`` (dense sum, dense SVD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import Tensor

from kernels import SVDFactors, lowrank_svd
from merging.adapter_io import MergedAdapter
from merging.merge import assemble, map_groups, source_weights
from merging.sources import ADAPTER_WEIGHTS, LORA_KEY, Pair, Source, SourceError, truncate


def task_arithmetic_pairs(sources: Sequence[Mapping[str, Pair]], k: int,
                          weights: Sequence[float] | None = None) -> dict[str, Pair]:
    """Module -> (B, A): the rank-k truncated SVD of Σ_s w_s B_s A_s, from stacked factors."""
    weights = [1.0] * len(sources) if weights is None else list(weights)

    def weighted_sum(stacks: list[tuple[Tensor, Tensor]]) -> SVDFactors:
        B = torch.cat([w * B for (B, _), w in zip(stacks, weights, strict=True)], dim=2)
        A = torch.cat([A for _, A in stacks], dim=1)  # (L, Σ r_s, n), B (L, m, Σ r_s)
        return SVDFactors(*lowrank_svd(B, A, k))

    return map_groups(sources, weighted_sum)


def ties_delta(deltas: Sequence[Tensor], density: float,
               weights: Sequence[float] | None = None) -> Tensor:
    """TIES merge of same-shaped dense deltas: trim, elect sign, disjoint mean (module docs).

    Each τ_s = w_s Δ_s keeps its ⌊density · numel⌋ largest magnitudes (peft's count); where the
    kept entries sum to 0 the elected sign is +; entries no source keeps stay 0.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density={density}: the kept fraction must be in (0, 1]")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    tau = torch.stack([w * d for d, w in zip(deltas, weights, strict=True)])  # (T, m, n)
    flat = tau.reshape(tau.shape[0], -1)  # (T, m n)
    keep = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
    trimmed = (flat * mask).reshape(tau.shape)  # (T, m, n)
    gamma = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(tau.dtype)  # (m, n)
    agree = trimmed.sign() == gamma  # (T, m, n); a trimmed 0 never agrees
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)


def task_arithmetic(sources: Sequence[Source], rank: int, weights: Sequence[float] | None = None,
                    dense_rank: int | None = None) -> MergedAdapter:
    """Task arithmetic of loaded sources, rank ``rank``; dense parts enter at ``dense_rank``.

    ``dense_rank`` defaults to ``rank``: a full model's tail beyond it is dropped before the
    sum, an approximation (pass min(m, n) for the exact sum at the cost of wide stacks).
    """
    weights = source_weights(sources, weights)
    pairs = task_arithmetic_pairs([s.factors(dense_rank or rank) for s in sources], rank,
                                  weights)
    return assemble(sources, weights, pairs, rank, {"method": "task-arithmetic",
                                                     "dense_rank": dense_rank or rank})


def ties(sources: Sequence[Source], rank: int, density: float = 0.2,
         weights: Sequence[float] | None = None) -> MergedAdapter:
    """TIES of loaded sources, per layer from dense deltas, then truncated to rank ``rank``."""
    weights = source_weights(sources, weights)
    pairs = {module: truncate(ties_delta([s.delta(module) for s in sources], density, weights),
                              rank) for module in sources[0].shapes}
    return assemble(sources, weights, pairs, rank, {"method": "ties", "density": density})


def peft_svd_pairs(model: PeftModel, adapters: Sequence[str], k: int,
                   weights: Sequence[float] | None = None,
                   name: str = "merged") -> dict[str, Pair]:
    """The peft merge: ``add_weighted_adapter(..., "svd", svd_rank=k)``, read back as pairs.

    Returns module -> (s · B, A) of the new adapter ``name`` (peft sets alpha = r = k: s = 1).
    """
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    model.add_weighted_adapter(list(adapters), weights, name, combination_type="svd",
                               svd_rank=k)
    return {module_name: (module.lora_B[name].weight.detach() * module.scaling[name],
                          module.lora_A[name].weight.detach())
            for module_name, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and name in module.lora_A}


def peft_svd(sources: Sequence[Source], base_model: torch.nn.Module, rank: int,
             weights: Sequence[float] | None = None) -> MergedAdapter:
    """:func:`peft_svd_pairs` on adapter sources loaded into ``base_model`` (which it modifies).

    peft refuses to merge adapters with heads (``modules_to_save``), so heads are left out.
    """
    weights = source_weights(sources, weights)
    names = [f"source{i}" for i in range(len(sources))]
    model = None
    for name, source in zip(names, sources, strict=True):
        if source.kind != "adapter" or source.dense is not None:
            raise SourceError(source.name, "peft's svd merge takes LoRA adapters only (no full "
                              "model, no base_delta.safetensors)")
        config = dataclasses.replace(source.config, modules_to_save=None)
        if model is None:
            model = get_peft_model(base_model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        state = load_file(Path(source.name) / ADAPTER_WEIGHTS)
        set_peft_model_state_dict(model, {k: v for k, v in state.items() if LORA_KEY.match(k)},
                                  adapter_name=name)
    pairs = peft_svd_pairs(model, names, rank, weights)
    return assemble(sources, weights, pairs, rank, {"method": "peft-svd"})


def load_base_model(base: str | Path | None, source: Source) -> torch.nn.Module:
    """The base model in the class the adapter was trained on (its config's auto_mapping)."""
    if base is None:
        raise ValueError("the peft-svd baseline loads the base model: pass --base DIR")
    name = ((source.config.auto_mapping if source.config else None) or {}).get(
        "base_model_class", "AutoModel")
    transformers.logging.set_verbosity_error()  # a task head's "MISSING" report is expected
    return getattr(transformers, name).from_pretrained(str(base))
