"""merge-sv: LoRA layers in SVD form, σ-only DP training, the merged start, the saved adapter."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus import GradSampleModule
from peft import PeftModel
from test_merging import random_pairs, write_adapter
from transformers import AutoModelForSequenceClassification

from client import training as t
from client.app import train
from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig, ConfigError
from common.model import build_model
from common.singular_values import SingularValueLinear
from server.merged_adapter import merged_adapter_state
from server.results import save_adapter
from strategies.merge_sv import svd_form_state
from tests.helpers import private_sgd

MODULES = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
           for p in ("query", "value")]
NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture()
def merge_sv_config(tiny_run_config, tmp_path) -> dict:
    """The tiny run config with strategy merge-sv on a rank-4 adapter of the tiny BERT."""
    pairs = random_pairs(np.random.default_rng(0), 4)
    folder = write_adapter(tmp_path / "merged", pairs, r=4, alpha=4, head=False)
    return {**tiny_run_config, "strategy.name": "merge-sv", "strategy.server-optimizer": "none",
            "strategy.merged-adapter": str(folder), "lora.alpha": 8}  # s = 8 / 4 = 2


def _svd_model(run_config: dict, num_labels: int = 3):
    """The merge-sv model with the merged adapter loaded; its arrays; the merge's pairs."""
    cfg = AppConfig.from_run_config(run_config)
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed, svd_form=True)
    layout = AdapterLayout.from_model(model)
    arrays = {**layout.tensors(), **merged_adapter_state(
        cfg.strategy.merged_adapter, layout.modules, cfg.lora.r, layout.scale)}
    layout.load(arrays)
    return cfg, model, layout, arrays


def test_grad_sampler_gives_the_per_example_gradients_of_sigma_and_a():
    torch.manual_seed(0)
    layer = SingularValueLinear(5, 3)
    with torch.no_grad():
        layer.singular_values.copy_(torch.tensor([2.0, -0.5, 1.5]))
    x, target = torch.randn(4, 6, 5), torch.randn(4, 6, 3)
    wrapped = GradSampleModule(torch.nn.Sequential(layer), loss_reduction="sum")
    (wrapped(x) * target).sum().backward()
    for i in range(4):  # one backward per example, without Opacus
        plain = SingularValueLinear(5, 3)
        plain.load_state_dict(layer.state_dict())
        (plain(x[i:i + 1]) * target[i:i + 1]).sum().backward()
        assert torch.allclose(layer.singular_values.grad_sample[i], plain.singular_values.grad,
                              atol=1e-5)
        assert torch.allclose(layer.weight.grad_sample[i], plain.weight.grad, atol=1e-5)


