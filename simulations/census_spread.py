r"""How far the DP label census moves the class shares of a file: π̂ over repeated censuses.

    python -m simulations.census_spread --num-nodes 6 --draws 2000 \
        --run-config 'data.source="results/sms/sms-spam.csv" data.partitioner="iid"'

Cuts the training split into ``--num-nodes`` partitions exactly as the nodes of a run would
(pyproject.toml's run config with ``--run-config`` on top), then simulates ``--draws`` censuses
(:mod:`privacy.census`) at ``privacy.census-noise-multiplier`` σ_c and prints, per class, the
training split's true share and π̂'s mean, standard deviation and 2.5–97.5 % range, and the
ε of one census alone. A planning aid before a run: nothing trains, nothing is sent, and the
simulated noise is seeded (``--seed``), unlike a real census's. Each class's summed count
carries noise of standard deviation σ_c · √N for N nodes, so π̂_k moves by about
σ_c · √N / n for n training examples.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from common.config import AppConfig, ConfigError, DataConfig, PrivacyConfig
from common.data import load_corpus, load_partition
from common.run_config import app_run_config
from privacy.census import census_epsilon, census_prior, noisy_label_counts
from simulations.launch.federation import ROOT


def spread(data: DataConfig, privacy: PrivacyConfig, num_nodes: int, draws: int, seed: int, *,
           split_seed: int) -> list[dict[str, float | str]]:
    """One row per class: true share, and π̂'s mean, std and 2.5/97.5 % over ``draws`` censuses.

    The training split of ``data`` is cut into ``num_nodes`` partitions as a run of seed
    ``split_seed`` cuts it; each census adds ``privacy.census-noise-multiplier`` σ_c noise
    drawn from a generator of ``seed``.
    """
    corpus = load_corpus(data, split_seed)
    labels = [np.asarray(load_partition(data, split_seed, i, num_nodes)[0]["label"])
              for i in range(num_nodes)]
    true = np.bincount(np.concatenate(labels), minlength=corpus.num_labels)
    sigma = privacy.census_noise_multiplier
    rng = np.random.default_rng(seed)
    shares = np.array([list(census_prior(
        [noisy_label_counts(node, corpus.num_labels, sigma, rng) for node in labels],
        corpus.label_names).values()) for _ in range(draws)])
    return [{"class": name, "true share": true[k] / true.sum(), "mean": shares[:, k].mean(),
             "std": shares[:, k].std(), "2.5 %": np.percentile(shares[:, k], 2.5),
             "97.5 %": np.percentile(shares[:, k], 97.5)}
            for k, name in enumerate(corpus.label_names)]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 2, before loading any data, for a run config the app would refuse."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--run-config", default="", help="'k=v ...' on top of pyproject.toml's")
    parser.add_argument("--num-nodes", type=int, default=6, help="nodes the file is cut into")
    parser.add_argument("--draws", type=int, default=2000, help="simulated censuses")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    args = parser.parse_args(argv)
    try:
        cfg = AppConfig.from_run_config(app_run_config(ROOT, args.run_config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.num_nodes < 1 or args.draws < 2:
        print(f"error: --num-nodes {args.num_nodes} must be >= 1 and --draws {args.draws} >= 2",
              file=sys.stderr)
        return 2
    rows = spread(cfg.data, cfg.privacy, args.num_nodes, args.draws, args.seed,
                  split_seed=cfg.seed)
    sigma = cfg.privacy.census_noise_multiplier
    eps = census_epsilon(cfg.privacy) if cfg.privacy.is_private else 0.0
    print(f"census of {args.num_nodes} nodes at σ_c = {sigma:g} ({cfg.privacy.accountant}: ε = "
          f"{eps:.3f} at δ = {cfg.privacy.delta:g} alone), {args.draws} simulated draws")
    print("| class | true share | π̂ mean | π̂ std | π̂ 2.5–97.5 % |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['class']} | {r['true share']:.4f} | {r['mean']:.4f} | {r['std']:.4f} | "
              f"{r['2.5 %']:.4f}–{r['97.5 %']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
