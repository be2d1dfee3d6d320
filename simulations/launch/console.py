"""What a launcher shows while Flower runs: its output into a log, one line per round out.

A run's output (flwr, the SuperLink, the ServerApp and every ClientApp, hundreds of lines) goes
to a log file (:func:`output_to`); a thread follows that file (:func:`following`) and turns
each round line of the server's evaluator into one progress line (:class:`Progress`), printed
with :func:`say` on the launcher's own stdout.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from common import schema


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``9 min 12 s`` or ``41 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


_TERMINAL: list[int] = []  # copies of file descriptor 1 saved by _output_to, innermost last


_TERMINAL_LOCK = threading.Lock()  # say() from a thread never writes to a copy being closed


def say(line: str) -> None:
    """One progress line, flushed at once (stdout is often a pipe or a file on long sweeps).

    While a cell's output goes to its log (:func:`output_to`), the line goes to the sweep's
    own stdout as it was before, not into the log.
    """
    with _TERMINAL_LOCK:
        if _TERMINAL:
            os.write(_TERMINAL[-1], f"{line}\n".encode())
            return
    print(line, flush=True)


ROUND_LINE = re.compile(  # server.evaluation.GlobalEvaluator's lines, after the logger's prefix
    r"round (?P<round>\d+) \| (?:\S+ accuracy (?P<accuracy>\S+) \| "
    r"(?:balanced accuracy (?P<balanced>\S+) \| )?(?:AUC (?P<auc>\S+) \| )?\S+ loss \S+"
    r"|not evaluated[^|]*) \| client ε mean (?P<epsilon_mean>\S+) max (?P<epsilon_max>\S+) "
    r"\|(?:.*\|)? (?P<seconds>\d+(?:\.\d*)?) s\s*$")


@dataclass(frozen=True)
class RoundLine:
    """One round as logged; accuracy nan: not evaluated, epsilon (the largest) nan: none yet.

    ``balanced_accuracy`` and ``auc`` nan: not evaluated, or a task without classes.
    """

    round: int
    accuracy: float
    epsilon: float
    seconds: float  # since the ServerApp started
    balanced_accuracy: float = math.nan
    auc: float = math.nan


def parse_round_line(line: str) -> RoundLine | None:
    """The round of a GlobalEvaluator log line, None for any other line."""
    match = ROUND_LINE.search(line)
    if not match:
        return None

    def number(text: str) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):  # "-": no client trained yet; None: not evaluated
            return math.nan

    return RoundLine(int(match["round"]), number(match["accuracy"]),
                     number(match["epsilon_max"]), float(match["seconds"]),
                     number(match["balanced"]), number(match["auc"]))


def balanced_auc_text(balanced_accuracy: float, auc: float, digits: int = 4) -> str:
    """`` (balanced 0.5000, AUC 0.9870)`` at ``digits`` decimals.

    "" when ``balanced_accuracy`` is nan (not evaluated, or a task without classes); no AUC part
    when ``auc`` is nan (not measured).
    """
    if math.isnan(balanced_accuracy):
        return ""
    part = "" if math.isnan(auc) else f", AUC {auc:.{digits}f}"
    return f" (balanced {balanced_accuracy:.{digits}f}{part})"


def class_metrics_text(row: Mapping[str, str]) -> str:
    """:func:`balanced_auc_text` of a metrics.csv row (an empty cell or a missing column: nan)."""
    def number(column: str) -> float:
        return float(row[column]) if row.get(column) else math.nan

    return balanced_auc_text(number(schema.BALANCED_ACCURACY), number(schema.AUC))


def rough_duration(seconds: float) -> str:
    """``3 h 10 min``, ``12 min`` or ``45 s``: an ETA."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s} s"
    return f"{round(s / 60)} min" if s < 3570 else duration(60 * round(s / 60))


