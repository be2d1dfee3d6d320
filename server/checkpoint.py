"""The server's state after a round, in one file written atomically: what a resumed run needs.

After round k (k = 0: the initial adapter) the ServerApp writes
``<run folder>/checkpoint.safetensors``. Its tensors are the global arrays after round k (A, B,
the head and, for FLoRA and FedEx-LoRA, ΔW); its header metadata holds, as JSON, the round k,
the flat run config, the metrics rows so far and the random-number states of the ServerApp
process: Python's ``random`` (Flower's ``FedAvg`` samples clients with it), numpy's and
torch's.

The server optimizer's moments (``strategy.server-optimizer``,
:mod:`strategies.server_optimizer`) are tensors of the same file, named
``server-optimizer/<m|v>/<array>``. The strategies keep nothing else across rounds: everything
a method decides per round (FedSVD's ``svd-period``, FLoRA's seed of the fresh A, RoLoRA's
parity) is a function of the round number, which :class:`server.resume.ResumedRun` restores;
FLoRA's and FedEx-LoRA's ΔW is one of the arrays. A strategy that gains state across rounds
must add it here.

The file is written under a temporary name, fsynced and renamed over the previous one
(``os.replace``), so a crash at any moment leaves the previous checkpoint or the new one, never
a torn file.
"""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.torch import save_file

from common.config import AppConfig

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = 1
METADATA_KEY = "fedsvd-checkpoint"
OPTIMIZER_PREFIX = "server-optimizer/"
# Keys a resumed run may change: the flag itself, where the results folder now lives, and how
# long a round waits for its replies (operational: it decides no number of the method).
MAY_DIFFER = frozenset({"output.resume", "output.dir", "strategy.round-timeout"})


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run with a different configuration."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after ``server_round``."""

    server_round: int
    arrays: ArrayRecord
    rows: list[dict[str, Any]]  # GlobalEvaluator.rows: rounds 0..server_round
    rng: dict[str, Any]  # capture_rng()
    optimizer: dict[str, torch.Tensor]  # ServerOptimizer.state_dict(); empty: none or no moments


def save_checkpoint(folder: Path, *, server_round: int, arrays: ArrayRecord, cfg: AppConfig,
                    rows: list[dict[str, Any]],
                    optimizer: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the state after ``server_round`` to ``folder / CHECKPOINT_FILE``, atomically.

    ``optimizer``: the server optimizer's state (``ServerOptimizer.state_dict()``), if any.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {"format": FORMAT, "round": server_round, "config": cfg.to_dict(), "rows": rows,
             "rng": capture_rng()}
    tensors = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    tensors |= {OPTIMIZER_PREFIX + k: v.contiguous() for k, v in (optimizer or {}).items()}
    save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(state)})
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
    return path


def load_checkpoint(folder: Path, cfg: AppConfig) -> Checkpoint:
    """Read ``folder / CHECKPOINT_FILE``; raise unless it exists and ``cfg`` matches its run."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"output.resume=true but there is no checkpoint at {path}: nothing to resume. Check "
            "output.dir and output.run-name, or set output.resume=false to start afresh")
    try:
        with safe_open(path, framework="pt") as f:
            state = json.loads((f.metadata() or {})[METADATA_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if not isinstance(state, dict):
            raise TypeError(f"its {METADATA_KEY!r} header is not a JSON object")
    except Exception as exc:  # safetensors' own error is neither ValueError nor OSError
        raise CheckpointMismatch(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); it cannot be "
            "resumed: set output.overwrite=true (and output.resume=false) to start afresh"
        ) from exc
    if state.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: checkpoint format {state.get('format')!r}, this code "
                                 f"reads format {FORMAT}")
    differences = config_differences(state["config"], cfg.to_dict())
    if differences:
        raise CheckpointMismatch(
            f"{path} was written by a run with a different configuration; a resumed run must "
            "use the same one (only " + ", ".join(sorted(MAY_DIFFER)) + " may change):\n  "
            + "\n  ".join(differences))
    optimizer = {k.removeprefix(OPTIMIZER_PREFIX): tensors.pop(k) for k in list(tensors)
                 if k.startswith(OPTIMIZER_PREFIX)}
    return Checkpoint(server_round=int(state["round"]),
                      arrays=ArrayRecord(torch_state_dict=tensors), rows=state["rows"],
                      rng=state["rng"], optimizer=optimizer)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per run-config key (outside ``MAY_DIFFER``) whose value differs.

    A key the checkpoint lacks counts as its default value (``AppConfig()``): a checkpoint
    written before a setting existed ran as that default.
    """
    current = json.loads(json.dumps(current))  # compare as stored: tuples as lists, inf, ...
    defaults = json.loads(json.dumps(AppConfig().to_dict()))
    missing = object()
    lines = []
    for key in sorted((set(saved) | set(current)) - MAY_DIFFER):
        old, new = saved.get(key, defaults.get(key, missing)), current.get(key, missing)
        if old != new:
            lines.append(f"{key}: checkpoint {_show(old, missing)}, this run {_show(new, missing)}")
    return lines


def _show(value: Any, missing: object) -> str:
    return "(absent)" if value is missing else repr(value)


def capture_rng() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global and torch's CPU generator, as JSON."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the three generators to a :func:`capture_rng` state."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8)
    torch.set_rng_state(torch.from_numpy(raw.copy()))
