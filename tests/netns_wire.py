"""The wire of an emulated link (tests only): ``python tests/netns_wire.py CONFIG_JSON``.

Run inside the wire's namespace by :class:`tests.netns_hosts.Network` where the kernel has no
``sch_netem``: it owns the middle ends of each split veth link and copies Ethernet frames
between them with ``AF_PACKET`` raw sockets, holding each one ``delay`` seconds and dropping it
with probability ``loss`` (a cut link: every frame). CONFIG_JSON: ``{"delay", "loss", "pairs":
[[ifname, ifname], ...], "control", "stats"}``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path


class Wire:
    """Copy frames between the two interfaces of each link, ``delay`` late, dropping ``loss``.

    The control file, JSON ``{"generation": g, "cut": [link indices]}``, is read when it
    changes: a cut link drops every frame. The stats file, rewritten every 0.5 s and at once
    after a control change, says what was forwarded and dropped and which generation applies.
    """

    def __init__(self, config: dict) -> None:
        self.delay, self.loss = float(config["delay"]), float(config["loss"])
        self.control, self.stats_path = Path(config["control"]), Path(config["stats"])
        self.route: dict[int, tuple[socket.socket, int, socket.socket]] = {}  # fd: in, link, out
        for index, names in enumerate(config["pairs"]):
            a, b = (self._open(name) for name in names)
            self.route[a.fileno()], self.route[b.fileno()] = (a, index, b), (b, index, a)
        self.queue: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()
        self.stats = {"forwarded": 0, "dropped": 0, "cut-dropped": 0, "send-errors": 0,
                      "generation": -1}
        self.cut: set[int] = set()
        self.seen_control: int | None = None
        self.stats_written = 0.0

    @staticmethod
    def _open(ifname: str) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        sock.bind((ifname, 0))
        sock.setblocking(False)
        return sock

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set or the parent process (the test) is gone."""
        parent = os.getppid()
        while not stop.is_set() and os.getppid() == parent:
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:  # one delay: the queue stays sorted
                _, out, frame = self.queue.popleft()
                try:
                    out.send(frame)
                    self.stats["forwarded"] += 1
                except OSError:
                    self.stats["send-errors"] += 1
            self._read_control()
            if now - self.stats_written >= 0.5:
                tmp = self.stats_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.stats))
                tmp.replace(self.stats_path)
                self.stats_written = now
            wait = min(self.queue[0][0] - now, 0.05) if self.queue else 0.05
            for fd in select.select(list(self.route), [], [], max(wait, 0.0))[0]:
                self._receive(*self.route[fd])

    def _read_control(self) -> None:
        stamp = self.control.stat().st_mtime_ns
        if stamp != self.seen_control:
            with contextlib.suppress(ValueError, OSError):  # mid-replace: read it next time
                state = json.loads(self.control.read_text())
                self.cut, self.seen_control = set(state["cut"]), stamp
                self.stats["generation"], self.stats_written = state["generation"], 0.0

    def _receive(self, sock: socket.socket, link: int, out: socket.socket) -> None:
        for _ in range(256):  # what is there now, boundedly
            try:
                frame, address = sock.recvfrom(65536)
            except BlockingIOError:
                return
            if address[2] == socket.PACKET_OUTGOING:  # our own copy of a frame we sent
                continue
            if link in self.cut:
                self.stats["cut-dropped"] += 1
            elif random.random() < self.loss:
                self.stats["dropped"] += 1
            else:
                self.queue.append((time.monotonic() + self.delay, out, frame))


if __name__ == "__main__":
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    Wire(json.loads(sys.argv[1])).run(stopped)
