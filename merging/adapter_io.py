"""Write a merge as a peft LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

The folder holds ``adapter_model.safetensors`` (peft's key names, B = U diag(S) (d_out, K),
A = Vh (K, d_in), float32), ``adapter_config.json`` (r = lora_alpha = K, so the scale is 1;
target modules and base model of the sources) and ``merge.json`` (which sources, weights and
steps made it). A merge is LoRA only: heads (``modules_to_save``) are task-specific and are not
merged, and a stale ``base_delta.safetensors`` is removed. :func:`save_merged` replaces what
is in its folder: callers check :func:`adapter_files` first (``python -m merging`` refuses an
output that is a source, or holds an adapter without ``--force``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file

from merging.sources import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_DELTA_FILE,
    PEFT_PREFIX,
    Pair,
    Source,
)

PROVENANCE_FILE = "merge.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE_FILE)  # any of them: an adapter


@dataclass(frozen=True)
class MergedAdapter:
    """A merge: its peft config (r = alpha = K), module -> (B (m, K), A (K, n)), provenance."""

    config: LoraConfig
    pairs: dict[str, Pair]
    provenance: dict


def merged_config(sources: Sequence[Source], rank: int) -> LoraConfig:
    """The first adapter's config with r = lora_alpha = ``rank`` and no patterns or heads.

    Without an adapter (full models only), a fresh config targeting the merged modules by their
    full names on the base model of the first source.
    """
    reference = next((s.config for s in sources if s.config is not None), None)
    if reference is None:
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(sources[0].shapes),
                          base_model_name_or_path=sources[0].dense.base.owner,
                          inference_mode=True)
    return dataclasses.replace(reference, r=rank, lora_alpha=rank, rank_pattern={},
                               alpha_pattern={}, use_rslora=False, modules_to_save=None,
                               init_lora_weights=True, inference_mode=True)


def adapter_files(folder: str | Path) -> list[str]:
    """Which of :data:`ADAPTER_FILES` ``folder`` holds: empty if none, or if it does not exist."""
    return [name for name in ADAPTER_FILES if (Path(folder) / name).exists()]


def save_merged(folder: str | Path, merged: MergedAdapter) -> Path:
    """Write ``merged`` into ``folder`` (created).

    An adapter already there is replaced and its ``base_delta.safetensors`` deleted: check
    :func:`adapter_files` first to not overwrite what a user made.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (B, A) in merged.pairs.items():  # clone: safetensors refuses shared storage
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.float().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.float().contiguous().clone()
    tmp = folder / f"{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)  # a failed write never leaves half an adapter
    merged.config.save_pretrained(str(folder))
    (folder / PROVENANCE_FILE).write_text(json.dumps(merged.provenance, indent=2) + "\n")
    (folder / BASE_DELTA_FILE).unlink(missing_ok=True)
    return folder


def read_provenance(folder: str | Path) -> dict | None:
    """The ``merge.json`` of a merged adapter folder, or None for any other adapter."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