def test_svd_form_state_is_exact_orthonormal_and_keeps_zeros():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng, 4, m=12, n=9, modules=["a", "b"])
    B, A = pairs["b"]
    pairs["b"] = (torch.cat([B[:, :2], torch.zeros(12, 2)], dim=1), A)  # rank 2 of 4
    state = svd_form_state(pairs, lora_scale=2.0)
    for module, (B, A) in pairs.items():
        U = state[contract.lora_key(module, "B")].double()
        Vh = state[contract.lora_key(module, "A")].double()
        sigma = state[contract.lora_key(module, "S")].double()
        want = B.double() @ A.double()
        got = 2.0 * U @ torch.diag(sigma) @ Vh
        assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want)
        assert torch.allclose(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(Vh @ Vh.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
        assert (sigma[:-1] >= sigma[1:]).all() and (sigma >= 0).all()
    assert torch.count_nonzero(state[contract.lora_key("b", "S")][2:].abs() > 1e-6) == 0


@torch.no_grad()
def test_svd_form_model_computes_the_merge_and_saves_as_plain_lora(merge_sv_config, tmp_path):
    # Prepare: the merge-sv model; the adapter's own deltas Δ = (alpha / r) B A, s = 1 here
    cfg, model, layout, arrays = _svd_model(merge_sv_config)
    pairs = random_pairs(np.random.default_rng(0), 4)
    model.eval()
    modules = dict(model.base_model.model.named_modules())
    x = torch.randn(5, 32)
    # Assert: each layer computes W0 x + s U diag(σ) Vᵀ x = (W0 + Δ) x
    assert all(p.S is not None for p in layout.pairs) and layout.scale == 2.0
    for module, (B, A) in pairs.items():
        layer = modules[module]
        W = layer.get_base_layer().weight.double() + B.double() @ A.double()
        want = x.double() @ W.T + layer.get_base_layer().bias.double()
        assert torch.allclose(layer(x).double(), want, atol=1e-4)
    # Execute: save (σ folded into B), load with peft alone into a fresh base
    ids = torch.randint(1000, 2000, (3, 8))
    expected = model(input_ids=ids).logits
    save_adapter(model, layout, ArrayRecord(torch_state_dict=arrays), tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model.path, num_labels=3,
                                                              ignore_mismatched_sizes=True)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # Assert: the same function, with ordinary LoRA layers
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    assert not any(isinstance(m, SingularValueLinear) for m in loaded.modules())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_of_sigma_changes_nothing_but_sigma(merge_sv_config, mode):
    # Prepare
    cfg, model, layout, _ = _svd_model(merge_sv_config)
    data = t.load_local_data(cfg, 0, 2)
    trainable = layout.set_trainable(model, ("S",), train_head=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Execute: real Opacus DP-SGD, 3 steps
    private = private_sgd(model, trainable, data.train, grad_sample_mode=mode)
    t.run_local_steps(private, 3)
    # Assert: every σ moved; U, V, the base weights and the head did not
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    sigmas = {k for k in before if k.endswith("singular_values")}
    assert len(sigmas) == len(MODULES) and changed == sigmas


def test_client_reply_carries_sigma_and_the_head_only(merge_sv_config):
    # Prepare: the strategy asks for "S"
    cfg, _, layout, arrays = _svd_model(merge_sv_config)
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=merge_sv_config)
    content = RecordDict({contract.ARRAYS: ArrayRecord(torch_state_dict=arrays),
                          contract.CONFIG: ConfigRecord({contract.TRAIN_FACTORS: "S",
                                                         contract.SERVER_ROUND: 1})})
    # Execute
    reply = train(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context)
    # Assert: σ of every layer (r floats each) and the head; σ moved under DP, ε is finite
    sent = reply.content[contract.ARRAYS].to_torch_state_dict()
    assert set(sent) == {contract.lora_key(m, "S") for m in MODULES} | set(layout.head)
    for m in MODULES:
        key = contract.lora_key(m, "S")
        assert sent[key].shape == (cfg.lora.r,) and not torch.equal(sent[key], arrays[key])
    assert 0 < reply.content[contract.METRICS][contract.EPSILON] <= cfg.privacy.epsilon


def test_merge_sv_configuration_errors(merge_sv_config, tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.merged-adapter='': required"):
        AppConfig.from_run_config({**merge_sv_config, "strategy.merged-adapter": ""})
    with pytest.raises(ConfigError, match=r"strategy.merged-adapter='x': .*empty with any"):
        AppConfig.from_run_config({"strategy.merged-adapter": "x"})
    cfg = AppConfig.from_run_config(merge_sv_config)
    folder = cfg.strategy.merged_adapter
    with pytest.raises(ConfigError, match=r"has rank \[4\], lora.r=8"):
        merged_adapter_state(folder, MODULES, 8, 1.0)
    with pytest.raises(ConfigError, match=r"other modules.*missing \['x.query'\]"):
        merged_adapter_state(folder, [*MODULES, "x.query"], 4, 1.0)
    with pytest.raises(ConfigError, match=r"strategy.merged-adapter=.*missing adapter_config"):
        merged_adapter_state(tmp_path, MODULES, 4, 1.0)
