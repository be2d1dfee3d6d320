"""Write a run's results: per-round metrics (CSV), the config (JSON), the peft adapter.

For FLoRA and FedEx-LoRA the global model is W0 + ΔW + s · B A: part of it (ΔW, the updates
folded into the base weights) is not a LoRA tensor, and peft's adapter files cannot hold it.
It is saved next to them as ``adapter/base_delta.safetensors`` (arrays named
``contract.base_key(module)``, (d_out, d_in), already scaled), and :func:`load_model` applies
it. ``PeftModel.from_pretrained`` alone loads the LoRA part only: for these methods that is
not the trained model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from safetensors.torch import load_file, save_file

from common import contract, schema
from common.adapter import AdapterLayout
from common.config import AppConfig
from common.singular_values import fold_singular_values

BASE_DELTA_FILE = "base_delta.safetensors"  # ΔW of FLoRA / FedEx-LoRA, beside the peft files


def write_metrics(path: Path, rows: list[dict]) -> None:
    """One CSV row per round (round 0 = the initial adapter), columns as in :mod:`common.schema`.

    Raise ``ValueError`` before writing if a row has a column outside the schema.
    """
    columns = schema.ordered_columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def save_adapter(model: PeftModel, layout: AdapterLayout, arrays: ArrayRecord,
                 folder: Path) -> None:
    """Save ``arrays`` as a peft adapter (``adapter_config.json`` + safetensors), plus ΔW.

    The base-weight residuals of ``arrays`` (FLoRA, FedEx-LoRA) go to ``BASE_DELTA_FILE`` in
    the same folder; a stale one from an earlier run is removed when there are none. A model
    in SVD form (merge-sv) is saved as ordinary LoRA with B diag(σ) as B, and is left so:
    ``layout`` no longer describes it.
    """
    state = arrays.to_torch_state_dict()
    layout.load(state)
    fold_singular_values(model)  # merge-sv: B ← B diag(σ), plain LoRA that peft can load
    model.save_pretrained(folder)
    deltas = {k: v.contiguous() for k, v in state.items() if contract.is_base_key(k)}
    path = folder / BASE_DELTA_FILE
    if deltas:
        save_file(deltas, path, metadata={
            "meaning": "add to <module>.base_layer.weight (d_out, d_in); includes alpha / r"})
    else:
        path.unlink(missing_ok=True)


def load_model(base: torch.nn.Module, folder: Path) -> PeftModel:
    """The saved global model: the peft adapter in ``folder`` plus its ΔW, if any, on ``base``."""
    model = PeftModel.from_pretrained(base, folder)
    path = folder / BASE_DELTA_FILE
    if path.exists():
        AdapterLayout.from_model(model).load_base(load_file(path))
    return model


def save_run(folder: Path, cfg: AppConfig, rows: list[dict], *, model: PeftModel,
             layout: AdapterLayout, arrays: ArrayRecord, environment: dict[str, object]) -> None:
    """Write ``config.json``, ``environment.json``, ``metrics.csv`` and ``adapter/`` (the schema's).

    ``environment`` is :func:`common.environment.run_environment`: what computed the run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / schema.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    (folder / schema.ENVIRONMENT_FILE).write_text(json.dumps(environment, indent=2))
    write_metrics(folder / schema.METRICS_FILE, rows)
    save_adapter(model, layout, arrays, folder / schema.ADAPTER_DIR)
