"""DP-SGD with one clipping norm per group of parameters (the head, the LoRA factors).

With one norm C for every trained tensor, the tensor with the largest per-example gradients
takes most of the budget: here the classification head takes 75-94 % of each example's norm,
and the LoRA factors (what the federated methods differ in) are clipped to the rest. Grouped
clipping gives each group g its own norm C_g. For example i with per-example gradient g_i,
restricted to group g as g_{i,g}:

    ĝ_{i,g} = g_{i,g} · min(1, C_g / ‖g_{i,g}‖₂)

so ‖ĝ_{i,g}‖ ≤ C_g, and the whole clipped gradient has ‖ĝ_i‖ ≤ C = √(Σ_g C_g²). Adding or
removing one example changes the clipped sum by at most C in L2: the same sensitivity as one
norm C. Gaussian noise N(0, σ² C² I) on every coordinate therefore gives the same (ε, δ) for
the same (σ, q, steps) as flat clipping at C, and the accountant is unchanged. With
``privacy.head-clip-share`` = s the head gets C_head = √s · C and the LoRA factors
C_lora = √(1 − s) · C, so C_head² + C_lora² = C² (``privacy.max-grad-norm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.optim import Optimizer

ClipGroup = tuple[Sequence[nn.Parameter], float]  # (parameters, their joint clipping norm C_g)


def head_and_adapter_groups(head: Sequence[nn.Parameter], adapter: Sequence[nn.Parameter],
                            max_grad_norm: float, head_share: float) -> list[ClipGroup]:
    """Two groups: the head at √s · C, the LoRA factors at √(1 − s) · C (s = ``head_share``)."""
    if not 0 < head_share < 1:
        raise ValueError(f"privacy.head-clip-share={head_share!r}: must be in (0, 1)")
    return [(list(head), math.sqrt(head_share) * max_grad_norm),
            (list(adapter), math.sqrt(1 - head_share) * max_grad_norm)]


def joint_norm(groups: Sequence[ClipGroup]) -> float:
    """C = √(Σ_g C_g²): the L2 sensitivity of one example's clipped gradient."""
    return math.sqrt(sum(norm ** 2 for _, norm in groups))


class GroupedClipDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with per-group clipping; noise σ · C with C = :func:`joint_norm`.

    ``groups`` must cover every parameter of ``optimizer`` exactly once. Everything else
    (per-sample gradients from the GradSampleModule, noise, averaging over the expected batch
    size, the accountant hook) is Opacus' own.
    """

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float,
                 groups: Sequence[ClipGroup], expected_batch_size: int | None,
                 loss_reduction: str = "mean") -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=joint_norm(groups), expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction)
        index = {id(p): g for g, (params, _) in enumerate(groups) for p in params}
        missing = [p for p in self.params if id(p) not in index]
        covered = sum(len(params) for params, _ in groups)
        if missing or covered != len(self.params):
            raise ValueError(f"the clipping groups cover {covered} tensors, the optimizer trains "
                             f"{len(self.params)}: every trained tensor must be in one group")
        self.group_index = [index[id(p)] for p in self.params]
        self.group_norms = torch.tensor([norm for _, norm in groups], dtype=torch.float32)

    def clip_factors(self) -> torch.Tensor:
        """min(1, C_g / ‖g_{i,g}‖) for every group g and example i: (G, N) float32."""
        grad_samples = self.grad_samples
        n = len(grad_samples[0])
        device = grad_samples[0].device
        squared = torch.zeros(len(self.group_norms), n, device=device, dtype=torch.float32)
        if n:
            for g, sample in zip(self.group_index, grad_samples, strict=True):
                squared[g] += sample.reshape(n, -1).float().pow(2).sum(dim=1).to(device)
        norms = self.group_norms.to(device)[:, None]
        return (norms / (squared.sqrt() + 1e-6)).clamp(max=1.0)

    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient group by group; add the result to ``p.summed_grad``."""
        factors = self.clip_factors()
        for p, g in zip(self.params, self.group_index, strict=True):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            factor = factors[g].to(device=grad_sample.device, dtype=p.dtype)
            grad = torch.einsum("i,i...", factor, grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)
