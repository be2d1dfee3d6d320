"""merge-sv: adapt a merged adapter to a new federation by training only its singular values.

AXIS ("Efficient Multi-Source Knowledge Transfer by Model Merging", 2025), federated and under
DP. A merge of several source adapters (``python -m merging``) gives, per LoRA layer, a rank-r
update Δ = U Σ Vᵀ. The federation's model computes W = W0 + s · U diag(σ) Vᵀ with
U (d_out, r) orthonormal columns and Vᵀ (r, d_in) orthonormal rows frozen (``lora_B``,
``lora_A``), and σ (r,) initialised to Σ / s (:mod:`common.singular_values`):

1. clients train only σ (r numbers per layer, plus the head when it trains) under the same
   DP-SGD and accounting as every other method, and upload σ_k;
2. the server averages σ̄ = Σ_k p_k σ_k, p_k = n_k / Σ n; U and V never change, so the average
   is exact: Σ_k p_k U diag(σ_k) Vᵀ = U diag(σ̄) Vᵀ.

Each upload is r floats per layer instead of r · d_out (B) or r · (d_in + d_out) (A and B).
A server optimizer (``strategy.server-optimizer``) steps σ as any array: σ ← σ + step(σ̄ − σ),
its moments in σ's coordinates, which never turn (U and V are fixed); the update stays
U diag(σ) Vᵀ, exact for any step.

With ``sv_rounds`` = N > 0 the federation continues with FedSVD after round N: the server folds
σ̄ into B (B ← U diag(σ̄), σ ← 1, the same update), and later rounds train B and refactorize
B̄ A exactly as :class:`~strategies.fedsvd.FedSVD` does (σ stays 1). The fold turns no moment:
σ's are left behind (σ trains no more), and B's start at zero in round N + 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import Message

from common import contract
from common.contract import Factor
from kernels import group_by_shape, lowrank_svd
from merging.sources import Pair
from strategies.base import State
from strategies.fedsvd import FedSVD


class MergeSV(FedSVD):
    """Train and average the singular values σ of every LoRA layer; U and V stay frozen.

    Parameters
    ----------
    lora_modules : names of the LoRA layers.
    sv_rounds : 0: σ only, every round; N > 0: σ for rounds 1..N, then FedSVD (module docstring).
    **kwargs : passed to :class:`~strategies.fedsvd.FedSVD` (``svd_period``, screening, sampling).
    """

    def __init__(self, lora_modules: Sequence[str], sv_rounds: int = 0, **kwargs) -> None:
        if sv_rounds < 0:
            raise ValueError(f"sv_rounds={sv_rounds}: must be >= 0 (0: σ only, every round)")
        super().__init__(lora_modules, **kwargs)
        self.sv_rounds = sv_rounds

    def trains_sigma(self, server_round: int) -> bool:
        """Whether clients train σ (else B, as in FedSVD) in ``server_round``."""
        return self.sv_rounds == 0 or server_round <= self.sv_rounds

    def train_factors(self, server_round: int) -> tuple[Factor, ...]:
        """σ in the σ rounds, B after them."""
        return ("S",) if self.trains_sigma(server_round) else ("B",)

    def merge(self, server_round: int, state: State, averaged: State,
              replies: list[Message]) -> State:
        """σ̄ replaces σ; after the last σ round σ̄ is folded into B; later rounds are FedSVD's."""
        if not self.trains_sigma(server_round):
            return super().merge(server_round, state, averaged, replies)
        state = {**state, **averaged}
        if server_round == self.sv_rounds:
            for module in self.lora_modules:
                B, S = contract.lora_key(module, "B"), contract.lora_key(module, "S")
                state[B] = state[B] * state[S].to(state[B].dtype)  # (d_out, r) · diag(σ̄)
                state[S] = torch.ones_like(state[S])
        return state

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        then = f" for {self.sv_rounds} round(s), then FedSVD" if self.sv_rounds else ""
        return f"train the singular values σ only (U, V of the merge frozen){then}"


def svd_form_state(pairs: Mapping[str, Pair], lora_scale: float) -> State:
    """The SVD-form arrays of updates Δ = B A, one batched :func:`lowrank_svd` per shape group.

    Parameters
    ----------
    pairs : module -> (B (d_out, r), A (r, d_in)), the update Δ = B A with any scale included.
    lora_scale : s of the model that will hold them (``lora.alpha / lora.r``).

    Returns
    -------
    State
        ``lora_B`` = U (d_out, r) orthonormal columns, ``lora_A`` = Vᵀ (r, d_in) orthonormal rows,
        ``lora_S`` = Σ / s (r,), float32, so that s · U diag(σ) Vᵀ = Δ. Singular values of a
        rank-deficient Δ are 0 (their vectors are still orthonormal).
    """
    state: State = {}
    for names in group_by_shape(pairs).values():
        B = torch.stack([pairs[n][0] for n in names]).float()  # (L, d_out, r)
        A = torch.stack([pairs[n][1] for n in names]).float()  # (L, r, d_in)
        U, S, Vh = lowrank_svd(B, A)  # (L, d_out, r), (L, r), (L, r, d_in)
        for i, name in enumerate(names):
            state[contract.lora_key(name, "B")] = U[i].contiguous()
            state[contract.lora_key(name, "A")] = Vh[i].contiguous()
            state[contract.lora_key(name, "S")] = (S[i] / lora_scale).contiguous()
    return state
