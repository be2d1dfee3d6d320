"""simulations.dp_diagnostics on a saved tiny run: clipping share, head share, ‖A‖₂, NSR."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord

from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig
from common.methods import FROM_SCRATCH
from common.model import build_model
from kernels import refactorize_pairs
from server.checkpoint import save_checkpoint
from simulations.dp_diagnostics import diagnose, layer_table, markdown


def _saved_run(folder, run_config, *, sigma: float):
    """A run folder whose global state has B ≠ 0 and A with orthonormal rows (as FedSVD's)."""
    cfg = AppConfig.from_run_config(run_config)
    model = build_model(cfg.model, cfg.lora, num_labels=3, seed=cfg.seed)
    layout = AdapterLayout.from_model(model)
    state = layout.tensors()
    g = torch.Generator().manual_seed(0)
    pairs = {p.module: (torch.randn(p.B.shape, generator=g),
                        state[contract.lora_key(p.module, "A")]) for p in layout.pairs}
    for module, (B, A) in refactorize_pairs(pairs).items():
        state[contract.lora_key(module, "B")] = B.clone()
        state[contract.lora_key(module, "A")] = A.clone()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    rows = [{"round": 0}, {"round": 1, "noise-multiplier": sigma}]
    save_checkpoint(folder, server_round=1, arrays=ArrayRecord(torch_state_dict=state), cfg=cfg,
                    rows=rows)
    return folder


@pytest.mark.parametrize("train_head", [True, False])
def test_diagnostics_of_a_saved_run(tiny_run_config, tmp_path, train_head):
    run_config = {**tiny_run_config, "lora.train-head": train_head}
    run = _saved_run(tmp_path / "run", run_config, sigma=1.5)
    out = diagnose(run, batches=2, partition=0, num_partitions=2)
    assert out["round"] == 1 and out["‖A‖₂"] == pytest.approx(1.0, abs=1e-5)
    assert 0 <= out["clipped"] <= 1 and out["‖g‖ lora"] > 0
    assert 0 < out["NSR lora"] < math.inf
    if train_head:
        assert out["‖g‖ head"] > 0 and 0 < out["lora share"] < 1
    else:
        assert out["‖g‖ head"] == 0 and out["lora share"] == pytest.approx(1.0)
    assert out["run"] in markdown([out])
    layers = out["layers"]
    assert len(layers) == 4 and all(v > 0 for v in layers.values())  # 2 layers × query, value
    table = layer_table([out, out])
    assert table.count("\n") == 5 and "| 0.query |" in table


def test_clipping_share_follows_the_clipping_norm(tiny_run_config, tmp_path):
    tiny = _saved_run(tmp_path / "tiny", {**tiny_run_config, "privacy.max-grad-norm": 1e-6},
                      sigma=1.0)
    huge = _saved_run(tmp_path / "huge", {**tiny_run_config, "privacy.max-grad-norm": 1e6},
                      sigma=0.0)
    assert diagnose(tiny, batches=1, partition=0, num_partitions=2)["clipped"] == 1.0
    out = diagnose(huge, batches=1, partition=0, num_partitions=2)
    assert out["clipped"] == 0.0 and out["NSR lora"] == 0.0


@pytest.mark.parametrize("method", FROM_SCRATCH)
def test_diagnostics_work_for_every_method(tiny_run_config, tmp_path, method):
    # FLoRA and FedEx-LoRA take keyword-only settings: the registry builds them (the old
    # positional construction raised TypeError for both)
    run = _saved_run(tmp_path / "run", {**tiny_run_config, "strategy.name": method}, sigma=1.0)
    out = diagnose(run, batches=1, partition=0, num_partitions=2)
    assert out["‖g‖ lora"] > 0 and 0 < out["NSR lora"] < math.inf


def test_grouped_clipping_is_diagnosed_as_the_clients_clip(tiny_run_config, tmp_path):
    # C = 1e6 clips no example under one norm; with head-clip-share s = 1e-24 the head's own
    # norm √s · C = 1e-6 clips every example (the clients' grouped clipping)
    base = {**tiny_run_config, "lora.train-head": True, "privacy.max-grad-norm": 1e6}
    flat = _saved_run(tmp_path / "flat", base, sigma=1.0)
    grouped = _saved_run(tmp_path / "grouped", {**base, "privacy.head-clip-share": 1e-24},
                         sigma=1.0)
    assert diagnose(flat, batches=1, partition=0, num_partitions=2)["clipped"] == 0.0
    assert diagnose(grouped, batches=1, partition=0, num_partitions=2)["clipped"] == 1.0
