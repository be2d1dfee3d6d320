"""Why a method keeps more or less accuracy under DP: per-sample gradients on a saved global state.

``python -m simulations.dp_diagnostics RUN_DIR [RUN_DIR ...] [--batches 8] [--partition 0]``

For each finished run folder (``config.json`` + ``checkpoint.safetensors``: the global arrays
after its last round) it rebuilds the global model, makes trainable what the method's clients
train in an odd round (FedSVD, FFA-LoRA: B; FedAvg-LoRA, FLoRA, FedEx-LoRA: A and B; RoLoRA: B;
merge-sv: σ) plus the head when ``lora.train-head``, and computes with Opacus the per-example
gradients g_i on ``--batches`` batches of ``train.batch-size`` examples of one client's
partition. With C = ``privacy.max-grad-norm`` and σ the run's noise multiplier it prints:

- ``‖g‖ lora`` / ``‖g‖ head``: median per-example gradient norm of the LoRA factors / of the head;
- ``clipped``: the share of examples whose gradient is scaled down: ‖g_i‖ > C under one norm;
  with ``privacy.head-clip-share`` s > 0 (grouped clipping, as the clients clip:
  :func:`client.training.clip_groups`), ‖g_i|_head‖ > √s · C or ‖g_i|_LoRA‖ > √(1 − s) · C;
- ``lora share``: median over examples of ‖g_i restricted to LoRA‖² / ‖g_i‖², the part of the
  clipping budget C the adapter would get under one norm (the rest goes to the head; grouped
  clipping gives it 1 − s whatever this share);
- ``NSR lora``: noise-to-signal ratio of one DP-SGD step on the LoRA factors,
  σ C √P / ‖Σ_i clip(g_i)|_LoRA‖ with P the number of LoRA parameters trained (the expected
  norm of the Gaussian noise over the norm of the clipped summed gradient; the noise is σ C
  under grouped clipping too, C = √(Σ_g C_g²));
- with ``--per-layer``, a second table: the median per-example gradient norm of every LoRA
  layer's trained factors;
- ``‖A‖₂``: mean spectral norm of A over layers (FedSVD: 1, orthonormal rows; peft's random
  init: about 0.6 for MiniLM); ∂L/∂B = s Σ_t δ_t (A x_t)ᵀ grows with it.

Nothing here trains or changes a run; it reads the same data partition the clients use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from opacus import GradSampleModule

from client.training import clip_groups, load_local_data
from common import schema
from common.adapter import AdapterLayout
from common.batching import split_batch
from common.config import AppConfig
from common.model import build_model
from privacy import frozen_input_backward
from server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from strategies.registry import build_strategy

COLUMNS = (schema.RUN, schema.ROUND, "‖g‖ lora", "‖g‖ head", "clipped", "lora share", "NSR lora",
           "‖A‖₂")


def diagnose(folder: Path, *, batches: int, partition: int, num_partitions: int) -> dict:
    """The statistics of the module docstring for one run folder."""
    run_config = json.loads((folder / schema.CONFIG_FILE).read_text())
    cfg = AppConfig.from_run_config(run_config)
    checkpoint = load_checkpoint(folder, cfg)
    data = load_local_data(cfg, partition, num_partitions)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=cfg.seed,
                        svd_form=cfg.strategy.svd_form)
    layout = AdapterLayout.from_model(model)
    layout.load(checkpoint.arrays.to_torch_state_dict())
    strategy = build_strategy(cfg, layout)
    factors = strategy.train_factors(1)
    trainable = layout.set_trainable(model, factors, cfg.lora.train_head)
    lora = {id(p) for pair in layout.pairs for p in (pair.factor(f) for f in factors)}
    model.train()  # as the clients train (dropout on); Opacus hooks only fire in train mode
    wrapped = GradSampleModule(model, loss_reduction="sum")
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    C, sigma = cfg.privacy.max_grad_norm, _noise_multiplier(checkpoint.rows)
    # None: one norm C for every trained tensor
    groups = clip_groups(cfg.privacy, layout, factors, train_head=cfg.lora.train_head)
    C_head, C_lora = (norm for _, norm in groups) if groups else (C, C)
    norms_lora, norms_head, nsr, clipped = [], [], [], []
    per_layer: dict[str, list[torch.Tensor]] = {pair.module: [] for pair in layout.pairs}
    for step, batch in enumerate(loader):
        if step == batches:
            break
        inputs, labels = split_batch(batch)
        wrapped.zero_grad(set_to_none=True)
        logits = wrapped(**inputs).logits
        with frozen_input_backward():
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        sq_lora = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in trainable if id(p) in lora)
        sq_head = sum((p.grad_sample.flatten(1).pow(2).sum(1) for p in trainable
                       if id(p) not in lora), torch.zeros(len(labels)))
        total, norm_lora, norm_head = (sq_lora + sq_head).sqrt(), sq_lora.sqrt(), sq_head.sqrt()
        if groups:  # each group to its own norm: min(1, C_g / ‖g_i|_g‖)
            clip = (C_lora / norm_lora).clamp(max=1.0)
            clipped.append((norm_lora > C_lora) | (norm_head > C_head))
        else:  # Opacus: min(1, C / ‖g_i‖)
            clip = (C / total).clamp(max=1.0)
            clipped.append(total > C)
        signal = math.sqrt(sum(float((p.grad_sample * _expand(clip, p.grad_sample)).sum(0)
                                     .pow(2).sum()) for p in trainable if id(p) in lora))
        params = sum(p.numel() for p in trainable if id(p) in lora)
        nsr.append(sigma * C * math.sqrt(params) / signal if signal > 0 else math.inf)
        norms_lora.append(norm_lora)
        norms_head.append(norm_head)
        for pair in layout.pairs:
            per_layer[pair.module].append(sum(
                pair.factor(f).grad_sample.flatten(1).pow(2).sum(1) for f in factors).sqrt())
    g_lora, g_head = torch.cat(norms_lora), torch.cat(norms_head)
    g_total = (g_lora.pow(2) + g_head.pow(2)).sqrt()
    return {
        schema.RUN: folder.name, schema.ROUND: checkpoint.server_round,
        "‖g‖ lora": float(g_lora.median()), "‖g‖ head": float(g_head.median()),
        "clipped": float(torch.cat(clipped).float().mean()),
        "lora share": float((g_lora.pow(2) / g_total.pow(2).clamp(min=1e-30)).median()),
        "NSR lora": float(torch.tensor(nsr).median()),
        "‖A‖₂": float(torch.stack([torch.linalg.matrix_norm(p.A.detach(), ord=2)
                                    for p in layout.pairs]).mean()),
        "layers": {module: float(torch.cat(norms).median()) for module, norms in
                   per_layer.items()},
    }


def _expand(clip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return clip.view(-1, *([1] * (like.dim() - 1)))


def _noise_multiplier(rows: list[dict]) -> float:
    """σ the run's clients used (the metrics' ``noise-multiplier``; 0 without DP)."""
    values = [float(r[schema.NOISE_MULTIPLIER]) for r in rows
              if r.get(schema.NOISE_MULTIPLIER) not in (None, "")]
    return values[-1] if values else 0.0


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], str | int) else f"{row[c]:.3g}" for c in COLUMNS]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def layer_table(rows: list[dict]) -> str:
    """Median per-example gradient norm of each LoRA layer's trained factors, one column a run."""
    lines = ["| layer | " + " | ".join(r[schema.RUN] for r in rows) + " |",
             "|" + "---|" * (len(rows) + 1)]
    for module in rows[0]["layers"]:
        name = module.removeprefix("bert.encoder.layer.").replace(".attention.self", "")
        lines.append(f"| {name} | " + " | ".join(f"{r['layers'].get(module, math.nan):.3g}"
                                                  for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table for every run folder given."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders with a checkpoint")
    p.add_argument("--batches", type=int, default=8, help="batches of train.batch-size")
    p.add_argument("--partition", type=int, default=0, help="the client whose data is used")
    p.add_argument("--num-partitions", type=int, default=6, help="clients of the run")
    p.add_argument("--per-layer", action="store_true",
                   help="also the median per-example gradient norm of every LoRA layer")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / CHECKPOINT_FILE).is_file()]
    if missing:
        p.error(f"no {CHECKPOINT_FILE} in {', '.join(missing)}")
    torch.manual_seed(0)
    rows = [diagnose(r, batches=args.batches, partition=args.partition,
                     num_partitions=args.num_partitions) for r in args.runs]
    print(markdown(rows))
    if args.per_layer:
        print("\n" + layer_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
