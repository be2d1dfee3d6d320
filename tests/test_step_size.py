"""train.learning-rate-scale = "delta-w": one client rate means the same step in ΔW per method."""

import math

import pytest
import torch
from flwr.app import Context, RecordDict

from client import training as t
from client.app import train
from client.step_size import delta_w_gain, parameter_groups
from common import contract
from common.adapter import AdapterLayout, LoraPair
from common.config import AppConfig, ConfigError
from common.model import build_model
from privacy import PrivacyLedger
from privacy.policy import RoundPrivacy
from tests.conftest import default_run_config
from tests.helpers import global_arrays, train_message

D_OUT, D_IN, R, S = 384, 384, 8, 2.0


def _pair(A: torch.Tensor, B: torch.Tensor) -> LoraPair:
    return LoraPair("m", torch.nn.Parameter(A), torch.nn.Parameter(B),
                    torch.nn.Parameter(torch.zeros(D_OUT, D_IN)), scale=S)


def _orthonormal(g) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(D_IN, R, generator=g))[0].T.contiguous()  # (r, d_in)


def _kaiming(g) -> torch.Tensor:  # peft's default A: U(−1/√d_in, 1/√d_in)
    return (torch.rand(R, D_IN, generator=g) * 2 - 1) / math.sqrt(D_IN)


def test_the_gain_is_s_for_an_orthonormal_a_and_about_s_over_root_3_for_peft_init():
    g = torch.Generator().manual_seed(0)
    zero_b = torch.zeros(D_OUT, R)
    assert delta_w_gain(_pair(_orthonormal(g), zero_b), "B") == pytest.approx(S, rel=1e-5)
    assert delta_w_gain(_pair(_kaiming(g), zero_b), "B") == pytest.approx(S / math.sqrt(3),
                                                                          rel=0.03)
    big_b = torch.randn(D_OUT, R, generator=g)  # ‖B‖_F ≫ ‖A‖_F: A's steps move ΔW most
    pair = _pair(_kaiming(g), big_b)
    assert delta_w_gain(pair, "AB") == pytest.approx(S * float(big_b.norm()) / math.sqrt(R))
    assert delta_w_gain(pair, "B") == pytest.approx(S / math.sqrt(3), rel=0.03)  # A's norm only


@pytest.mark.parametrize("a_init", [_orthonormal, _kaiming])
def test_one_normalised_rate_moves_delta_w_by_the_same_amount_whatever_a(a_init):
    # A DP-SGD step in B has a size fixed by clipping (here a unit-norm random direction); at
    # rate η / g it moves ΔW = s ΔB A by η in Frobenius norm, for FedSVD's A and FFA-LoRA's alike.
    g = torch.Generator().manual_seed(1)
    pair = _pair(a_init(g), torch.zeros(D_OUT, R))
    rate = 0.5 / delta_w_gain(pair, "B")
    sizes = []
    for _ in range(20):
        direction = torch.randn(D_OUT, R, generator=g)
        step = rate * direction / direction.norm()
        sizes.append(float((S * step @ pair.A).norm()))
    assert sum(sizes) / len(sizes) == pytest.approx(0.5, rel=0.03)


def test_groups_per_layer_and_the_head_at_the_plain_rate(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    model = build_model(cfg.model, cfg.lora, num_labels=3, seed=0)
    layout = AdapterLayout.from_model(model)
    layout.set_trainable(model, ("B",), True)
    kwargs = dict(train_head=True, learning_rate=0.4)
    plain = parameter_groups(layout, "B", scale="none", private=True, **kwargs)
    assert {g["lr"] for g in plain} == {0.4}
    dp = parameter_groups(layout, "B", scale="delta-w", private=True, **kwargs)
    no_dp = parameter_groups(layout, "B", scale="delta-w", private=False, **kwargs)
    for pair, group, group2 in zip(layout.pairs, dp, no_dp, strict=False):
        gain = delta_w_gain(pair, "B")
        assert group["params"] == [pair.B]
        assert group["lr"] == pytest.approx(0.4 / gain)
        assert group2["lr"] == pytest.approx(0.4 / gain ** 2)
    assert dp[-1]["params"] == list(layout.head.values()) and dp[-1]["lr"] == 0.4
    trained = {id(p) for g in dp for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_private_client_round_steps_at_the_normalised_rates(tiny_run_config, task_identity):
    run_config = {**tiny_run_config, "train.learning-rate-scale": "delta-w"}
    cfg = AppConfig.from_run_config(run_config)
    data = t.load_local_data(cfg, 0, 2)
    arrays = global_arrays(cfg, data.num_labels)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    layout.load(arrays.to_torch_state_dict())
    budget = RoundPrivacy(noise_multiplier=1.0, sample_rate=0.5, steps=2, epsilon_after=1.0,
                          exhausted=False)
    private = t.privatize(cfg, model, layout, ("B",), data.train, budget, PrivacyLedger())
    rates = [g["lr"] for g in private.optimizer.param_groups]
    want = [cfg.train.learning_rate / delta_w_gain(p, "B") for p in layout.pairs]
    assert rates[:-1] == pytest.approx(want) and rates[-1] == cfg.train.learning_rate
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    metrics = train(train_message(arrays), context).content[contract.METRICS]
    assert metrics[contract.B_DELTA_NORM] > 0


def test_an_unknown_scale_is_refused_by_key():
    with pytest.raises(ConfigError, match="train.learning-rate-scale"):
        AppConfig.from_run_config({**default_run_config(), "train.learning-rate-scale": "adam"})
