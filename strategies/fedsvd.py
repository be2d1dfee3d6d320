"""FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA.

Lee et al., NeurIPS 2025 (arXiv 2505.12805), Algorithm 1. Per LoRA layer, W = W0 + s · B A:

1. clients receive (A, B), train only B under DP-SGD with A frozen, and upload B_k;
2. the server averages B̄ = Σ_k (n_k / Σ n) B_k;
3. every ``svd_period`` rounds it refactorizes M = B̄ A_prev = U Σ Vᵀ (rank ≤ r) into
   A ← Vᵀ[:r] (orthonormal rows) and B ← U[:, :r] Σ[:r], so B A = M exactly;
4. both factors are broadcast. A never receives a noisy gradient, and ‖A‖₂ = 1 bounds the
   per-sample gradient norm of B, so clipping distorts less than with a random A.

The classification head, when clients train it, is averaged like FedAvg. Before averaging,
every reply is screened (:mod:`strategies.validation`): failed, malformed and outlying replies
are logged and left out, and a round with fewer than ``min_valid_replies`` valid updates
leaves the global adapter unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import contract
from kernels import refactorize_pairs
from strategies.metrics import aggregate_train_metrics, broadcast_bytes, reply_bytes
from strategies.validation import (
    DEFAULT_MAX_NORM_RATIO,
    DEFAULT_MAX_NUM_EXAMPLES,
    ReplyValidator,
    Screening,
    common_metrics,
    expected_arrays,
)


class FedSVD(FedAvg):
    """FedAvg over B (and the head) followed by an SVD refactorization of every B̄ A_prev.

    Parameters
    ----------
    lora_modules : names of the LoRA layers; their arrays are ``lora_key(module, "A" | "B")``.
    svd_period : refactorize every ``svd_period`` rounds (1: every round, as in the paper).
    train_head : whether clients train and send back the head (``lora.train-head``).
    min_valid_replies : fewest valid trained replies that make an update; fewer: no update.
    max_norm_ratio : reject a reply array whose norm exceeds this × the round's median
        (0 or inf: off); see :mod:`strategies.validation`.
    max_num_examples : the largest plausible ``num-examples`` of one reply.
    **kwargs : passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    train_factors = ("B",)  # what clients train and send back; A stays frozen

    def __init__(self, lora_modules: Sequence[str], svd_period: int = 1, *,
                 train_head: bool = True, min_valid_replies: int = 1,
                 max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
                 max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES, **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("arrayrecord_key", contract.ARRAYS)
        kwargs.setdefault("configrecord_key", contract.CONFIG)
        super().__init__(**kwargs)
        if svd_period < 1:
            raise ValueError(f"svd_period={svd_period}: must be >= 1")
        if not lora_modules:
            raise ValueError("lora_modules is empty: FedSVD needs at least one LoRA layer")
        if min_valid_replies < 1:
            raise ValueError(f"min_valid_replies={min_valid_replies}: must be >= 1")
        if not (max_norm_ratio == 0 or max_norm_ratio >= 1):
            raise ValueError(f"max_norm_ratio={max_norm_ratio}: must be 0 (off), >= 1 or inf")
        self.lora_modules = list(lora_modules)
        self.svd_period = svd_period
        self.train_head = train_head
        self.min_valid_replies = min_valid_replies
        self.max_norm_ratio = max_norm_ratio
        self.max_num_examples = max_num_examples
        self.last_round_metrics: MetricRecord | None = None
        self._global: ArrayRecord | None = None
        self._bytes_down = 0

    def summary(self) -> None:
        """Log the strategy settings."""
        log(INFO, "\t├──> FedSVD: %d LoRA layers, refactorize every %d round(s), train B only",
            len(self.lora_modules), self.svd_period)
        log(INFO, "\t├──> replies: need %d valid, reject array norms > %g × median",
            self.min_valid_replies, self.max_norm_ratio)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients as FedAvg does; ask them to train and send back only B."""
        self._global = arrays
        config[contract.TRAIN_FACTORS] = ",".join(self.train_factors)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._bytes_down = broadcast_bytes(arrays, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies; B̄ = weighted mean of the valid B_k; (B, A) ← refactorize(B̄, A_prev)."""
        replies = list(replies)
        if self._global is None:
            log(WARNING, "aggregate_train: no global adapter (configure_train was not called)")
            self.last_round_metrics = None
            return None, None
        screening = self.validator(self._global).screen(replies)
        _log_screening(screening)
        counts = {
            "bytes-up": reply_bytes(m for m in replies if m.has_content()),
            "bytes-down": self._bytes_down,
            "clients-exhausted": len(screening.exhausted),
            "replies-rejected": screening.num_rejected,
            "replies-failed": screening.num_failed,
        }
        if len(screening.valid) < self.min_valid_replies:
            log(WARNING, "aggregate_train: %d valid trained repl(ies), min_valid_replies=%d: "
                "no update this round; the global adapter is unchanged",
                len(screening.valid), self.min_valid_replies)
            self.last_round_metrics = MetricRecord({**counts, "clients-trained": 0})
            return None, None
        averaged, metrics = super().aggregate_train(server_round, common_metrics(screening.valid))
        state = self._global.to_torch_state_dict()
        state.update(averaged.to_torch_state_dict())  # B̄ and the averaged head
        if server_round % self.svd_period == 0:
            state.update(self._refactorize(state))
        metrics = MetricRecord({**(metrics or {}), **counts})
        self.last_round_metrics = metrics
        return ArrayRecord(torch_state_dict=state), metrics

    def validator(self, global_arrays: ArrayRecord) -> ReplyValidator:
        """The reply check of a round: the arrays asked for, shaped as in ``global_arrays``."""
        sent = {contract.lora_key(m, f) for m in self.lora_modules for f in self.train_factors}
        if self.train_head:
            sent |= {k for k in global_arrays.keys() if contract.is_head_key(k)}
        return ReplyValidator(expected_arrays(global_arrays, sent),
                              max_norm_ratio=self.max_norm_ratio,
                              max_num_examples=self.max_num_examples)

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


def _log_screening(screening: Screening) -> None:
    """One WARNING per rejected reply; one INFO line for clients whose budget is spent."""
    for rejection in screening.rejected:
        log(WARNING, "aggregate_train: rejected the reply of node %d: %s",
            rejection.node_id, rejection.reason)
    if screening.exhausted:
        log(INFO, "aggregate_train: %d client(s) skipped the round: privacy budget spent",
            len(screening.exhausted))
