"""Fakes and helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from privacy import PrivacyLedger, PrivateTraining, make_private


class FakeGrid:
    """The part of a Flower ``Grid`` a strategy's ``configure_train`` uses: node ids 1..n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def private_sgd(model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                dataset: torch.utils.data.Dataset, *, loader=None, lr: float = 0.5,
                **kwargs) -> PrivateTraining:
    """Real Opacus DP-SGD over ``trainable`` (σ = 1, C = 1, batch 8, a fresh ledger)."""
    return make_private(
        module=model, optimizer=torch.optim.SGD(trainable, lr=lr),
        data_loader=loader or torch.utils.data.DataLoader(dataset, batch_size=8),
        noise_multiplier=kwargs.pop("noise_multiplier", 1.0),
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0), ledger=PrivacyLedger(), **kwargs)
