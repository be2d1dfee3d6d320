"""FedEx-LoRA: exact aggregation by folding the averaging error into the base weights.

Singhal et al., ACL 2025 (arXiv 2410.09432). Per LoRA layer, W = W0 + s · B A:

1. clients train A and B under DP-SGD (one DP-SGD step privatises both) and upload both;
2. the server averages B̄ = Σ_k p_k B_k and Ā = Σ_k p_k A_k (p_k = n_k / Σ n);
3. it adds the residual s · (Σ_k p_k B_k A_k − B̄ Ā) to the base weight, so that
   W0 + ΔW + s B̄ Ā = W0 + ΔW_prev + s Σ_k p_k B_k A_k: the global update is exact.

The residual is formed with the B̄ and Ā the global state actually holds (float32), in float64.
The server keeps the accumulated residual ΔW per layer in the global state as
``contract.base_key(module)`` and broadcasts it with B̄ and Ā (counted in ``bytes-down``);
clients add it to their pretrained weights. ΔW is 0, and not sent, before the first merge.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message

from common import contract
from strategies.base import LoraStrategy, State, fold_into_base


class FedExLoRA(LoraStrategy):
    """Average A and B; fold s · (Σ_k p_k B_k A_k − B̄ Ā) into the base weights.

    Parameters
    ----------
    lora_modules : names of the LoRA layers.
    lora_scale : the LoRA scale s = alpha / r of the model (peft's ``scaling``).
    **kwargs : passed to :class:`strategies.base.LoraStrategy`.
    """

    TRAIN_FACTORS = ("A", "B")
    PRODUCT_UPDATES = True

    def __init__(self, lora_modules: Sequence[str], *, lora_scale: float, **kwargs) -> None:
        super().__init__(lora_modules, **kwargs)
        self.lora_scale = float(lora_scale)

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return (f"train A and B, average each, add the residual s·(Σ p_k B_k A_k − B̄Ā) "
                f"(s = {self.lora_scale:g}) to the base weights")

    def merge(self, server_round: int, state: State, averaged: State,
              replies: list[Message]) -> State:
        """(B, A) ← (B̄, Ā); ΔW += s (Σ_k p_k B_k A_k − B̄ Ā); the head ← its weighted mean.

        With a server optimizer the exact update U = s (Σ_k p_k B_k A_k − B_prev A_prev) becomes
        step(U) (:meth:`product_step`): ΔW += step(U) − s (B̄ Ā − B_prev A_prev), so that the
        model moves by step(U).
        """
        previous = state
        state = {**state, **averaged}
        weights = self.client_weights(replies)
        for module in self.lora_modules:
            B = state[contract.lora_key(module, "B")].double()
            A = state[contract.lora_key(module, "A")].double()
            products = self.product_sum(module, replies, weights)  # (d_out, d_in)
            if self.server_optimizer.is_plain_averaging:
                fold_into_base(state, module, self.lora_scale * (products - B @ A))
                continue
            before = (previous[contract.lora_key(module, "B")].double()
                      @ previous[contract.lora_key(module, "A")].double())
            step = self.product_step(server_round, module,
                                     self.lora_scale * (products - before)).double()
            fold_into_base(state, module, step - self.lora_scale * (B @ A - before))
        return state
