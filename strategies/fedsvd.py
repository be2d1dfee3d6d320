"""FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA.

Lee et al., NeurIPS 2025 (arXiv 2505.12805), Algorithm 1. Per LoRA layer, W = W0 + s · B A:

1. clients receive (A, B), train only B under DP-SGD with A frozen, and upload B_k;
2. the server averages B̄ = Σ_k (n_k / Σ n) B_k;
3. every ``svd_period`` rounds it refactorizes M = B̄ A_prev = U Σ Vᵀ (rank ≤ r) into
   A ← Vᵀ[:r] (orthonormal rows) and B ← U[:, :r] Σ[:r], so B A = M exactly;
4. both factors are broadcast. A never receives a noisy gradient, and ‖A‖₂ = 1 bounds the
   per-sample gradient norm of B, so clipping distorts less than with a random A.

The classification head, when clients train it, is averaged like FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import contract
from kernels import refactorize_pairs
from strategies.metrics import (
    aggregate_train_metrics,
    broadcast_bytes,
    is_budget_exhausted,
    reply_bytes,
)


class FedSVD(FedAvg):
    """FedAvg over B (and the head) followed by an SVD refactorization of every B̄ A_prev.

    Parameters
    ----------
    lora_modules : names of the LoRA layers; their arrays are ``lora_key(module, "A" | "B")``.
    svd_period : refactorize every ``svd_period`` rounds (1: every round, as in the paper).
    **kwargs : passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, lora_modules: Sequence[str], svd_period: int = 1, **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("arrayrecord_key", contract.ARRAYS)
        kwargs.setdefault("configrecord_key", contract.CONFIG)
        super().__init__(**kwargs)
        if svd_period < 1:
            raise ValueError(f"svd_period={svd_period}: must be >= 1")
        if not lora_modules:
            raise ValueError("lora_modules is empty: FedSVD needs at least one LoRA layer")
        self.lora_modules = list(lora_modules)
        self.svd_period = svd_period
        self.last_round_metrics: MetricRecord | None = None
        self._global: ArrayRecord | None = None
        self._bytes_down = 0

    def summary(self) -> None:
        """Log the strategy settings."""
        log(INFO, "\t├──> FedSVD: %d LoRA layers, refactorize every %d round(s), train B only",
            len(self.lora_modules), self.svd_period)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients as FedAvg does; ask them to train and send back only B."""
        self._global = arrays
        config[contract.TRAIN_FACTORS] = "B"
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._bytes_down = broadcast_bytes(arrays, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """B̄ = weighted mean of the B_k; then (B, A) ← refactorize(B̄, A_prev) for every layer."""
        replies = list(replies)
        trained = [m for m in replies if not is_budget_exhausted(m)]
        if len(trained) < len(replies):
            log(INFO, "aggregate_train: %d client(s) skipped the round: privacy budget spent",
                len(replies) - len(trained))
        averaged, metrics = super().aggregate_train(server_round, trained)
        if averaged is None or self._global is None:
            log(INFO, "aggregate_train: no update this round; the global adapter is unchanged")
            self.last_round_metrics = None
            return None, None
        state = self._global.to_torch_state_dict()
        state.update(averaged.to_torch_state_dict())  # B̄ and the averaged head
        if server_round % self.svd_period == 0:
            state.update(self._refactorize(state))
        metrics = MetricRecord({
            **(metrics or {}),
            "bytes-up": reply_bytes(replies),
            "bytes-down": self._bytes_down,
            "clients-exhausted": len(replies) - len(trained),
        })
        self.last_round_metrics = metrics
        return ArrayRecord(torch_state_dict=state), metrics

    def _refactorize(self, state: dict) -> dict:
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
