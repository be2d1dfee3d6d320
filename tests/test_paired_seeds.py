"""Paired seeds: the same clients per round for every method; the public head costs nothing."""

import random

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client import training as t
from client.app import query, train
from common import contract
from common.adapter import AdapterLayout
from common.batching import split_batch
from common.config import AppConfig
from common.data import load_corpus
from common.data_files import DataError
from common.model import build_model, load_tokenizer
from common.public_head import (
    duplicate_name_texts,
    head_linear,
    name_features,
    name_text,
    names_without_letters,
    set_class_name_head,
)
from common.tasks import TASKS
from server.preflight import check_run
from strategies.sampling import PartitionSampler
from tests.helpers import train_message


class RollCallGrid:
    """Nodes with random ids (as a fresh simulation makes) that answer the roll call."""

    def __init__(self, num_partitions: int, rng: random.Random, silent: int | None = None):
        self.partition_of = {rng.getrandbits(63): p for p in range(num_partitions)}
        self.silent = silent
        self.queries = 0

    def get_node_ids(self):
        return list(self.partition_of)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.queries += 1
            partition = self.partition_of[msg.metadata.dst_node_id]
            if partition == self.silent:
                continue
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(),
                              run_config={}, node_config={"partition-id": partition,
                                                          "num-partitions": 6})
            replies.append(query(msg, context))
        return replies


def _draws(grid: RollCallGrid, seed: int, rounds: int = 5, k: int = 3) -> list[list[int]]:
    sampler = PartitionSampler(seed)
    return [[grid.partition_of[n] for n in sampler.sample(grid, r, k, grid.get_node_ids())]
            for r in range(1, rounds + 1)]


def test_two_runs_with_other_node_ids_train_the_same_partitions_each_round():
    first = _draws(RollCallGrid(6, random.Random(1)), seed=0)
    second = _draws(RollCallGrid(6, random.Random(2)), seed=0)
    assert first == second
    assert len({tuple(d) for d in first}) > 1  # rounds differ
    assert _draws(RollCallGrid(6, random.Random(1)), seed=1) != first  # seeds differ
    assert all(len(set(d)) == 3 for d in first)


def test_the_roll_call_asks_each_node_once_and_leaves_out_the_silent():
    grid = RollCallGrid(6, random.Random(3), silent=4)
    draws = _draws(grid, seed=0, rounds=10)
    assert grid.queries == 6
    assert all(4 not in d for d in draws)
    few = RollCallGrid(3, random.Random(0), silent=0)  # 2 answer, 3 are to be sampled
    assert (sorted(PartitionSampler(0).sample(few, 1, 3, few.get_node_ids()))
            == sorted(few.get_node_ids()))


def test_seeded_sampling_is_the_default():
    assert AppConfig().strategy.client_sampling == "seeded"


def test_dp_noise_still_differs_between_two_runs_of_one_seed(tiny_run_config):
    # the paired seed fixes partitions and client draws, never the DP noise
    from tests.test_client_randomness import same_tensors, trained_b

    run_config = {**tiny_run_config, "privacy.epsilon": 6.0}
    assert not same_tensors(trained_b(run_config), trained_b(run_config))


