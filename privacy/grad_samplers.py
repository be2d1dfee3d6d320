"""Opacus per-sample gradients for this project's own modules (registered on import).

:class:`common.singular_values.SingularValueLinear` computes y = z ⊙ σ with z = x Aᵀ. For one
example with inputs x (T, d_in) and output gradients g = ∂L/∂y (T, r):

- ∂L/∂σ = Σ_t g_t ⊙ z_t  (r,);
- ∂L/∂A = Σ_t (g_t ⊙ σ) x_tᵀ  (r, d_in), only when A trains (never in ``merge-sv``).

Opacus calls the sampler with the layer's inputs and output gradients batched over N examples
(and any number of middle dimensions); it returns per-example gradients (N, *param.shape).
Ghost clipping has no norm sampler for the module and uses these gradients for the norms.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.singular_values import SingularValueLinear


@register_grad_sampler(SingularValueLinear)
def singular_value_grad_sample(layer: SingularValueLinear, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of σ (N, r) and, if it trains, A (N, r, d_in)."""
    x = activations[0].to(backprops.dtype)  # (N, ..., d_in)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.singular_values.requires_grad:
        z = torch.nn.functional.linear(x, layer.weight.to(backprops.dtype))  # (N, ..., r)
        grads[layer.singular_values] = torch.einsum("n...k,n...k->nk", backprops, z)
    if layer.weight.requires_grad:
        scaled = backprops * layer.singular_values.to(backprops.dtype)
        grads[layer.weight] = torch.einsum("n...k,n...i->nki", scaled, x)
    return grads
