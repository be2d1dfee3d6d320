"""The one client code path for every strategy: A and B both trained, base residuals applied."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from client import training as t
from client.app import query, train
from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig
from common.model import build_model
from server.results import BASE_DELTA_FILE, load_model, save_adapter
from strategies.registry import build_strategy
from tests.helpers import private_sgd

NODE = {"partition-id": 0, "num-partitions": 2}


def _layout_with(cfg: AppConfig, num_labels: int, *, base: bool):
    """A model whose B is non-zero and, with ``base``, a random ΔW per layer in its arrays."""
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed)
    layout = AdapterLayout.from_model(model)
    generator = torch.Generator().manual_seed(1)
    arrays = {}
    with torch.no_grad():
        for pair in layout.pairs:
            pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=generator))
            if base:
                shape = (pair.B.shape[0], pair.A.shape[1])
                arrays[contract.base_key(pair.module)] = 0.1 * torch.randn(shape,
                                                                           generator=generator)
    return model, layout, {**layout.tensors(), **arrays}


def test_local_training_of_a_and_b_changes_both_and_nothing_else(tiny_run_config):
    # Prepare
    cfg = AppConfig.from_run_config(tiny_run_config)
    data = t.load_local_data(cfg, 0, 2)
    model, layout, _ = _layout_with(cfg, data.num_labels, base=False)
    trainable = layout.set_trainable(model, ("A", "B"), train_head=False)
    expected = {id(p.A) for p in layout.pairs} | {id(p.B) for p in layout.pairs}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Execute
    private = private_sgd(model, trainable, data.train)
    t.run_local_steps(private, 3)
    # Assert: the optimizer holds exactly A and B; every A and B moved, nothing else did
    assert {id(p) for p in trainable} == expected
    assert {id(p) for g in private.optimizer.param_groups for p in g["params"]} == expected
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert len(lora) == 2 * len(layout.pairs) and changed == lora


def test_train_reply_carries_exactly_the_factors_asked_for(tiny_run_config):
    # Prepare: the strategy asks for "A,B"
    cfg = AppConfig.from_run_config(tiny_run_config)
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=tiny_run_config)
    _, layout, arrays = _layout_with(cfg, t.load_local_data(cfg, 0, 2).num_labels, base=True)
    content = RecordDict({contract.ARRAYS: ArrayRecord(torch_state_dict=arrays),
                          contract.CONFIG: ConfigRecord({contract.TRAIN_FACTORS: "A,B"})})
    # Execute
    reply = train(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context)
    # Assert: A and B of every layer and the head; no base residual goes up
    sent = reply.content[contract.ARRAYS].to_torch_state_dict()
    want = {contract.lora_key(m, f) for m in layout.modules for f in "AB"} | set(layout.head)
    assert set(sent) == want
    for m in layout.modules:
        for f in "AB":
            assert not torch.equal(sent[contract.lora_key(m, f)], arrays[contract.lora_key(m, f)])
    assert reply.content[contract.METRICS][contract.B_DELTA_NORM] > 0


def test_moved_norm_requires_every_trained_factor_to_move_under_dp(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    _, layout, _ = _layout_with(cfg, 3, base=False)
    before = layout.tensors(("A", "B"), head=False)
    with torch.no_grad():
        layout.pairs[0].B.add_(1.0)  # B moved, A did not
    with pytest.raises(RuntimeError, match=r"did not change LoRA factor\(s\) \['A'\]"):
        t.moved_norm(before, layout, ("A", "B"), require_each=True)
    moved = t.moved_norm(before, layout, ("A", "B"), require_each=False)
    assert moved == pytest.approx(layout.pairs[0].B.numel() ** 0.5)
    with pytest.raises(RuntimeError, match="did not change"):
        t.moved_norm(before, layout, ("A",), require_each=False)


@torch.no_grad()
def test_client_model_computes_base_plus_delta_plus_scaled_lora(tiny_run_config):
    # Prepare: pretrained weights W0 of a fresh model, global arrays with B ≠ 0 and ΔW ≠ 0
    cfg = AppConfig.from_run_config({**tiny_run_config, "lora.alpha": 8})  # s = 8 / 4 = 2
    _, fresh_layout, arrays = _layout_with(cfg, 3, base=True)
    w0 = {p.module: p.W.detach().clone() for p in fresh_layout.pairs}
    # Execute: the client's model loading
    model, layout = t.build_global_model(cfg, 3, ArrayRecord(torch_state_dict=arrays))
    model.eval()
    # Assert: each LoRA layer computes x (W0 + ΔW + s B A)ᵀ + b, checked in float64
    assert layout.scale == 2.0
    modules = dict(model.base_model.model.named_modules())
    x = torch.randn(5, layout.pairs[0].A.shape[1], dtype=torch.float64)
    for pair in layout.pairs:
        B = arrays[contract.lora_key(pair.module, "B")].double()
        A = arrays[contract.lora_key(pair.module, "A")].double()
        W = w0[pair.module].double() + arrays[contract.base_key(pair.module)].double() + 2.0 * B @ A
        bias = modules[pair.module].get_base_layer().bias.double()
        got = modules[pair.module](x.float()).double()
        assert torch.allclose(got, x @ W.T + bias, atol=1e-5)
    # Loading again replaces ΔW (the server loads every round); no base array: back to W0
    layout.load(arrays)
    pair = layout.pairs[0]
    assert torch.allclose(pair.W, w0[pair.module] + arrays[contract.base_key(pair.module)])
    layout.load({k: v for k, v in arrays.items() if not contract.is_base_key(k)})
    assert all(torch.equal(p.W, w0[p.module]) for p in layout.pairs)


@torch.no_grad()
def test_saved_adapter_keeps_the_base_delta_and_load_model_applies_it(tiny_run_config, tmp_path):
    # Prepare: the server's model with ΔW loaded, as after a FLoRA / FedEx-LoRA run
    cfg = AppConfig.from_run_config(tiny_run_config)
    model, layout, arrays = _layout_with(cfg, 3, base=True)
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
    # Execute
    save_adapter(model, layout, ArrayRecord(torch_state_dict=arrays), tmp_path)
    model.eval()

    def run(m):  # the logits and the encoder output (more sensitive: the random head is tiny)
        out = m(input_ids=ids, output_hidden_states=True)
        return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])

    want = run(model)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            cfg.model.path, num_labels=3, ignore_mismatched_sizes=True)

    loaded = load_model(base(), tmp_path).eval()
    lora_only = PeftModel.from_pretrained(base(), tmp_path).eval()
    # Assert: the whole model is restored; the peft adapter alone is not the trained model
    assert (tmp_path / BASE_DELTA_FILE).is_file()
    assert torch.allclose(run(loaded), want, atol=1e-5)
    assert float((run(lora_only) - want).abs().max()) > 0.05
    # A method without ΔW writes no such file (and removes a stale one)
    no_base = {k: v for k, v in arrays.items() if not contract.is_base_key(k)}
    save_adapter(model, layout, ArrayRecord(torch_state_dict=no_base), tmp_path)
    assert not (tmp_path / BASE_DELTA_FILE).exists()


class _Grid:
    """Nodes 1 and 2 holding partitions 0 and 1; they answer the roll call of seeded sampling."""

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        return [query(msg, Context(run_id=1, node_id=msg.metadata.dst_node_id,
                                   node_config={**NODE, "partition-id": msg.metadata.dst_node_id
                                                - 1}, state=RecordDict(), run_config={}))
                for msg in messages]


@pytest.mark.parametrize("name", ["flora", "fedex", "rolora"])
def test_two_rounds_in_process_through_the_real_client_and_saved_model(name, tiny_run_config,
                                                                       tmp_path):
    # Prepare: the server's model and strategy, two clients on their own partitions
    run_config = {**tiny_run_config, "strategy.name": name}
    cfg = AppConfig.from_run_config(run_config)
    num_labels = t.load_local_data(cfg, 0, 2).num_labels
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed)
    layout = AdapterLayout.from_model(model)
    strategy = build_strategy(cfg, layout)
    contexts = [Context(run_id=1, node_id=k + 1, node_config={**NODE, "partition-id": k},
                        state=RecordDict(), run_config=run_config) for k in range(2)]
    arrays = ArrayRecord(torch_state_dict=layout.tensors())
    # Execute: two rounds, each client training what the strategy asks for
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
        replies = [train(msg, ctx) for msg, ctx in zip(messages, contexts, strict=True)]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert metrics["clients-trained"] == 2 and metrics["replies-rejected"] == 0
    # Assert: ΔW is in the global state exactly for the methods that fold into the base
    state = arrays.to_torch_state_dict()
    has_base = {contract.is_base_key(k) for k in state}
    assert has_base == ({False, True} if name in ("flora", "fedex") else {False})
    save_adapter(model, layout, arrays, tmp_path)  # loads ``arrays`` into the server's model
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
    base = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.path, num_labels=num_labels, ignore_mismatched_sizes=True)
    loaded = load_model(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                              atol=1e-5)
