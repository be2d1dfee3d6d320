"""FLoRA: federated fine-tuning by stacking the clients' LoRA adapters.

Wang et al., NeurIPS 2024 (arXiv 2409.05976). Per LoRA layer, W = W0 + s · B A:

1. clients receive the global model, train A and B from B = 0 and a fresh A under DP-SGD
   (one DP-SGD step privatises both) and upload both;
2. the server stacks [p_1 B_1 … p_K B_K] (d_out, K r) and [A_1; …; A_K] (K r, d_in), whose
   product is Σ_k p_k B_k A_k exactly (p_k = n_k / Σ n; B and A are never averaged apart);
3. it adds s · Σ_k p_k B_k A_k to the base weight and re-initialises the LoRA pair: B = 0,
   A = peft's Kaiming-uniform init, seeded by (seed, round), the same on every client.

The paper broadcasts the stacked factors and lets clients add their product to W0. Clients
here are stateless (a fresh model every round), so the server keeps the accumulated
ΔW = Σ_rounds s Σ_k p_k B_k A_k per layer in the global state as ``contract.base_key(module)``
and broadcasts it: the same model, d_out × d_in more numbers per layer down (counted in
``bytes-down``). ΔW is 0, and not sent, before the first merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from flwr.app import Message

from common import contract
from strategies.base import LoraStrategy, State, fold_into_base


def lora_a_init(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The default A init of peft: Kaiming-uniform with a = √5, i.e. U(−1/√d_in, 1/√d_in)."""
    A = torch.empty(shape, dtype=torch.float32)
    return torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)


class FLoRA(LoraStrategy):
    """Fold s · Σ_k p_k B_k A_k (stacked) into the base weights; restart LoRA every round.

    Parameters
    ----------
    lora_modules : names of the LoRA layers.
    lora_scale : the LoRA scale s = alpha / r of the model (peft's ``scaling``).
    seed : with the round number, seeds the fresh A of every round.
    **kwargs : passed to :class:`strategies.base.LoraStrategy`.
    """

    TRAIN_FACTORS = ("A", "B")
    PRODUCT_UPDATES = True

    def __init__(self, lora_modules: Sequence[str], *, lora_scale: float, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(lora_modules, **kwargs)
        self.lora_scale = float(lora_scale)
        self.seed = seed

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return (f"train A and B, add s·Σ p_k B_k A_k (s = {self.lora_scale:g}) to the base "
                "weights, restart LoRA (B = 0, fresh A)")

    def merge(self, server_round: int, state: State, averaged: State,
              replies: list[Message]) -> State:
        """ΔW += s Σ_k p_k B_k A_k; B ← 0; A ← fresh init; the head ← its weighted mean.

        With a server optimizer ΔW += step(s Σ_k p_k B_k A_k) (:meth:`product_step`; the model
        before the round has B = 0, so that sum is its exact update).
        """
        state = {**state, **averaged}
        weights = self.client_weights(replies)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + server_round) % 2**63)
        for module in self.lora_modules:
            fold_into_base(state, module, self.product_step(
                server_round, module, self.lora_scale * self.product_sum(module, replies, weights)))
            a_key, b_key = contract.lora_key(module, "A"), contract.lora_key(module, "B")
            state[b_key] = torch.zeros_like(state[b_key])
            state[a_key] = lora_a_init(tuple(state[a_key].shape), generator).to(state[a_key])
        return state
