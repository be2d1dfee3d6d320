"""Test ClientApps: the production handlers of ``client.app`` with one fault each.

``tests/test_fault_tolerance.py`` runs them from a copy of the app whose pyproject names
``faulty_clients:<app>`` as its ClientApp, so production code carries no failure switch.
"""

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import evaluate, query, train
from common import contract

STALL_SECONDS = 600  # longer than any test waits: the test kills the federation meanwhile


def _node_round(msg: Message, context: Context) -> tuple[int, int]:
    """(partition-id, server round) of a train instruction."""
    return (int(context.node_config["partition-id"]),
            int(msg.content[contract.CONFIG][contract.SERVER_ROUND]))


def _with_production_evaluate_and_query() -> ClientApp:
    """A ClientApp whose evaluate and query handlers are the production ones."""
    app = ClientApp()
    app.evaluate()(evaluate)
    app.query()(query)
    return app


raises_in_round_2 = _with_production_evaluate_and_query()


@raises_in_round_2.train()
def train_or_raise(msg: Message, context: Context) -> Message:
    """``client.app.train``, except that partition 0 crashes in round 2."""
    if _node_round(msg, context) == (0, 2):
        raise RuntimeError("simulated crash of partition 0 in round 2")
    return train(msg, context)


stalls_from_round_3 = _with_production_evaluate_and_query()


@stalls_from_round_3.train()
def train_or_stall(msg: Message, context: Context) -> Message:
    """``client.app.train`` in rounds 1 and 2; from round 3 on, no reply for a long time.

    The server thus stays in round 3 after writing the round-2 checkpoint, until the test
    kills it: the crash point does not depend on timing.
    """
    if _node_round(msg, context)[1] >= 3:
        time.sleep(STALL_SECONDS)
    return train(msg, context)


always_raises = _with_production_evaluate_and_query()


@always_raises.train()
def train_never(msg: Message, context: Context) -> Message:
    """Every client fails every round, as a ClientApp with a bug would."""
    raise IndexError(f"simulated bug in partition {context.node_config['partition-id']}")


LATE_SECONDS = 5.0  # how long after the round timeout the late client replies
late_in_round_2 = _with_production_evaluate_and_query()


@late_in_round_2.train()
def train_late(msg: Message, context: Context) -> Message:
    """``client.app.train``; in round 2 partition 0 replies LATE_SECONDS after the round ended."""
    if _node_round(msg, context) == (0, 2):
        time.sleep(float(context.run_config["strategy.round-timeout"]) + LATE_SECONDS)
    return train(msg, context)
