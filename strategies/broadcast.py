"""Broadcasting the global state: all of it every round, or to each node only what changed.

:class:`FullBroadcast` sends the whole state in every train message (Flower's way).

:class:`ChangesBroadcast` (``strategy.broadcast = "changes"``) remembers which state each node
holds: a node holds the state of a round once its reply to that round came back without an
error (the client rebuilt and checked it before doing anything else). To such a node it sends

- the arrays whose bytes changed since the state it holds (B′ and a trained head each round;
  U and V of merge-sv, a frozen head or an unchanged A never again),
- for a LoRA A that only turned at every step since (FedSVD: A′ = T A_prev, T r × r), the maps
  T_1, …, T_k in order (:func:`common.contract.rotation_key`) instead of A (r × n),
- the digests of its base state and of the state to rebuild (``contract.BROADCAST_BASE`` and
  ``BROADCAST_DIGEST``, :func:`common.contract.state_digest`).

Everyone else (a new or restarted node, a node whose last reply was an error or never came, a
base older than the ``history`` kept) gets the whole state, as does every node after the server
restarts. A client that cannot rebuild the announced state refuses the round with an error
reply, which also makes the server send it the whole state next time.

For the server and the clients to hold the same bits, a round whose new A is a map of the
previous A (relative residual ≤ ``tolerance``, :func:`kernels.rotation.rotation_between`) keeps
A′ = :func:`kernels.rotation.rotate_rows` (T, A_prev), computed the same way on every machine;
it differs from the strategy's A′ by float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from logging import INFO

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from common import contract
from kernels.rotation import rotate_rows, rotation_between

State = dict[str, torch.Tensor]  # array name -> tensor (the strategies' State)


class FullBroadcast:
    """Every train message carries the whole global state."""

    def settle(self, previous: State, new: State) -> State:
        """The new global state as it will be broadcast (unchanged here)."""
        return new

    def messages(self, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        """The train messages to send (as built: each with the whole state)."""
        return messages

    def delivered(self, replies: Iterable[Message]) -> None:
        """Note which nodes now hold the state of the round (nothing to note here)."""

    def describe(self) -> str:
        """One line for the strategy summary."""
        return "broadcast: the whole state to every node, every round"


class ChangesBroadcast(FullBroadcast):
    """To each node only what changed since the state it holds (see the module docstring).

    Parameters
    ----------
    lora_modules : names of the LoRA layers (their A may be sent as maps).
    history : how many broadcast states are remembered; a node further behind gets everything.
    tolerance : largest relative residual of A′ ≈ T A_prev for A to travel as T.
    """

    def __init__(self, lora_modules: Sequence[str], *, history: int = 64,
                 tolerance: float = 1e-6) -> None:
        if history < 1:
            raise ValueError(f"history={history}: must be >= 1")
        self.lora_modules = list(lora_modules)
        self.history = history
        self.tolerance = tolerance
        self._versions: dict[str, dict[str, str]] = {}  # state digest -> digest of each array
        self._maps: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (from, to) -> T by A key
        self._held: dict[int, str] = {}  # node id -> digest of the state it holds
        self._sent: dict[int, str] = {}  # node id -> digest of the state sent this round

    def describe(self) -> str:
        """One line for the strategy summary."""
        return ("broadcast: to each node only the arrays changed since the state it holds, a "
                "turned A as its r × r maps")

    def settle(self, previous: State, new: State) -> State:
        """``new`` with every A that only turned snapped to rotate_rows(T, A_prev); note the T."""
        new = dict(new)
        maps = {}
        for module in self.lora_modules:
            key = contract.lora_key(module, "A")
            if key not in previous or key not in new or torch.equal(previous[key], new[key]) \
                    or previous[key].shape != new[key].shape:
                continue
            T, residual = rotation_between(new[key][None], previous[key][None])
            if float(residual.max()) <= self.tolerance:
                new[key] = rotate_rows(T, previous[key][None])[0].to(new[key].dtype)
                maps[key] = T[0].cpu()
        if maps:
            self._maps[(_digest_of(previous), _digest_of(new))] = maps
        return new

    def messages(self, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        """Each message rewritten to carry what its node lacks; the whole state where unknown."""
        current = contract.state_digest(arrays)
        self._remember(current, arrays)
        out, full, partial = [], 0, 0
        for msg in messages:
            node = msg.metadata.dst_node_id
            base = self._held.get(node)
            changes = self._changes(base, current, arrays) if base is not None else None
            config = ConfigRecord({**msg.content[contract.CONFIG],
                                   contract.BROADCAST_DIGEST: current})
            if changes is None:
                record, full = arrays, full + 1
            else:
                record, partial = changes, partial + 1
                config[contract.BROADCAST_BASE] = base
            content = RecordDict({contract.ARRAYS: record, contract.CONFIG: config})
            out.append(Message(content=content, dst_node_id=node,
                               message_type=msg.metadata.message_type))
            self._sent[node] = current
        if out:
            log(INFO, "broadcast: the whole state to %d node(s), the changes to %d", full,
                partial)
        return out

    def delivered(self, replies: Iterable[Message]) -> None:
        """A node whose reply came back without an error holds the state sent to it."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in self._sent and not reply.has_error():
                self._held[node] = self._sent.pop(node)
        for node in self._sent:  # an error or no reply: what it holds is unknown
            self._held.pop(node, None)
        self._sent.clear()

    # --- internals --------------------------------------------------------------------------------

    def _remember(self, current: str, arrays: ArrayRecord) -> None:
        if current in self._versions:
            return
        self._versions[current] = {key: _array_digest(arrays[key]) for key in arrays}
        while len(self._versions) > self.history:
            oldest = next(iter(self._versions))
            del self._versions[oldest]
            self._maps = {k: v for k, v in self._maps.items() if oldest not in k}

    def _changes(self, base: str, current: str, arrays: ArrayRecord) -> ArrayRecord | None:
        """What a node holding ``base`` needs to rebuild ``current``; None: the whole state."""
        if base not in self._versions:
            return None
        then, now = self._versions[base], self._versions[current]
        order = list(self._versions)
        if then.keys() != now.keys() or order.index(base) > order.index(current):
            return None
        path = order[order.index(base):order.index(current) + 1]  # the states sent since base
        changes: dict[str, Array] = {}
        for key in (k for k in now if now[k] != then[k]):
            turns = self._turns(path, key)
            if turns is None:
                changes[key] = arrays[key]
            else:
                changes[contract.rotation_key(key.removesuffix(".lora_A"))] = \
                    Array(torch.stack(turns).numpy())
        return ArrayRecord(changes)

    def _turns(self, path: list[str], key: str) -> list[torch.Tensor] | None:
        """The maps T of ``key`` (a LoRA A) at each step of ``path`` where it changed, or None."""
        if not key.endswith(".lora_A"):
            return None
        turns = []
        for before, after in zip(path, path[1:], strict=False):
            if self._versions[before][key] == self._versions[after][key]:
                continue
            T = self._maps.get((before, after), {}).get(key)
            if T is None:
                return None
            turns.append(T)
        return turns or None


def _array_digest(array: Array) -> str:
    return hashlib.sha256(array.data).hexdigest()


def _digest_of(state: State) -> str:
    return contract.state_digest(ArrayRecord(torch_state_dict={k: v.detach().cpu()
                                                               for k, v in state.items()}))
