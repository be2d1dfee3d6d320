"""The global state a train message stands for, rebuilt from only what changed where it must be.

With ``strategy.broadcast = "changes"`` (:mod:`strategies.broadcast`) the server sends a node
that holds an earlier state only the arrays that changed since then, and for a LoRA A that only
turned its r × r maps T_1, …, T_k. The node keeps the last state it rebuilt in
``Context.state`` (:data:`HELD_STATE`), applies the changes to it, and checks the result against
the digest the server announced (:func:`common.contract.state_digest`). A node that does not
hold the announced base state, or whose rebuilt state has another digest, raises
:class:`StateMismatch`: its round fails with an error reply, and the server then sends it the
whole state. A message without a base carries the whole state itself.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, RecordDict

from common import contract
from kernels.rotation import rotate_rows

HELD_STATE = "global-state"  # Context.state ArrayRecord: the last global state rebuilt here


class StateMismatch(RuntimeError):
    """The announced global state cannot be rebuilt here; the server sends the whole of it next."""


def received_state(content: RecordDict, context: Context) -> ArrayRecord:
    """The whole global state of a train message; kept as this node's held state.

    (Evaluate messages always carry the whole state and leave the held state alone: the server
    counts only train replies as delivered.)
    """
    config = content[contract.CONFIG]
    arrays = content[contract.ARRAYS]
    base = config.get(contract.BROADCAST_BASE)
    if base is None:
        state = arrays
    else:
        held = context.state.array_records.get(HELD_STATE)
        held_digest = contract.state_digest(held) if held is not None else "none"
        if held_digest != base:
            raise StateMismatch(f"the server sent the changes since state {str(base)[:12]}, but "
                                f"this node holds state {held_digest[:12]}: it needs the whole "
                                "state, which the server sends it after this failed round")
        state = apply_changes(held, arrays)
    announced = config.get(contract.BROADCAST_DIGEST)
    if announced is not None and (rebuilt := contract.state_digest(state)) != announced:
        raise StateMismatch(f"the rebuilt global state has digest {rebuilt[:12]}, the server's "
                            f"{str(announced)[:12]}: it needs the whole state, which the server "
                            "sends it after this failed round")
    context.state.array_records[HELD_STATE] = state
    return state


def apply_changes(held: ArrayRecord, changes: ArrayRecord) -> ArrayRecord:
    """``held`` with the changed arrays replaced and each turned A rotated, T_1 first.

    A ← rotate_rows(T_k, … rotate_rows(T_1, A)) for the (k, r, r) maps of
    :func:`common.contract.rotation_key`: one call per map, as the server computed them.
    """
    tensors = held.to_torch_state_dict()
    for key in changes:
        value = torch.from_numpy(changes[key].numpy())
        if not contract.is_rotation_key(key):
            tensors[key] = value
            continue
        a_key = key.removeprefix("rotation.")
        if a_key not in tensors:
            raise StateMismatch(f"the server sent maps of {a_key}, which the held state lacks")
        A = tensors[a_key][None]  # (1, r, n)
        for T in value:  # (r, r) each, in the order they were made
            A = rotate_rows(T[None], A)
        tensors[a_key] = A[0]
    return ArrayRecord(torch_state_dict=tensors)
