"""What each aggregation protects against, and what it costs when honest updates are DP noise.

python -m benchmarks.robust_aggregation_bench [--seeds 10] [--markdown]

Fake FedSVD rounds of :mod:`benchmarks.fake_federation` (the default run's shapes and its DP
noise at ε = 6), at two moments (round 1, B = 0; after 5 rounds), every setting on the same
replies (paired). Scenarios:

- honest only: 3 or 4 replies with the sizes of the default Dirichlet split;
- one attacker among three: 2 honest replies and one attacker, which claims its own
  ``num-examples`` or 10⁷, for each attack of ``fake_federation.ATTACKS`` (the adaptive ones
  search, with the default screens as their oracle, for the update that just passes them);
- two colluders among five: 3 honest replies and two colluders, identical (sent − λ × the honest
  mean update, λ = 3, 5) or adaptive (each its own mix of the flipped mean and noise, as flipped
  as the screens let through), with their own sizes or 10⁷.

Settings: every ``strategy.aggregation`` with the default screens and bounds, and the plain
weighted mean with screens and bounds off. For each it prints, over the seeds and both
moments, the median and the worst of

- ``cos``: cosine of the model's update ΔW = B′A′ − B_sent A_sent with the update the honest
  replies alone give under the plain weighted mean (1 = unharmed; for the honest-only rows:
  with the plain weighted mean of all of them),
- ``norm``: ‖ΔW‖ / ‖ΔW_honest‖ (the worst: farthest from 1 on a log scale),

plus, for the colluders, the most honest replies rejected in any round, and for the honest-only
rows the cosine with the true per-round signal (what an aggregator recovers from the noise).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import fake_federation as ff
from strategies import FedSVD

SIZES = (2046, 1598, 1911, 1912, 1929)  # partitions 0-4 of the default split (6, seed 0)
CLAIM = 10_000_000  # the largest num-examples a reply may claim
OFF = {"max_norm_ratio": 0.0, "min_update_cosine": -1.0, "max_weight_ratio": 0.0,
       "bound_updates": False}
SETTINGS = {  # name -> FedSVD keyword arguments
    "mean, defaults": {},
    "trimmed-mean 0.25": {"aggregation": "trimmed-mean", "trim_fraction": 0.25},
    "median": {"aggregation": "median"},
    "krum f=1": {"aggregation": "krum", "num_malicious": 1},
    "multi-krum f=1": {"aggregation": "multi-krum", "num_malicious": 1},
    "mean, screens and bounds off": OFF,
}
COLLUDER_SCALES = (3.0, 5.0)


def strategy(setting: dict, fake: ff.FakeRound) -> FedSVD:
    """FedSVD with ``setting``, configured for round 2 with ``fake.sent`` (five nodes)."""
    return ff.fedsvd_round(fake, 5, **setting)


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


def one_round(setting: dict, fake: ff.FakeRound, arrays: list, sizes: list, honest: int,
              reference: np.ndarray) -> tuple[tuple[float, float, int], np.ndarray | None]:
    """((cos with ``reference``, norm ratio, honest replies rejected), ΔW) of one aggregation.

    The first ``honest`` replies are the honest ones (nodes 1..honest); ΔW is None when the
    model did not move or is not finite.
    """
    replies = [ff.reply(k + 1, a, n) for k, (a, n) in enumerate(zip(arrays, sizes, strict=True))]
    run = strategy(setting, fake)
    rejected = {r.node_id for r in run.validator(run._global, 2).screen(replies).rejected}
    new, _ = run.aggregate_train(2, replies)
    honest_rejected = len(rejected & set(range(1, honest + 1)))
    if new is None:  # every reply rejected: the model does not move
        return (0.0, 0.0, honest_rejected), None
    got = product_update(new.to_torch_state_dict(), fake)
    if not np.isfinite(got).all():
        return (float("nan"), float("inf"), honest_rejected), None
    return (ff.cosine(got, reference), float(np.linalg.norm(got) / np.linalg.norm(reference)),
            honest_rejected), got


def scenarios(fake: ff.FakeRound) -> dict[str, tuple[list, list, int]]:
    """name -> (replies' arrays, their sizes, how many of the first are honest)."""
    honest = [fake.honest(n) for n in SIZES]
    out = {"honest only, 3": (honest[:3], list(SIZES[:3]), 3),
           "honest only, 4": (honest[:4], list(SIZES[:4]), 4)}
    pair = honest[:2]
    for name, attack in ff.ATTACKS.items():
        hostile = attack(pair, fake, ff.screen_oracle(fake, pair, SIZES[:3]))
        for claim in (SIZES[2], CLAIM):
            label = f"1 of 3: {name}" + (", n = 1e7" if claim == CLAIM else "")
            out[label] = ([*pair, hostile], [*SIZES[:2], claim], 2)
    trio = honest[:3]
    pairs = {f"identical, at -{scale:g}x the honest mean": ff.colluders(trio, fake, scale)
             for scale in COLLUDER_SCALES}
    pairs["adaptive (just pass the screens)"] = ff.adaptive_colluders(
        trio, fake, ff.screen_oracle(fake, trio, [*SIZES[:3], SIZES[3], SIZES[3]]))
    for name, hostile in pairs.items():
        for claim in (SIZES[3], CLAIM):
            label = f"2 of 5: {name}" + (", n = 1e7" if claim == CLAIM else "")
            out[label] = ([*trio, *hostile], [*SIZES[:3], claim, claim], 3)
    return out


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # one WARNING per rejected reply
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message needs it
    start = time.perf_counter()
    results: dict[tuple[str, str], list] = {}
    signal_cos: dict[tuple[str, str], list] = {}
    for seed in range(args.seeds):  # every setting sees the same replies: paired
        for before in (0, 5):
            fake = ff.make_round(1000 * seed + before, rounds_before=before)
            signal = honest_update({k: fake.sent[k] + fake.signal[k] for k in fake.trained}, fake)
            for name, (arrays, sizes, honest) in scenarios(fake).items():
                reference = honest_update(ff.weighted_mean(arrays[:honest], sizes[:honest]),
                                          fake)
                for setting, kwargs in SETTINGS.items():
                    row, got = one_round(kwargs, fake, arrays, sizes, honest, reference)
                    results.setdefault((name, setting), []).append(row)
                    if name.startswith("honest") and got is not None:
                        signal_cos.setdefault((name, setting), []).append(ff.cosine(got, signal))
    print(f"{args.seeds} seeds x (round 1, round 6); median [worst] over them\n")
    print(f"{'scenario':<52} {'setting':<30} {'cos':>15} {'norm':>14} {'honest rej':>10} "
          f"{'cos signal':>15}")
    for (name, setting), rows in results.items():
        print(f"{name:<52} {setting:<30} " + " ".join(_cells(rows, signal_cos.get(
            (name, setting)))))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.markdown:
        print(markdown(results))


def _cells(rows: list, signal: list | None) -> list[str]:
    cos, ratio, rejected = (np.array(column) for column in zip(*rows, strict=True))
    worst_ratio = ratio[np.argmax(np.abs(np.log(np.where(ratio > 0, ratio, 1e-300))))]
    return [f"{statistics.median(cos):.3f} [{np.nanmin(cos):.3f}]".rjust(15),
            f"{statistics.median(ratio):.2f} [{worst_ratio:.3g}]".rjust(14),
            f"{int(rejected.max())}".rjust(10),
            (f"{statistics.median(signal):.3f} [{min(signal):.3f}]" if signal else "-").rjust(15)]


def markdown(results: dict[tuple[str, str], list]) -> str:
    """One row per scenario, one column per setting: median cos / norm [worst cos]."""
    names = list(dict.fromkeys(name for name, _ in results))
    lines = ["| scenario | " + " | ".join(SETTINGS) + " |",
             "|---|" + "---|" * len(SETTINGS)]
    for name in names:
        cells = []
        for setting in SETTINGS:
            cos, ratio, _ = (np.array(c) for c in zip(*results[name, setting], strict=True))
            cells.append(f"{statistics.median(cos):.2f} / {statistics.median(ratio):.2f} "
                         f"[{np.nanmin(cos):.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
