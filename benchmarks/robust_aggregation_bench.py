"""What each aggregation protects against, and what it costs when honest updates are DP noise.

python -m benchmarks.robust_aggregation_bench [--seeds 20]

Fake FedSVD rounds of :mod:`benchmarks.fake_federation` (the default run's shapes and its DP
noise at ε = 6): 3 honest replies with the sizes of the default Dirichlet split plus one
attacker, or 4 honest replies. For every ``strategy.aggregation`` (with the default screens),
and for the weighted mean with every screen off, it prints over ``--seeds`` draws and two
moments (round 1, B = 0; after 5 rounds) the median and the worst of

- ``cos vs honest``: cosine of the model's update ΔW = B′A′ − B_sent A_sent with the update
  the honest replies alone give under the plain weighted mean (1 = unharmed),
- ``norm ratio``: ‖ΔW‖ / ‖ΔW_honest‖,

and, for the honest-only rows, ``cos vs signal``: cosine of ΔW with the true per-round signal
every honest client's update carries (what an aggregator recovers from the noise: its cost).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import fake_federation as ff
from strategies import FedSVD

SIZES = (2046, 1598, 1911, 1912)  # partitions 0-3 of the default split (6 clients, seed 0)
OFF = {"max_norm_ratio": 0.0, "min_update_cosine": -1.0, "max_weight_ratio": 0.0}
AGGREGATORS = {  # name -> FedSVD keyword arguments
    "mean": {},
    "trimmed-mean 0.25": {"aggregation": "trimmed-mean", "trim_fraction": 0.25},
    "median": {"aggregation": "median"},
    "krum f=1": {"aggregation": "krum", "num_malicious": 1},
    "multi-krum f=1": {"aggregation": "multi-krum", "num_malicious": 1},
}
SETTINGS = {f"{name}, {screens}": {**kwargs, **(OFF if screens == "screens off" else {})}
            for screens in ("screens on", "screens off") for name, kwargs in AGGREGATORS.items()}


class FakeGrid:
    """Four nodes."""

    def get_node_ids(self):
        return [1, 2, 3, 4]


def product_update(state: dict, fake: ff.FakeRound) -> np.ndarray:
    """ΔW = B′A′ − B_sent A_sent of every layer, flattened (float64)."""
    return np.concatenate([
        (state[ff.b_key(m)].double().numpy() @ state[ff.a_key(m)].double().numpy()
         - fake.sent[ff.b_key(m)].astype(np.float64) @ fake.sent[ff.a_key(m)]).ravel()
        for m in ff.LAYERS])


def honest_update(arrays: dict, fake: ff.FakeRound) -> np.ndarray:
    """(B − B_sent) A_sent of every layer for B of ``arrays``, flattened."""
    return np.concatenate([((arrays[ff.b_key(m)] - fake.sent[ff.b_key(m)])
                            @ fake.sent[ff.a_key(m)].astype(np.float64)).ravel()
                           for m in ff.LAYERS])


def scenario(fake: ff.FakeRound, honest4: list, attack: str | None) -> tuple[list, list, list]:
    """(replies' arrays, their sizes, the honest ones) of one scenario of a fake round."""
    if attack is None:
        return honest4, list(SIZES), honest4
    hostile, n = ff.ATTACKS[attack](honest4[:3], fake, SIZES[3])
    return [*honest4[:3], hostile], [*SIZES[:3], n], honest4[:3]


def one_round(setting: dict, fake: ff.FakeRound, arrays: list, sizes: list,
              honest: list) -> tuple[float, float, float]:
    """(cos vs honest, norm ratio, cos vs signal) of one aggregation."""
    replies = [ff.reply(k + 1, a, n) for k, (a, n) in enumerate(zip(arrays, sizes, strict=True))]
    strategy = FedSVD(ff.LAYERS, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                      **setting)
    record = ArrayRecord({k: Array(v) for k, v in fake.sent.items()})
    list(strategy.configure_train(2, record, ConfigRecord(), FakeGrid()))
    new, _ = strategy.aggregate_train(2, replies)
    want = honest_update(ff.weighted_mean(honest, sizes[:len(honest)]), fake)
    if new is None:  # every reply rejected: the model does not move
        return 0.0, 0.0, 0.0
    got = product_update(new.to_torch_state_dict(), fake)
    if not np.isfinite(got).all():
        return float("nan"), float("inf"), float("nan")
    signal = honest_update({k: fake.sent[k] + fake.signal[k] for k in fake.trained}, fake)
    return (ff.cosine(got, want), float(np.linalg.norm(got) / np.linalg.norm(want)),
            ff.cosine(got, signal))


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # one WARNING per rejected reply
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message needs it
    start = time.perf_counter()
    scenarios = [None, *ff.ATTACKS]
    results: dict[tuple[str, str | None], list] = {(n, a): [] for n in SETTINGS for a in scenarios}
    for seed in range(args.seeds):  # every setting sees the same replies: paired
        for before in (0, 5):
            fake = ff.make_round(1000 * seed + before, rounds_before=before)
            honest4 = [fake.honest(n) for n in SIZES]
            for attack in scenarios:
                arrays, sizes, honest = scenario(fake, honest4, attack)
                for name, setting in SETTINGS.items():
                    results[name, attack].append(one_round(setting, fake, arrays, sizes,
                                                           honest))
    print(f"{args.seeds} seeds x (round 1, round 6); median [worst] over them\n")
    print(f"{'aggregation':<30} {'attack':<34} {'cos vs honest':>15} {'norm ratio':>14} "
          f"{'cos vs signal':>15}")
    for (name, attack), rows in results.items():
        cos, ratio, signal = (np.array(column) for column in zip(*rows, strict=True))
        worst_ratio = ratio[np.argmax(np.abs(np.log(np.where(ratio > 0, ratio, 1e-300))))]
        text = [f"{statistics.median(cos):.3f} [{np.nanmin(cos):.3f}]",
                f"{statistics.median(ratio):.2f} [{worst_ratio:.3g}]",
                f"{statistics.median(signal):.3f} [{np.nanmin(signal):.3f}]"
                if attack is None else "-"]
        print(f"{name:<30} {attack or 'none (4 honest)':<34} {text[0]:>15} {text[1]:>14} "
              f"{text[2]:>15}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
