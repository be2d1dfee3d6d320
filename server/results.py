"""Write a run's results: per-round metrics (CSV), the config (JSON), the peft adapter."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from flwr.app import ArrayRecord
from peft import PeftModel

from common.adapter import AdapterLayout
from common.config import AppConfig


def write_metrics(path: Path, rows: list[dict]) -> None:
    """One CSV row per round (round 0 = the initial adapter)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def save_adapter(model: PeftModel, layout: AdapterLayout, arrays: ArrayRecord,
                 folder: Path) -> None:
    """Save ``arrays`` as a peft adapter (``adapter_config.json`` + safetensors)."""
    layout.load(arrays.to_torch_state_dict())
    model.save_pretrained(folder)


def save_run(folder: Path, cfg: AppConfig, rows: list[dict], *, model: PeftModel,
             layout: AdapterLayout, arrays: ArrayRecord) -> None:
    """Write ``config.json``, ``metrics.csv`` and ``adapter/`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    write_metrics(folder / "metrics.csv", rows)
    save_adapter(model, layout, arrays, folder / "adapter")
