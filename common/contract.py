"""The message contract between the server strategy and the clients, defined once.

A train instruction carries one ArrayRecord (``ARRAYS``: the global adapter, keys from
:func:`lora_key` and :func:`head_key`, and for the strategies that fold B·A into the base
weights (FLoRA, FedEx-LoRA) one :func:`base_key` array per LoRA layer) and one ConfigRecord
(``CONFIG``). A train reply carries one ArrayRecord (the factors named by ``TRAIN_FACTORS``,
plus the head when it trains) and one MetricRecord (``METRICS``) with the keys below. Base
arrays only ever travel down: clients never send them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys sent by the strategy.
SERVER_ROUND = "server-round"
TRAIN_FACTORS = "train-factors"  # LoRA factors the client trains and sends back: "B", "A",
# "A,B", or "S" (the singular values σ of a layer in SVD form, see common.singular_values)
# Sending only what changed (strategies.broadcast): the ArrayRecord then holds the arrays that
# changed since the state whose state_digest is BROADCAST_BASE (which the client holds), and for
# a LoRA A that only turned, its r × r maps (rotation_key); BROADCAST_DIGEST is the state_digest
# of the whole state the client must rebuild. Without BROADCAST_BASE the arrays are the whole state.
BROADCAST_BASE = "broadcast-base"
BROADCAST_DIGEST = "broadcast-digest"

# MetricRecord keys of a train reply.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative over every step this client has ever taken
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"  # DP-SGD steps taken in this round
BUDGET_EXHAUSTED = "budget-exhausted"  # 1: the client refused to train (next round > ε)
B_DELTA_NORM = "b-delta-norm"  # ||after - before||_F over the trained factors (name kept: B
# was the only trained factor when the key was introduced)

# MetricRecord keys of an evaluate reply (and of the server-side evaluation).
ACCURACY = "accuracy"
LOSS = "loss"

# MetricRecord key of a query reply (the roll call of strategies.sampling): the node's
# partition-id from its node config.
PARTITION_ID = "partition-id"

Factor = Literal["A", "B", "S"]  # S: σ (r,) of W = W0 + s · B diag(σ) A (merge-sv)
BASE_PREFIX = "base."


def lora_key(module: str, factor: Factor) -> str:
    """Array name of one LoRA factor, e.g. ``bert.encoder.layer.0.attention.self.query.lora_B``.

    ``lora_S`` is the (r,) vector σ of a layer in SVD form (:mod:`common.singular_values`).
    """
    return f"{module}.lora_{factor}"


def base_key(module: str) -> str:
    """Array name of a LoRA layer's dense base-weight residual ΔW, ``base.<module>.weight``.

    ΔW has the (d_out, d_in) orientation of ``nn.Linear.weight`` and is *added* to the freshly
    loaded pretrained weight ``<module>.base_layer.weight`` (transposed for a peft layer with
    ``fan_in_fan_out``), so the layer computes (W0 + ΔW) x + s · B (A x). It already carries the
    LoRA scale s. An absent key means ΔW = 0.
    """
    return f"{BASE_PREFIX}{module}.weight"


def is_base_key(key: str) -> bool:
    """Whether an array name is a base-weight residual (see :func:`base_key`)."""
    return key.startswith(BASE_PREFIX)


def rotation_key(module: str) -> str:
    """Array name of the maps of one LoRA layer's A since the client's state: (k, r, r) float32.

    The client rebuilds A ← T_k ⋯ T_1 A by k calls of :func:`kernels.rotation.rotate_rows`, in
    order (never their product, which would round differently).
    """
    return f"rotation.{module}.lora_A"


def is_rotation_key(key: str) -> bool:
    """Whether an array name holds rotations of a LoRA A (see :func:`rotation_key`)."""
    return key.startswith("rotation.")


def state_digest(record: ArrayRecord) -> str:
    """SHA-256 (hex) of a global state: its array names and serialized arrays, in name order.

    The server and a client that rebuilt the same tensors (float32, same shapes) get the same
    digest, so a client can check the state it rebuilt from a partial broadcast.
    """
    digest = hashlib.sha256()
    for key in sorted(record):
        digest.update(key.encode())
        digest.update(record[key].data)
    return digest.hexdigest()


def head_key(parameter: str) -> str:
    """Array name of one trainable head parameter, e.g. ``head.classifier.weight``."""
    return f"head.{parameter}"


def is_head_key(key: str) -> bool:
    """Whether an array name belongs to the classification head."""
    return key.startswith("head.")
