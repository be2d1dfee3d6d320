"""Server optimizers: FedAvgM, FedAdam and FedYogi as post-processing of the aggregated update.

"Adaptive Federated Optimization" (Reddi et al., ICLR 2021). Each round the server takes the
round's weighted mean x̄ of the replies as a pseudo-gradient Δ = x̄ − x (x the state sent) and
moves x ← x + step(Δ) instead of x ← x̄. The update rules are Flower's
(``flwr.serverapp.strategy`` FedAvgM, FedAdam, FedYogi), element by element, with their
defaults for β₁ = 0.9, β₂ = 0.99 and τ = 1e-3 (``tests/test_server_optimizer.py`` checks each
against Flower's strategy on the same aggregate):

- ``avgm``: m ← Δ (first step), then m ← β₁ m + Δ; step = η m;
- ``adam``: m ← β₁ m + (1 − β₁) Δ, v ← β₂ v + (1 − β₂) Δ²;
  step = η_t m / (√v + τ), η_t = η √(1 − β₂^(t+1)) / (1 − β₁^(t+1)) with t the server round;
- ``yogi``: m as adam, v ← v − (1 − β₂) Δ² sign(v − Δ²); step = η m / (√v + τ);
- ``none``: step = Δ (x ← x̄, plain federated averaging; the optimizer keeps no state).

The step only uses the aggregate, so it costs no privacy. The moments live in the coordinates of
the array they follow. FedSVD changes the coordinates of B every round (``transport``): after the
refactorization A′ = T A_prev (T r × r, :func:`kernels.rotation.rotation_between`) and B′ A′ is
the same ΔW, so a moment m of B (the ΔW direction m A_prev) is m′ = m T⁻¹ in the new coordinates
(m′ A′ = m A_prev exactly). A second moment is a per-coordinate variance; under the independence
across coordinates that Adam's diagonal already assumes, v′ = v (T⁻¹)^∘2 (element-wise square),
exact when T is a signed permutation and preserving each row's total when T is orthogonal (A
orthonormal before and after: every round after the first). See docs/strategies.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from common.config import SERVER_OPTIMIZERS

State = dict[str, Tensor]


@dataclass
class ServerOptimizer:
    """x ← x + step(Δ) per array, Δ = (the round's weighted mean) − (the state sent).

    Parameters
    ----------
    kind : one of :data:`SERVER_OPTIMIZERS`.
    learning_rate : η, the server learning rate.
    momentum : β₁ (avgm's momentum, adam's and yogi's first-moment decay).
    beta2 : β₂, adam's and yogi's second-moment decay.
    tau : τ, adam's and yogi's floor of √v (how adaptive the step is).
    """

    kind: str = "none"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    first: State = field(default_factory=dict)  # m, by array name
    second: State = field(default_factory=dict)  # v, by array name (adam, yogi)

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"kind={self.kind!r}: must be one of {SERVER_OPTIMIZERS}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate}: must be finite and > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}: must be in [0, 1)")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2={self.beta2}: must be in [0, 1)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau={self.tau}: must be finite and > 0")

    @property
    def is_plain_averaging(self) -> bool:
        """Whether the global state is the weighted mean itself (``none``: no step computed)."""
        return self.kind == "none"

    def describe(self) -> str:
        """One line for the strategy summary."""
        if self.kind == "none":
            return "server optimizer: none (the global state is the weighted mean)"
        if self.kind == "avgm":
            return f"server optimizer: FedAvgM (η {self.learning_rate:g}, β₁ {self.momentum:g})"
        return (f"server optimizer: Fed{self.kind.capitalize()} (η {self.learning_rate:g}, "
                f"β₁ {self.momentum:g}, β₂ {self.beta2:g}, τ {self.tau:g})")

    @torch.no_grad()
    def step(self, server_round: int, deltas: State) -> State:
        """The step to add to each array of ``deltas`` (Δ by name); updates the moments.

        The step and the moments are float32, on each Δ's device; Δ is used as given.
        """
        if self.kind == "none":
            return dict(deltas)
        return {key: self._step_one(server_round, key, delta.float())
                for key, delta in deltas.items()}

    def _step_one(self, t: int, key: str, delta: Tensor) -> Tensor:
        m = self.first.get(key)
        if self.kind == "avgm":
            m = delta.clone() if m is None else self.momentum * m.to(delta) + delta
            self.first[key] = m
            return self.learning_rate * m
        m = torch.zeros_like(delta) if m is None else m.to(delta)
        m = self.momentum * m + (1 - self.momentum) * delta
        v = self.second.get(key)
        v = torch.zeros_like(delta) if v is None else v.to(delta)
        square = delta * delta
        if self.kind == "adam":
            v = self.beta2 * v + (1 - self.beta2) * square
            eta = (self.learning_rate * math.sqrt(1 - self.beta2 ** (t + 1.0))
                   / (1 - self.momentum ** (t + 1.0)))
        else:  # yogi
            v = v - (1 - self.beta2) * square * torch.sign(v - square)
            eta = self.learning_rate
        self.first[key], self.second[key] = m, v
        return eta * m / (v.sqrt() + self.tau)

    @torch.no_grad()
    def transport(self, key: str, T: Tensor) -> None:
        """Re-express the moments of B-like array ``key`` after its coordinates turned.

        ``T`` (r, r) maps the old A to the new (A′ = T A_prev), so a row vector m of B's
        coordinates becomes m T⁻¹ and v becomes v (T⁻¹)^∘2 (see the module docstring). No-op
        for an array without moments.
        """
        if key not in self.first:
            return
        inverse = torch.linalg.inv(T.double())  # (r, r)
        m = self.first[key]
        self.first[key] = (m.double() @ inverse).to(m.dtype)
        if key in self.second:
            v = self.second[key]
            self.second[key] = (v.double() @ inverse.square()).clamp_min(0).to(v.dtype)

    def state_dict(self) -> State:
        """The moments as flat tensors (``m/<name>``, ``v/<name>``) for the checkpoint."""
        return ({f"m/{k}": v.cpu() for k, v in self.first.items()}
                | {f"v/{k}": v.cpu() for k, v in self.second.items()})

    def load_state_dict(self, tensors: State) -> None:
        """Inverse of :meth:`state_dict` (the moments of a resumed run)."""
        self.first = {k[2:]: v for k, v in tensors.items() if k.startswith("m/")}
        self.second = {k[2:]: v for k, v in tensors.items() if k.startswith("v/")}
        unknown = sorted(k for k in tensors if not k.startswith(("m/", "v/")))
        if unknown:
            raise ValueError(f"server optimizer state: unknown entries {unknown[:3]}")