def _server_model(run_config: dict):
    cfg = AppConfig.from_run_config(run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    model = build_model(cfg.model, cfg.lora, num_labels=corpus.num_labels, seed=cfg.seed)
    set_class_name_head(model, load_tokenizer(cfg.model), corpus.label_names)
    return cfg, model, AdapterLayout.from_model(model)


def test_class_name_head_is_a_function_of_public_values_alone(tiny_run_config):
    _, first, _ = _server_model(tiny_run_config)
    _, again, _ = _server_model({**tiny_run_config, "seed": 7})  # another random init
    w1, w2 = head_linear(first).weight, head_linear(again).weight
    assert torch.equal(w1, w2)
    assert torch.all(head_linear(first).bias == 0)
    assert name_text("rec.sport.hockey") == "rec sport hockey"


@torch.no_grad()
def test_class_name_head_is_centred_so_every_logit_row_sums_to_zero(tiny_run_config):
    # The tiny random encoder barely tells its class names apart (τ ~ 1e5): without centring,
    # every logit carried a common term of ~1.7e5 that float32 could not resolve
    cfg, model, _ = _server_model(tiny_run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    W = head_linear(model).weight.double()
    features = name_features(model, tokenizer, corpus.label_names).double()
    names = features @ W.T  # (K, K): the names' own logits
    assert names.std(dim=1).mean().item() == pytest.approx(1.0, rel=1e-4)
    # The uncentred head τ·u_k has the same softmax: the logits differ by one constant per text
    unit = features / features.norm(dim=1, keepdim=True)
    tau = (W[0].norm() / (unit[0] - unit.mean(dim=0)).norm()).item()
    shift = features @ (tau * unit).T - names
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), rtol=1e-6, atol=1e-6 * tau)
    # Every text's logits (bias 0) average to zero, up to the head's float32 rounding, on the
    # test texts as on the names: no common term beside the differences that decide
    model.eval()
    inputs, _ = split_batch(TASKS["classification"].encode(corpus.test, tokenizer,
                                                           cfg.model.max_length).tensors)
    logits = model(**inputs).logits.double()
    assert logits.mean(dim=1).abs().max().item() <= 1e-4 * logits.std(dim=1).mean().item()


def test_public_frozen_head_is_identical_on_every_node_and_spends_no_privacy(tiny_run_config):
    run_config = {**tiny_run_config, "lora.train-head": False, "lora.head-init": "class-names",
                  "privacy.epsilon": 6.0}
    cfg, _, layout = _server_model(run_config)
    sent = layout.tensors()
    head_keys = set(layout.head)
    arrays = ArrayRecord(torch_state_dict=sent)
    for node_seed in (0, 1):  # a node's own random head init is replaced by the sent one
        node_cfg = AppConfig.from_run_config({**run_config, "seed": node_seed})
        _, node_layout = t.build_global_model(node_cfg, 3, arrays)
        assert all(torch.equal(node_layout.tensors()[k], sent[k]) for k in head_keys)

    def reply(config: dict):
        msg = train_message(arrays)
        msg.content[contract.CONFIG] = ConfigRecord({contract.TRAIN_FACTORS: "B",
                                                     contract.SERVER_ROUND: 1})
        context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=config,
                          node_config={"partition-id": 0, "num-partitions": 2})
        return train(msg, context).content

    public = reply(run_config)
    assert not head_keys & set(public[contract.ARRAYS])  # a frozen head is never sent back
    random_head = reply({**run_config, "lora.head-init": "random"})
    assert public[contract.METRICS][contract.EPSILON] == \
        random_head[contract.METRICS][contract.EPSILON]


def test_the_defaults_use_the_public_class_name_head():
    cfg = AppConfig.from_run_config({})
    assert cfg.lora.head_init == "class-names" and not cfg.lora.train_head


def test_class_names_that_read_alike_are_refused_before_training(tiny_run_config, tmp_path):
    rows = [{"body": f"text number {i}", "topic": ("sci.space", "sci_space", "rec")[i % 3]}
            for i in range(300)]
    source = tmp_path / "alike.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    run_config = {**tiny_run_config, "data.source": str(source),
                  "lora.head-init": "class-names"}
    with pytest.raises(DataError, match="'sci.space' and 'sci_space' read as the same text"):
        check_run(AppConfig.from_run_config(run_config))
    check_run(AppConfig.from_run_config({**run_config, "lora.head-init": "random"}))


def test_the_tokenizer_decides_which_class_names_read_alike(tiny_run_config):
    from tokenizers.normalizers import BertNormalizer

    names = ("Spam", "spam", "sci.space", "sci_space")
    model_cfg = AppConfig.from_run_config(tiny_run_config).model
    uncased = load_tokenizer(model_cfg)  # MiniLM's
    assert duplicate_name_texts(names, uncased) == [("Spam", "spam"), ("sci.space", "sci_space")]
    cased = load_tokenizer(model_cfg)  # the same vocabulary, read without lower-casing
    cased.backend_tokenizer.normalizer = BertNormalizer(lowercase=False)
    assert duplicate_name_texts(names, cased) == [("sci.space", "sci_space")]


def test_names_without_letters_are_the_ones_a_class_name_head_cannot_read():
    assert names_without_letters(("0", "1", "12.5", "spam", "class 2")) == ["0", "1", "12.5"]
