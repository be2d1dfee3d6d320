"""merging.perturb: noise of the same norm, half-rank pruning, and writing them as adapters."""

import numpy as np
import torch
from test_merging import MODULES, best_rank_k, product, random_pairs, rel_err, write_adapter

from merging import load_sources
from merging.perturb import frobenius, half_rank, noise_like, save_source


def test_noise_has_each_layers_norm_shape_and_no_relation_to_it():
    pairs = random_pairs(np.random.default_rng(0), 4)
    noise = noise_like(pairs, torch.Generator().manual_seed(1))
    for module, pair in pairs.items():
        want = np.linalg.norm(product(pair))
        assert abs(frobenius(*pair) - want) <= 1e-9 * want
        assert abs(np.linalg.norm(product(noise[module])) - want) <= 1e-5 * want
        assert [t.shape for t in noise[module]] == [t.shape for t in pair]
        cosine = np.sum(product(noise[module]) * product(pair)) / want**2
        assert abs(cosine) < 0.5


def test_half_rank_is_the_best_approximation_of_half_the_rank():
    pairs = random_pairs(np.random.default_rng(2), 5)
    halved = half_rank(pairs)
    for module, pair in pairs.items():
        assert halved[module][1].shape[0] == 3  # ⌈5 / 2⌉
        assert rel_err(product(halved[module]), best_rank_k(product(pair), 3)) <= 1e-5


def test_damaged_source_round_trips_as_an_adapter(tmp_path):
    pairs = random_pairs(np.random.default_rng(3), 4)
    [source] = load_sources([write_adapter(tmp_path / "src", pairs, r=4, alpha=8)])
    save_source(tmp_path / "half", source, half_rank(source.lora), op="half")
    [back] = load_sources([tmp_path / "half"])
    assert back.config.r == 2 and set(back.lora) == set(MODULES)
    for module in MODULES:
        want = best_rank_k(2.0 * product(pairs[module]), 2)  # alpha / r = 2
        assert rel_err(back.delta(module).double().numpy(), want) <= 1e-5
