import math

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from client import training as t
from client.app import train
from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig
from common.model import build_model
from tests.helpers import global_arrays, private_sgd, train_message

NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.mark.parametrize("train_head", [False, True])
def test_local_training_changes_b_and_only_b(tiny_run_config, train_head):
    cfg = AppConfig.from_run_config({**tiny_run_config, "lora.train-head": train_head})
    data = t.load_local_data(cfg, 0, 2)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    trainable = layout.set_trainable(model, ("B",), train_head)
    expected = {id(p.B) for p in layout.pairs} | ({id(p) for p in layout.head.values()}
                                                   if train_head else set())
    assert {id(p) for p in trainable} == expected
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    private = private_sgd(model, trainable, data.train)
    assert {id(p) for g in private.optimizer.param_groups for p in g["params"]} == expected
    t.run_local_steps(private, 3)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    b_names = {k for k in before if ".lora_B." in k}
    head_names = {k for k in before if "classifier.modules_to_save" in k}
    assert b_names <= changed
    assert changed == (b_names | head_names if train_head else b_names)


def test_reported_epsilon_is_cumulative_and_matches_an_independent_accountant(
        tiny_run_config, task_identity):
    run_config = {**tiny_run_config, "strategy.num-rounds": 3, "privacy.epsilon": 4.0}
    cfg = AppConfig.from_run_config(run_config)
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=run_config)
    data = t.load_local_data(cfg, 0, 2)
    arrays = global_arrays(cfg, data.num_labels)
    q = 1 / math.ceil(len(data.train) / cfg.train.batch_size)
    independent = RDPAccountant()
    for _ in range(3):
        reply = train(train_message(arrays), context)
        metrics = reply.content[contract.METRICS]
        assert metrics[contract.BUDGET_EXHAUSTED] == 0
        assert metrics[contract.B_DELTA_NORM] > 0
        for _ in range(cfg.train.local_steps):
            independent.step(noise_multiplier=metrics[contract.NOISE_MULTIPLIER], sample_rate=q)
        assert metrics[contract.EPSILON] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
        sent = set(reply.content[contract.ARRAYS].keys())
        assert sent and all(k.endswith(".lora_B") or contract.is_head_key(k) for k in sent)
    assert metrics[contract.EPSILON] <= 4.0
    refused = train(train_message(arrays), context).content[contract.METRICS]
    assert refused[contract.BUDGET_EXHAUSTED] == 1 and refused[contract.STEPS] == 0
    assert refused[contract.EPSILON] == metrics[contract.EPSILON]  # nothing more was spent


def test_non_private_run_takes_the_same_path_without_noise(tiny_run_config, task_identity):
    run_config = {**tiny_run_config, "privacy.epsilon": math.inf}
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=run_config)
    cfg = AppConfig.from_run_config(run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    metrics = train(train_message(arrays), context).content[contract.METRICS]
    assert metrics[contract.NOISE_MULTIPLIER] == 0 and math.isinf(metrics[contract.EPSILON])
    assert metrics[contract.B_DELTA_NORM] > 0


def test_federated_evaluation_tokenizes_the_test_share_only_when_asked(tiny_run_config):
    from flwr.app import Message, MessageType

    from client.app import evaluate
    from common.data import load_partition
    from common.evaluation import evaluate as evaluate_model
    from common.model import load_tokenizer
    from common.tasks import TASKS

    cfg = AppConfig.from_run_config(tiny_run_config)
    t.load_local_data.cache_clear()
    data = t.load_local_data(cfg, 0, 2)
    assert "test" not in vars(data)  # training never reads it: not tokenized yet
    arrays = global_arrays(cfg, data.num_labels)
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=tiny_run_config)
    message = Message(RecordDict({contract.ARRAYS: arrays}), dst_node_id=1,
                      message_type=MessageType.EVALUATE)
    metrics = evaluate(message, context).content[contract.METRICS]
    # The reply is the evaluation of the global adapter on this node's test share, tokenized
    # as the training share is
    _, test = load_partition(cfg.data, cfg.seed, 0, 2)
    expected = TASKS["classification"].encode(test, load_tokenizer(cfg.model), cfg.model.max_length)
    assert all(torch.equal(a, b) for a, b in zip(data.test.tensors, expected.tensors,
                                                 strict=True))
    model, _ = t.build_global_model(cfg, data.num_labels, arrays)
    loss, accuracy = evaluate_model(model, expected, compute_dtype=t.compute_dtype(cfg.model))
    assert metrics[contract.NUM_EXAMPLES] == len(test) > 0
    assert metrics[contract.ACCURACY] == pytest.approx(accuracy, abs=1e-12)
    assert metrics[contract.LOSS] == pytest.approx(loss, rel=1e-6)


def test_an_empty_poisson_batch_is_the_noise_only_step(tiny_run_config):
    # No model runs on 0 rows (BERT and Llama both reshape with -1), so the step is taken
    # without a forward: B ← B − lr · N(0, σ²C²) / B_expected, computed here independently
    cfg = AppConfig.from_run_config(tiny_run_config)
    data = t.load_local_data(cfg, 0, 2)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    private = private_sgd(model, layout.set_trainable(model, ("B",), cfg.lora.train_head),
                          data.train, lr=0.5, noise_multiplier=1.3, max_grad_norm=2.0)
    params = list(private.optimizer.params)
    before = [p.detach().clone() for p in params]
    private.data_loader = [tuple(x[:0] for x in data.train.tensors)]
    torch.manual_seed(0)
    assert math.isnan(t.run_local_steps(private, 1))  # no example, no loss
    assert len(private.engine.accountant.history) == 1  # the step is counted
    torch.manual_seed(0)  # the same draws, in the optimizer's order of parameters
    expected_batch = private.optimizer.expected_batch_size
    for p, start in zip(params, before, strict=True):
        noise = torch.normal(mean=0, std=1.3 * 2.0, size=p.shape)
        torch.testing.assert_close(p.detach(), start - 0.5 * noise / expected_batch)
