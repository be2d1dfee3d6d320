"""The merged adapter that merge-sv starts from, read and checked by the ServerApp.

``strategy.merged-adapter`` names a peft LoRA adapter folder written by ``python -m merging``.
The ServerApp reads it once, before round 1, and hands its SVD form
(:func:`strategies.merge_sv.svd_form_state`) to the run as the initial global state: the
strategy itself never touches the disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError
from merging.sources import SourceError, load_adapter
from strategies.base import State
from strategies.merge_sv import svd_form_state


def merged_adapter_state(folder: str | Path, modules: Sequence[str], rank: int,
                         lora_scale: float) -> State:
    """Read a merged peft adapter; return its SVD form (:func:`strategies.merge_sv.svd_form_state`).

    Raises :class:`~common.config.ConfigError` naming ``strategy.merged-adapter`` when the folder
    is not a LoRA adapter, holds a dense part (``base_delta.safetensors``), targets other modules
    than ``modules``, or has another rank than ``rank`` (``lora.r``).
    """
    key = "strategy.merged-adapter"
    try:
        source = load_adapter(Path(folder).expanduser())
    except SourceError as exc:
        raise ConfigError([f"{key}={str(folder)!r}: {exc}"]) from exc
    if source.dense is not None:
        raise ConfigError([f"{key}={str(folder)!r}: has a dense base_delta part (FLoRA or "
                           "FedEx-LoRA); merge it first with `python -m merging` to make it LoRA"])
    missing = sorted(set(modules) - set(source.lora))
    extra = sorted(set(source.lora) - set(modules))
    if missing or extra:
        raise ConfigError([f"{key}={str(folder)!r}: targets other modules than lora.target-"
                           f"modules (missing {missing[:3]}, extra {extra[:3]})"])
    ranks = sorted({A.shape[0] for _, A in source.lora.values()})
    if ranks != [rank]:
        raise ConfigError([f"{key}={str(folder)!r}: has rank {ranks}, lora.r={rank}: set "
                           f"lora.r to the merge's rank"])
    return svd_form_state({m: source.lora[m] for m in modules}, lora_scale)
