"""LoRA layers in SVD form, W = W0 + s · U diag(σ) Vᵀ, whose singular values σ can train alone.

The ``merge-sv`` strategy adapts a merged adapter to a new federation by training only its
singular values (AXIS). A peft LoRA layer computes ``W0 x + s · lora_B(lora_A(dropout(x)))``;
:func:`install_singular_values` swaps every ``lora_A`` for a :class:`SingularValueLinear`, which
computes ``(A x) ⊙ σ``, so the layer computes W0 x + s · B diag(σ) A x. With B = U (d_out, r)
orthonormal columns and A = Vᵀ (r, d_in) orthonormal rows, both frozen, σ (r,) are the singular
values of the update (up to the scale s), and they are the only LoRA parameters that train.

peft still finds ``lora_A[adapter].weight`` (A), so its forward is unchanged; Opacus finds the
per-sample gradient of σ through the grad sampler registered in :mod:`privacy.grad_samplers`.
σ travels as the array ``contract.lora_key(module, "S")``.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F


class SingularValueLinear(nn.Linear):
    """``y = (x Aᵀ) ⊙ σ``: a bias-free ``nn.Linear`` (weight A, (r, d_in)) times σ (r,).

    σ starts at ones, so a fresh module computes exactly what the ``nn.Linear`` it replaces did.
    """

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.singular_values = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    @classmethod
    def replacing(cls, linear: nn.Linear) -> SingularValueLinear:
        """A module with ``linear``'s weight (copied, same device and dtype) and σ = 1."""
        if linear.bias is not None:
            raise ValueError("lora_A has a bias: not a plain LoRA layer")
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, device=weight.device,
                     dtype=weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
        module.weight.requires_grad_(weight.requires_grad)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) → (..., r)."""
        return F.linear(x, self.weight) * self.singular_values


def install_singular_values(model: PeftModel) -> int:
    """Swap ``lora_A`` of every LoRA layer of the active adapter for a :class:`SingularValueLinear`.

    Returns the number of layers changed; a layer already converted is left as it is.
    """
    adapter = model.active_adapter
    changed = 0
    for module in model.base_model.model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            current = module.lora_A[adapter]
            if not isinstance(current, SingularValueLinear):
                module.lora_A[adapter] = SingularValueLinear.replacing(current)
                changed += 1
    if not changed and not any(isinstance(m, SingularValueLinear) for m in model.modules()):
        raise ValueError("the model has no LoRA layers to put in SVD form")
    return changed


@torch.no_grad()
def fold_singular_values(model: PeftModel) -> int:
    """Undo :func:`install_singular_values`: B ← B diag(σ), ``lora_A`` a plain ``nn.Linear``.

    The layer computes the same W0 + s · B diag(σ) A as before, now as ordinary peft LoRA, so
    ``save_pretrained`` writes an adapter that ``PeftModel.from_pretrained`` loads. Returns the
    number of layers changed.
    """
    adapter = model.active_adapter
    changed = 0
    for module in model.base_model.model.modules():
        if (isinstance(module, LoraLayer) and adapter in module.lora_A
                and isinstance(module.lora_A[adapter], SingularValueLinear)):
            current = module.lora_A[adapter]
            module.lora_B[adapter].weight.mul_(current.singular_values.to(
                module.lora_B[adapter].weight.dtype))
            plain = nn.Linear(current.in_features, current.out_features, bias=False,
                              device=current.weight.device, dtype=current.weight.dtype)
            plain.weight.copy_(current.weight)
            plain.weight.requires_grad_(current.weight.requires_grad)
            module.lora_A[adapter] = plain
            changed += 1
    return changed
