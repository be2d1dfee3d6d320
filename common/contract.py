"""The message contract between the server strategy and the clients, defined once.

A train instruction carries one ArrayRecord (``ARRAYS``: the global adapter, keys from
:func:`lora_key` and :func:`head_key`) and one ConfigRecord (``CONFIG``). A train reply carries
one ArrayRecord (the factors the client trained, plus the head when it trains) and one
MetricRecord (``METRICS``) with the keys below.
"""

from __future__ import annotations

from typing import Literal

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys sent by the strategy.
SERVER_ROUND = "server-round"
TRAIN_FACTORS = "train-factors"  # which LoRA factors the client trains and sends back: "B"

# MetricRecord keys of a train reply.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative over every step this client has ever taken
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"  # DP-SGD steps taken in this round
BUDGET_EXHAUSTED = "budget-exhausted"  # 1: the client refused to train (next round > ε)
B_DELTA_NORM = "b-delta-norm"  # ||B_after - B_before||_F, proof that training moved B

# MetricRecord keys of an evaluate reply (and of the server-side evaluation).
ACCURACY = "accuracy"
LOSS = "loss"

Factor = Literal["A", "B"]


def lora_key(module: str, factor: Factor) -> str:
    """Array name of one LoRA factor, e.g. ``bert.encoder.layer.0.attention.self.query.lora_B``."""
    return f"{module}.lora_{factor}"


def head_key(parameter: str) -> str:
    """Array name of one trainable head parameter, e.g. ``head.classifier.weight``."""
    return f"head.{parameter}"


def is_head_key(key: str) -> bool:
    """Whether an array name belongs to the classification head."""
    return key.startswith("head.")
