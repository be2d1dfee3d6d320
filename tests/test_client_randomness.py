"""Client randomness: unpredictable under DP, reproducible only when asked (ε = inf)."""

import math

import torch
from flwr.app import Context, RecordDict

from client import training as t
from client.app import train
from common import contract
from common.config import AppConfig
from tests.helpers import global_arrays, train_message


def trained_b(run_config: dict, *, server_round: int = 1, partition: int = 0) -> dict:
    """B after one round of a fresh node (a new process would start the same way)."""
    cfg = AppConfig.from_run_config(run_config)
    arrays = global_arrays(cfg, t.load_local_data(cfg, 0, 2).num_labels)
    msg = train_message(arrays)
    msg.content[contract.CONFIG][contract.SERVER_ROUND] = server_round
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": partition, "num-partitions": 2})
    return train(msg, context).content[contract.ARRAYS].to_torch_state_dict()


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dp_noise_and_batches_do_not_follow_from_public_values(tiny_run_config):
    # The model is built with torch.manual_seed(seed); without reseeding, the same input on a
    # fresh node gave the same noise every time, which anyone knowing the seed can subtract.
    run_config = {**tiny_run_config, "privacy.epsilon": 6.0}
    assert not same_tensors(trained_b(run_config), trained_b(run_config))


def test_deterministic_training_repeats_and_varies_with_round_and_partition(tiny_run_config):
    run_config = {**tiny_run_config, "privacy.epsilon": math.inf, "train.deterministic": True}
    first = trained_b(run_config)
    assert same_tensors(first, trained_b(run_config))
    assert not same_tensors(first, trained_b(run_config, server_round=2))
