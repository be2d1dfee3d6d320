"""FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA.

Lee et al., NeurIPS 2025 (arXiv 2505.12805), Algorithm 1. Per LoRA layer, W = W0 + s · B A:

1. clients receive (A, B), train only B under DP-SGD with A frozen, and upload B_k;
2. the server averages B̄ = Σ_k (n_k / Σ n) B_k;
3. every ``svd_period`` rounds it refactorizes M = B̄ A_prev = U Σ Vᵀ (rank ≤ r) into
   A ← Vᵀ[:r] (orthonormal rows) and B ← U[:, :r] Σ[:r], so B A = M exactly;
4. both factors are broadcast. A never receives a noisy gradient, and ‖A‖₂ = 1 bounds the
   per-sample gradient norm of B, so clipping distorts less than with a random A.

The classification head, when clients train it, is averaged like FedAvg. Screening, the
weighted mean and byte counting are :class:`strategies.base.LoraStrategy`'s; this class only
names the trained factor (B) and merges (step 3).
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message

from common import contract
from kernels import refactorize_pairs
from kernels.rotation import rotation_between
from strategies.base import LoraStrategy, State


class FedSVD(LoraStrategy):
    """FedAvg over B (and the head) followed by an SVD refactorization of every B̄ A_prev.

    Parameters
    ----------
    lora_modules : names of the LoRA layers; their arrays are ``lora_key(module, "A" | "B")``.
    svd_period : refactorize every ``svd_period`` rounds (1: every round, as in the paper).
    **kwargs : passed to :class:`strategies.base.LoraStrategy` (screening) and Flower's
        ``FedAvg`` (sampling).
    """

    TRAIN_FACTORS = ("B",)  # A stays frozen on the clients

    def __init__(self, lora_modules: Sequence[str], svd_period: int = 1, **kwargs) -> None:
        if svd_period < 1:
            raise ValueError(f"svd_period={svd_period}: must be >= 1")
        super().__init__(lora_modules, **kwargs)
        self.svd_period = svd_period

    def describe(self) -> str:
        """One line on the method for ``summary``."""
        return f"train B only, refactorize every {self.svd_period} round(s)"

    def merge(self, server_round: int, state: State, averaged: State,
              replies: list[Message]) -> State:
        """B̄ (and the head) replace B; every ``svd_period`` rounds (B, A) ← refactorize(B̄, A).

        ``averaged`` holds B after the server optimizer's step, if any; the optimizer's moments
        of B then follow the new coordinates (:meth:`_transport_moments`).
        """
        previous = state
        state = {**state, **averaged}
        if server_round % self.svd_period == 0:
            state.update(self._refactorize(state))
            self._transport_moments(previous, state)
        return state

    def _transport_moments(self, previous: State, state: State) -> None:
        """m_B ← m_B T⁻¹, v_B ← v_B (T⁻¹)^∘2 per layer, with A′ = T A_prev.

        T = :func:`kernels.rotation.rotation_between` (A′, A_prev), the map the broadcast sends.
        """
        if self.server_optimizer.is_plain_averaging:
            return
        for module in self.lora_modules:
            a_key = contract.lora_key(module, "A")
            T, _ = rotation_between(state[a_key][None], previous[a_key][None])
            self.server_optimizer.transport(contract.lora_key(module, "B"), T[0])

    def _refactorize(self, state: State) -> State:
        """M = B̄ A_prev = U Σ Vᵀ → B = U Σ, A = Vᵀ, batched over layers of one shape."""
        pairs = {
            m: (state[contract.lora_key(m, "B")], state[contract.lora_key(m, "A")])
            for m in self.lora_modules
        }
        out = {}
        for module, (B, A) in refactorize_pairs(pairs).items():
            out[contract.lora_key(module, "B")] = B
            out[contract.lora_key(module, "A")] = A
        return out
