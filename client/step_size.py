"""The client's learning rate per LoRA layer: as given, or normalised to a step in ΔW.

Per LoRA layer W = W0 + s · B A (A (r, d_in), B (d_out, r)), a step ΔB moves the model by
ΔW = s ΔB A and a step ΔA by ΔW = s B ΔA. For a step whose entries are independent,
‖ΔB A‖_F = ‖ΔB‖_F ‖A‖_F / √r (and ‖B ΔA‖_F = ‖ΔA‖_F ‖B‖_F / √r), so the same client rate moves
ΔW by a gain

    g = s · max(‖A‖_F, ‖B‖_F if A trains) / √r

times the step in the factors: g = s for FedSVD's orthonormal A (‖A‖_F = √r), about s / √3 for
FFA-LoRA's Kaiming-uniform A (entries U(−1/√d_in, 1/√d_in): ‖A‖_F² ≈ r / 3), and for
FedAvg-LoRA s ‖A‖_F / √r at first (B = 0), growing with B.

With ``train.learning-rate-scale = "delta-w"`` each layer's factors train at rate η / g under
DP-SGD, where clipping fixes the size of the (noisy) gradient in the factors, and at η / g²
without DP, where the gradient itself carries a factor g (∂L/∂B = s (∂L/∂W) Aᵀ). So η is the
step in ΔW's units, the same for every method. The head (if it trains) keeps η.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from common.adapter import AdapterLayout, LoraPair
from common.config import LEARNING_RATE_SCALES
from common.contract import Factor


def delta_w_gain(pair: LoraPair, factors: Iterable[Factor]) -> float:
    """G of the module docstring for one layer whose ``factors`` train (S, merge-sv's σ: 1)."""
    factors = tuple(factors)
    if "S" in factors:
        return 1.0
    rank = pair.A.shape[0]
    norms = [float(torch.linalg.vector_norm(pair.A.detach().float()))]
    if "A" in factors:
        norms.append(float(torch.linalg.vector_norm(pair.B.detach().float())))
    return pair.scale * max(norms) / math.sqrt(rank)


def parameter_groups(layout: AdapterLayout, factors: Iterable[Factor], *, train_head: bool,
                     learning_rate: float, scale: str, private: bool) -> list[dict]:
    """SGD parameter groups: the trained factors of each layer (rate η, or η / g^p), the head.

    ``scale`` is ``train.learning-rate-scale``; p = 1 under DP-SGD (``private``), 2 without.
    The parameters must already be the trainable ones (``AdapterLayout.set_trainable``).
    """
    if scale not in LEARNING_RATE_SCALES:
        raise ValueError(f"scale={scale!r}: must be one of {LEARNING_RATE_SCALES}")
    factors = tuple(factors)
    power = 1 if private else 2
    groups = []
    for pair in layout.pairs:
        rate = learning_rate
        if scale == "delta-w":
            gain = delta_w_gain(pair, factors)
            if not gain > 0:
                raise ValueError(f"LoRA layer {pair.module!r}: its A is zero, so no step moves "
                                 "ΔW; train.learning-rate-scale='delta-w' cannot normalise it")
            rate = learning_rate / gain ** power
        groups.append({"params": [pair.factor(f) for f in factors], "lr": rate})
    if train_head:
        groups.append({"params": list(layout.head.values()), "lr": learning_rate})
    return groups
