"""The plots of ``fedsvd-spectrum``, from its per-layer rows (``spectrum.csv``), runs side by side.

- ``singular-values.png``: the singular values σ_i of ΔW against i, one line per run: the
  median over the run's layers, the band from the smallest to the largest layer's (log scale);
- ``intruders.png``: the intruder count of each layer (model order), one line per run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common import schema

SINGULAR_VALUES_PLOT, INTRUDERS_PLOT = "singular-values.png", "intruders.png"


def write_all(rows: Sequence[dict], folder: Path) -> list[Path]:
    """Write both plots into ``folder``; return their paths."""
    runs = list(dict.fromkeys(row[schema.RUN] for row in rows))
    palette = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    colors = {run: palette[i % len(palette)] for i, run in enumerate(runs)}
    return [singular_values(rows, runs, colors, folder / SINGULAR_VALUES_PLOT),
            intruders_by_layer(rows, runs, colors, folder / INTRUDERS_PLOT)]


def short_layer(module: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` → ``3.query``: block index, last name."""
    index = re.search(r"\.(\d+)\.", module)
    last = module.rsplit(".", 1)[-1]
    return f"{index[1]}.{last}" if index else last


def singular_values(rows: Sequence[dict], runs: list[str], colors: dict, path: Path) -> Path:
    """σ_i of ΔW against i per run: median over layers, min–max band."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for run in runs:
        layers = [row for row in rows if row[schema.RUN] == run]
        width = max(int(row["r"]) for row in layers)
        sigma = np.array([[row.get(f"sigma_{i + 1}", math.nan) for i in range(width)]
                          for row in layers], dtype=float)  # (layers, R)
        sigma[sigma <= 0] = math.nan  # off the log axis: ΔW = 0 (B = 0) has σ = 0
        if np.isnan(sigma).all():
            continue
        i = np.arange(1, width + 1)
        ax.plot(i, np.nanmedian(sigma, axis=0), marker=".", color=colors[run], label=run)
        ax.fill_between(i, np.nanmin(sigma, axis=0), np.nanmax(sigma, axis=0),
                        color=colors[run], alpha=0.15, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("i (singular values of ΔW = s·B·A, descending)")
    ax.set_ylabel("σ_i: median over layers, min–max band")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("spectrum of the update ΔW")
    return _save(fig, path)


def intruders_by_layer(rows: Sequence[dict], runs: list[str], colors: dict, path: Path) -> Path:
    """Intruder dimensions per layer, one line per run (markers offset so that ties show)."""
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    fig = Figure(figsize=(max(5.5, 0.35 * len(layers) + 2), 3.8))
    ax = fig.subplots()
    for n, run in enumerate(runs):
        counts = {row["layer"]: row["intruders"] for row in rows if row[schema.RUN] == run}
        x = [i + (n - (len(runs) - 1) / 2) * 0.08 for i, layer in enumerate(layers)
             if layer in counts]
        ax.plot(x, [counts[layer] for layer in layers if layer in counts], marker="o",
                markersize=4, color=colors[run], label=run)
    first = rows[0]
    ax.set_xticks(range(len(layers)), [short_layer(layer) for layer in layers], rotation=90,
                  fontsize="x-small")
    ax.set_xlabel("LoRA layer (block.module)")
    ax.set_ylabel(f"intruders among the top {first['top_k']}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"intruder dimensions of W0 + ΔW (|cos| < {first['threshold']:g})")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG (a bare Figure: no pyplot, no backend, no global state)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
