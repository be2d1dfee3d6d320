"""Grouped clipping: each group within its own norm, noise for the joint sensitivity."""

import math

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from client import training as t
from client.app import train
from common import contract
from common.config import AppConfig, ConfigError
from privacy import calibrate_noise
from privacy.grouped_clipping import (
    GroupedClipDPOptimizer,
    head_and_adapter_groups,
    joint_norm,
)
from tests.helpers import global_arrays, train_message


class TwoGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.adapter(x))


def _grouped(noise: float = 0.0, batch: int = 16, share: float = 0.25):
    torch.manual_seed(0)
    model = GradSampleModule(TwoGroups())
    inner = model._module
    groups = head_and_adapter_groups(list(inner.head.parameters()),
                                     list(inner.adapter.parameters()), 2.0, share)
    optimizer = GroupedClipDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=noise, groups=groups,
        expected_batch_size=batch)
    return model, inner, optimizer, groups


def test_each_group_of_each_example_is_clipped_to_its_own_norm():
    model, inner, optimizer, groups = _grouped()
    x = 100 * torch.randn(16, 6)  # large gradients: every example is clipped
    loss = (model(x) ** 2).sum()
    loss.backward()
    factors = optimizer.clip_factors()
    assert factors.shape == (2, 16)
    per_group = {0: list(inner.head.parameters()), 1: list(inner.adapter.parameters())}
    for g, params in per_group.items():
        norms = torch.sqrt(sum((p.grad_sample.reshape(16, -1) ** 2).sum(1) for p in params))
        clipped = norms * factors[g]
        assert torch.all(clipped <= groups[g][1] * (1 + 1e-5))
        assert torch.allclose(clipped, torch.full_like(clipped, groups[g][1]), rtol=1e-4)
    total = torch.sqrt(sum((factors[g] * torch.sqrt(sum((p.grad_sample.reshape(16, -1) ** 2)
                                                        .sum(1) for p in ps))) ** 2
                           for g, ps in per_group.items()))
    assert torch.all(total <= 2.0 * (1 + 1e-5))  # ‖ĝ_i‖ ≤ C = √(C_head² + C_lora²)


def test_small_gradients_are_not_clipped():
    model, inner, optimizer, _ = _grouped()
    loss = 1e-4 * model(torch.randn(16, 6)).sum()
    loss.backward()
    assert torch.all(optimizer.clip_factors() == 1.0)


def test_the_budget_split_keeps_the_joint_norm():
    groups = head_and_adapter_groups([], [], 2.0, 0.3)
    assert joint_norm(groups) == pytest.approx(2.0)
    assert groups[0][1] == pytest.approx(math.sqrt(0.3) * 2)
    with pytest.raises(ValueError, match="head-clip-share"):
        head_and_adapter_groups([], [], 2.0, 1.0)


def test_noise_is_sigma_times_the_joint_norm_and_meets_the_budget_by_an_independent_accountant():
    # Calibrate σ for (ε, δ, q, steps); measure the noise the grouped optimizer actually adds
    # with zero gradients; its std / joint sensitivity is the mechanism's effective σ, whose ε
    # by the PRV accountant (not the RDP one calibration uses) must be the target.
    epsilon, delta, q, steps = 3.0, 1e-5, 0.05, 200
    sigma = calibrate_noise(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                            steps=steps, accountant="rdp")
    batch = 16
    model, inner, optimizer, groups = _grouped(noise=sigma, batch=batch)
    for p in model.parameters():
        p.grad_sample = torch.zeros(batch, *p.shape)
        p.grad = torch.zeros_like(p)
    optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * batch
    measured_sigma = float(noise.std()) / joint_norm(groups)
    assert measured_sigma == pytest.approx(sigma, rel=0.25)  # 39 coordinates: a loose check
    assert optimizer.max_grad_norm == pytest.approx(2.0)
    assert optimizer.noise_multiplier == sigma
    prv = PRVAccountant()
    rdp = RDPAccountant()
    for _ in range(steps):
        prv.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=q)
        rdp.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=q)
    assert 0.99 * epsilon <= rdp.get_epsilon(delta) <= epsilon
    assert prv.get_epsilon(delta) <= epsilon  # RDP is the looser bound


def test_the_noise_std_is_exactly_sigma_c():
    model, inner, optimizer, groups = _grouped(noise=1.7, batch=1)
    big = nn.Parameter(torch.zeros(20000))
    optimizer2 = GroupedClipDPOptimizer(torch.optim.SGD([big], lr=1.0), noise_multiplier=1.7,
                                        groups=[([big], 0.6), ([], 0.8)], expected_batch_size=1)
    big.grad_sample = torch.zeros(1, 20000)
    big.grad = torch.zeros(20000)
    optimizer2.pre_step()
    assert float(big.grad.std()) == pytest.approx(1.7 * 1.0, rel=0.03)  # √(0.6² + 0.8²) = 1


def test_groups_must_cover_every_trained_tensor():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="every trained tensor"):
        GroupedClipDPOptimizer(torch.optim.SGD([a, b], lr=1.0), noise_multiplier=1.0,
                               groups=[([a], 1.0)], expected_batch_size=4)


def test_client_with_a_head_share_reports_the_same_epsilon_as_flat_clipping(tiny_run_config):
    def epsilon(share: float) -> tuple[float, float]:
        run_config = {**tiny_run_config, "privacy.epsilon": 6.0,
                      "privacy.head-clip-share": share}
        cfg = AppConfig.from_run_config(run_config)
        arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
        msg = train_message(arrays)
        msg.content[contract.CONFIG][contract.SERVER_ROUND] = 1
        context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                          node_config={"partition-id": 0, "num-partitions": 2})
        metrics = train(msg, context).content[contract.METRICS]
        return metrics[contract.EPSILON], metrics[contract.NOISE_MULTIPLIER]

    assert epsilon(0.2) == epsilon(0.0)


def test_head_share_is_refused_without_a_trained_head_or_with_ghost(tiny_run_config):
    with pytest.raises(ConfigError, match="frozen head takes no clipping budget"):
        AppConfig.from_run_config({**tiny_run_config, "privacy.head-clip-share": 0.2,
                                   "lora.train-head": False})
    with pytest.raises(ConfigError, match="grad-sample-mode='hooks'"):
        AppConfig.from_run_config({**tiny_run_config, "privacy.head-clip-share": 0.2,
                                   "privacy.grad-sample-mode": "ghost"})
