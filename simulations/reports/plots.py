"""The sweep's PNG plots, from the tidy table of :mod:`simulations.reports.records`.

- ``accuracy_vs_round_a<α>.png``: eval accuracy per round, one panel per ε, one line per
  method (mean over seeds; the last round is on the whole eval split, the others on the fixed
  ``data.max-eval-examples`` subset);
- ``accuracy_vs_epsilon_a<α>.png``: final accuracy against ε, mean and 95 % t-interval over
  seeds, per method;
- ``bytes_per_round.png``: mean MB sent up and down per round (all sampled clients) per method.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from common import schema
from common.methods import method_order
from simulations.reports.records import epsilon_label


def write_all(tidy: pd.DataFrame, summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Write every plot into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = _colors(tidy[schema.METHOD])
    paths = []
    for alpha in sorted(tidy[schema.ALPHA].unique()):
        paths.append(accuracy_vs_round(tidy[tidy[schema.ALPHA] == alpha], colors,
                                       folder / f"accuracy_vs_round_a{alpha:g}.png"))
        paths.append(accuracy_vs_epsilon(summary[summary[schema.ALPHA] == alpha], colors,
                                         folder / f"accuracy_vs_epsilon_a{alpha:g}.png"))
    paths.append(bytes_per_round(tidy, colors, folder / "bytes_per_round.png"))
    return paths


def _colors(methods: pd.Series) -> dict[str, tuple]:
    palette = matplotlib.colormaps["tab10" if methods.nunique() <= 10 else "tab20"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(method_order(methods))}


def _epsilons(values) -> list[float]:
    return sorted(set(values), key=lambda e: -e)  # ∞ first, then decreasing ε


def accuracy_vs_round(tidy: pd.DataFrame, colors: dict, path: Path) -> Path:
    """One panel per ε; in each, the seed-mean accuracy per round of every method."""
    epsilons = _epsilons(tidy[schema.EPSILON_BUDGET])
    fig = Figure(figsize=(4 * len(epsilons), 3.4))
    axes = fig.subplots(1, len(epsilons), sharey=True, squeeze=False)
    split = tidy[schema.tidy_name(schema.EVAL_SPLIT)].iloc[0]
    round_, accuracy = schema.tidy_name(schema.ROUND), schema.tidy_name(schema.ACCURACY)
    for ax, eps in zip(axes[0], epsilons, strict=True):
        for method in method_order(tidy[schema.METHOD]):
            rows = tidy[(tidy[schema.EPSILON_BUDGET] == eps) & (tidy[schema.METHOD] == method)]
            if len(rows):
                mean = rows.groupby(round_)[accuracy].mean().dropna()  # eval-every > 1
                ax.plot(mean.index, mean.values, marker=".", color=colors[method], label=method)
        ax.set_title(f"ε = {epsilon_label(eps)}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{split} accuracy (mean over seeds)")
    axes[0][-1].legend(fontsize="small")
    alpha = tidy[schema.ALPHA].iloc[0]
    fig.suptitle(f"{split} accuracy per round, Dirichlet α = {alpha:g}")
    return _save(fig, path)


def accuracy_vs_epsilon(summary: pd.DataFrame, colors: dict, path: Path) -> Path:
    """Final accuracy against ε (categorical axis), with 95 % t-interval error bars."""
    epsilons = _epsilons(summary[schema.EPSILON_BUDGET])[::-1]  # small ε (strong privacy) first
    methods = method_order(summary[schema.METHOD])
    fig = Figure(figsize=(1.6 * len(epsilons) + 3, 3.8))
    ax = fig.subplots()
    width = 0.6 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = summary[summary[schema.METHOD] == method].set_index(schema.EPSILON_BUDGET)
        rows = rows.reindex(epsilons)
        x = np.arange(len(epsilons)) + (i - (len(methods) - 1) / 2) * width
        ax.errorbar(x, rows[schema.MEAN], yerr=rows[schema.CI95].fillna(0), fmt="o", capsize=3,
                    color=colors[method], label=method)
    ax.set_xticks(np.arange(len(epsilons)), [epsilon_label(e) for e in epsilons])
    ax.set_xlabel("privacy budget ε per client")
    ax.set_ylabel("final accuracy (mean ± 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    alpha = summary[schema.ALPHA].iloc[0]
    ax.set_title(f"final accuracy against ε, Dirichlet α = {alpha:g}")
    return _save(fig, path)


def bytes_per_round(tidy: pd.DataFrame, colors: dict, path: Path) -> Path:
    """Mean bytes per training round (round ≥ 1), up and down, one bar pair per method."""
    up, down = schema.tidy_name(schema.BYTES_UP), schema.tidy_name(schema.BYTES_DOWN)
    methods = method_order(tidy[schema.METHOD])
    trained = tidy[tidy[schema.tidy_name(schema.ROUND)] >= 1]
    mb = trained.groupby(schema.METHOD)[[up, down]].mean().reindex(methods) / 1e6
    fig = Figure(figsize=(1.2 * len(methods) + 2, 3.6))
    ax = fig.subplots()
    x = np.arange(len(methods))
    handles = []
    for offset, column, label, hatch in ((-0.2, up, "up", ""), (0.2, down, "down", "//")):
        bars = ax.bar(x + offset, mb[column], width=0.4, hatch=hatch, edgecolor="black",
                      color=[colors[m] for m in methods])
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=label))
    ax.set_xticks(x, methods)
    ax.set_yscale("log")
    ax.set_ylabel("MB per round (all sampled clients)")
    ax.legend(handles=handles, fontsize="small")
    ax.set_title("communication per training round")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG. A bare Figure (no pyplot) needs no backend and no global state."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