class Progress:
    """The sweep's clock: seconds per round measured so far, over the cells of this sweep.

    :meth:`cell` gives the ``on_line`` of one cell, which prints a line per finished round:
    ``[3/30] <cell> round 4/20 | accuracy 0.312 (balanced 0.297, AUC 0.861) | ε 1.20 |
    45 s/round | cell ETA 12 min | sweep ETA 3 h 10 min`` (balanced accuracy and AUC where the
    task has classes). Seconds per round come from the wall seconds that the rounds log (the
    cell's own for its ETA, all measured rounds for the sweep's); the sweep ETA is that mean ×
    the rounds left of this cell and of the cells after it; SuperLink start-up is not counted.
    """

    def __init__(self, say: Callable[[str], None] = say) -> None:
        self.say = say
        self.seconds, self.rounds = 0.0, 0

    @property
    def seconds_per_round(self) -> float:
        """The mean over every round measured so far; nan before the first."""
        return self.seconds / self.rounds if self.rounds else math.nan

    def cell(self, tag: str, name: str, num_rounds: int,
             rounds_after: int | None) -> Callable[[str], None]:
        """``on_line`` for one cell; ``rounds_after``: rounds of the cells to run after it.

        ``rounds_after`` None: a run on its own, whose line ends with its ``ETA`` alone.
        """
        prefix = " ".join(part for part in (tag, name) if part)
        seen: list[RoundLine] = []

        def on_line(line: str) -> None:
            row = parse_round_line(line)
            if row is None or (seen and row.round <= seen[-1].round):
                return
            if seen:
                self.seconds += row.seconds - seen[-1].seconds
                self.rounds += row.round - seen[-1].round
            seen.append(row)
            if row.round < 1:
                return
            first = seen[0]  # round 0, or the first round after a checkpoint
            rate = ((row.seconds - first.seconds) / (row.round - first.round)
                    if row.round > first.round else row.seconds / row.round)
            mean = self.seconds_per_round if self.rounds else rate
            left = max(num_rounds - row.round, 0)
            epsilon = "-" if math.isnan(row.epsilon) else f"{row.epsilon:.2f}"
            accuracy = "-" if math.isnan(row.accuracy) else f"{row.accuracy:.3f}"
            accuracy += balanced_auc_text(row.balanced_accuracy, row.auc, digits=3)
            line = (f"{prefix} round {row.round}/{num_rounds} | accuracy {accuracy} | "
                    f"ε {epsilon} | {rate:.0f} s/round")
            if rounds_after is None:
                self.say(f"{line} | ETA {rough_duration(rate * left)}")
                return
            self.say(f"{line} | cell ETA {rough_duration(rate * left)} | sweep ETA "
                     f"{rough_duration(mean * (left + rounds_after))}")
        return on_line


@contextlib.contextmanager
def following(path: Path, on_line: Callable[[str], None],
              interval: float = 0.2) -> Iterator[None]:
    """Call ``on_line`` with each line added to ``path`` while the block runs (a thread).

    Lines already in the file (earlier attempts) are not passed; the last lines are read
    after the block too. An error in ``on_line`` skips that line: progress is best effort.
    """
    path = Path(path)
    state = {"offset": path.stat().st_size if path.exists() else 0, "rest": b""}
    stop = threading.Event()

    def read() -> None:
        try:
            if path.stat().st_size < state["offset"]:  # truncated: start again
                state["offset"], state["rest"] = 0, b""
            with path.open("rb") as f:
                f.seek(state["offset"])
                data = f.read()
        except OSError:
            return
        state["offset"] += len(data)
        *lines, state["rest"] = (state["rest"] + data).split(b"\n")
        for line in lines:
            with contextlib.suppress(Exception):
                on_line(line.decode("utf-8", "replace"))

    def loop() -> None:
        while not stop.wait(interval):
            read()
        read()

    thread = threading.Thread(target=loop, name=f"follow {path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1, 2: children too) to ``path``.

    :func:`say` keeps writing to the stdout of before (a copy of it is kept meanwhile).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    _TERMINAL.append(saved[0])
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with _TERMINAL_LOCK:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
            _TERMINAL.remove(saved[0])
        for copy in saved:
            os.close(copy)


def failure_reason(log: Path) -> str:
    """The reason :func:`simulations.launch.superlink.flwr_run` printed last in ``log``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    reasons = [line.removeprefix("[run] ") for line in lines if line.startswith("[run] ")]
    return " ".join(reasons[1:3] if len(reasons) > 1 else reasons)
