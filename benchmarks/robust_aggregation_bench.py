"""What each aggregation protects against, and what it costs when honest updates are DP noise.

python -m benchmarks.robust_aggregation_bench [--seeds 10] [--server-optimizer none,adam]
    [--rounds 5] [--markdown]

Fake FedSVD rounds of :mod:`benchmarks.fake_federation` (the default run's shapes and its DP
noise at ε = 6), at two moments (round 1, B = 0; round 6, after 5 rounds), every setting on the
same replies (paired). Scenarios:

- honest only: 3 or 4 replies with the sizes of the default Dirichlet split;
- one attacker among three: 2 honest replies and one attacker, which claims its own
  ``num-examples`` or 10⁷, for each attack of ``fake_federation.ATTACKS`` (the adaptive ones
  search, with the default screens as their oracle, for the update that just passes them);
- two colluders among five: 3 honest replies and two colluders, identical (sent − λ × the honest
  mean update, λ = 3, 5) or adaptive (each its own mix of the flipped mean and noise, as flipped
  as the screens let through), with their own sizes or 10⁷.

Settings: every ``strategy.aggregation`` with the default screens and bounds, and the plain
weighted mean with screens and bounds off. Each is measured under every server optimizer of
``--server-optimizer`` (``none``: plain averaging; ``adam``: FedAdam with the run defaults of
``common.config.StrategyConfig``, η 0.03, β₁ 0.9, β₂ 0.99, τ 1e-3). For each it prints, over the
seeds and both moments, the median and the worst of

- ``cos``: cosine of the model's update ΔW = B′A′ − B_sent A_sent with the update the honest
  replies alone give under the plain weighted mean, stepped by the same optimizer from the same
  state (1 = unharmed; for the honest-only rows: with the plain weighted mean of all of them),
- ``norm``: ‖ΔW‖ / ‖ΔW_honest‖ (the worst: farthest from 1 on a log scale),

plus, for the colluders, the most honest replies rejected in any round, and for the honest-only
rows the cosine with the true per-round signal (what an aggregator recovers from the noise).

The optimizer's state. Each aggregation and its honest reference step from their own deep copy
of the same optimizer, so both start equal. In round 1 the moments are fresh and every optimizer
sees the very replies of plain averaging. In round 6 they are the moments 5 honest rounds built:
``make_round(seed, rounds_before=5)`` draws its history (5 rounds of 3 honest replies of 1,885
examples) and averages it without an optimizer; :func:`warmed` draws the same replies from
``make_round(seed)`` (the same noise, in the same order) and runs the real strategy on them (the
mean with the default screens and bounds, the optimizer, FedSVD's refactorization and the
moments' transport), so the optimizer's round 6 starts from its own state after those 5 rounds
(its own B and turned A, not plain averaging's; every setting gets the moments of the default
mean). Its round-6 replies carry the same honest updates as plain averaging's, and its attacks
are searched again against its own state. A table of the default mean by moment follows the
main one.

Coordinates. FedSVD turns B's coordinates every round (A′ = T A with T orthogonal: the row space
of A never changes), so updates are drawn in the first round's coordinates (A_0) and sent in an
arm's own as u T⁻¹ = u A_0 Aᵀ (:class:`Frame`): the same ΔW, and the same isotropic DP noise. An
attacker in such a state searches in the first coordinates (its noise direction stays put in
ΔW), its candidates judged by the screens in the arm's own.

Persistent attackers (``--rounds R``, default 5; 0: none): the adaptive flip and the shrink
just under the erase screen of one attacker among three, and the adaptive colluders of two among
five, attack every round from round 1 on, each round's attack searched against that round's
state, under the mean with the default screens and bounds, the optimizer's state carried across
the rounds; and, as the control, 3 honest replies alone under the same settings. Each is
compared with the same R rounds of the same honest replies (their updates drawn once per seed,
round 1's those of the first moment) under the plain weighted mean with the same optimizer: the
cosine and the norm ratio of the cumulative ΔW (B_R A_R − B_0 A_0), and the most honest replies
rejected in any round. The by-moment and persistent tables also print the largest norm ratio.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import fake_federation as ff
from common.config import StrategyConfig
from strategies import FedSVD
from strategies.server_optimizer import ServerOptimizer

SIZES = (2046, 1598, 1911, 1912, 1929)  # partitions 0-4 of the default split (6, seed 0)
CLAIM = 10_000_000  # the largest num-examples a reply may claim
HISTORY_EXAMPLES = 1885  # make_round's reference_examples: the sizes of its earlier rounds
MOMENTS = (0, 5)  # rounds before the measured one: round 1 (B = 0), round 6
OFF = {"max_norm_ratio": 0.0, "min_update_cosine": -1.0, "max_weight_ratio": 0.0,
       "bound_updates": False}
DEFAULTS = "mean, defaults"
SETTINGS = {  # name -> FedSVD keyword arguments
    DEFAULTS: {},
    "trimmed-mean 0.25": {"aggregation": "trimmed-mean", "trim_fraction": 0.25},
    "median": {"aggregation": "median"},
    "krum f=1": {"aggregation": "krum", "num_malicious": 1},
    "multi-krum f=1": {"aggregation": "multi-krum", "num_malicious": 1},
    "mean, screens and bounds off": OFF,
}
COLLUDER_SCALES = (3.0, 5.0)
OPTIMIZERS = {"none": "plain", "adam": "FedAdam"}  # --server-optimizer -> its column's name
ONE_OF_THREE = "1 of 3: adaptive flip (just passes the screens)"
SHRINK = "1 of 3: shrink, just under the erase screen"
TWO_OF_FIVE = "2 of 5: adaptive (just pass the screens)"

Arrays = dict[str, np.ndarray]
OracleFactory = Callable[[ff.FakeRound, Sequence[Arrays], Sequence[int]], ff.Oracle]


def server_optimizer(kind: str) -> ServerOptimizer:
    """A fresh ``kind`` optimizer with the run's default rates (``StrategyConfig``)."""
    config = StrategyConfig()
    return ServerOptimizer(kind, config.server_learning_rate, config.server_momentum,
                           config.server_beta2, config.server_tau)


def strategy(setting: dict, fake: ff.FakeRound,
             optimizer: ServerOptimizer | None = None) -> FedSVD:
    """FedSVD with ``setting`` and ``optimizer`` itself, configured with ``fake.sent``."""
    return ff.fedsvd_round(fake, 5, **setting, server_optimizer=optimizer)


def product(state: dict) -> np.ndarray:
    """B A of every layer, flattened (float64); ``state`` holds tensors or arrays."""
    return np.concatenate([
        (np.asarray(state[ff.b_key(m)], dtype=np.float64)
         @ np.asarray(state[ff.a_key(m)], dtype=np.float64)).ravel() for m in ff.LAYERS])


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


def reference_update(mean: Arrays, fake: ff.FakeRound, optimizer: ServerOptimizer | None,
                     server_round: int) -> np.ndarray:
    """ΔW the honest replies' plain weighted mean ``mean`` gives with a copy of ``optimizer``.

    Plain averaging: (B̄ − B_sent) A_sent; else step(B̄ − B_sent) A_sent, the step taken by a deep
    copy of ``optimizer`` in ``server_round`` (as the strategy steps, FedSVD's refactorization
    keeping the product).
    """
    if optimizer is None or optimizer.is_plain_averaging:
        return honest_update(mean, fake)
    steps = copy.deepcopy(optimizer).step(server_round, {
        k: torch.from_numpy(np.asarray(mean[k], dtype=np.float64) - fake.sent[k])
        for k in fake.trained})
    return np.concatenate([(steps[ff.b_key(m)].double().numpy()
                            @ fake.sent[ff.a_key(m)].astype(np.float64)).ravel()
                           for m in ff.LAYERS])


def aggregate(setting: dict, fake: ff.FakeRound, arrays: list, sizes: list, honest: int,
              optimizer: ServerOptimizer | None, server_round: int
              ) -> tuple[dict | None, int]:
    """(the new state as tensors or None, honest replies rejected) of one real aggregation.

    The first ``honest`` replies are the honest ones (nodes 1..honest). ``optimizer`` is the
    strategy's own: its state moves.
    """
    replies = [ff.reply(k + 1, a, n) for k, (a, n) in enumerate(zip(arrays, sizes, strict=True))]
    run = strategy(setting, fake, optimizer)
    rejected = {r.node_id for r in run.validator(run._global, 2).screen(replies).rejected}
    new, _ = run.aggregate_train(server_round, replies)
    honest_rejected = len(rejected & set(range(1, honest + 1)))
    return (None if new is None else new.to_torch_state_dict()), honest_rejected


def one_round(setting: dict, fake: ff.FakeRound, arrays: list, sizes: list, honest: int,
              reference: np.ndarray, optimizer: ServerOptimizer | None = None,
              server_round: int = 2
              ) -> tuple[tuple[float, float, int], np.ndarray | None]:
    """((cos with ``reference``, norm ratio, honest replies rejected), ΔW) of one aggregation.

    The first ``honest`` replies are the honest ones (nodes 1..honest); ``optimizer`` steps as
    a deep copy (it is left as it was); ΔW is None when the model did not move or is not finite.
    """
    new, honest_rejected = aggregate(setting, fake, arrays, sizes, honest,
                                     copy.deepcopy(optimizer), server_round)
    if new is None:  # every reply rejected: the model does not move
        return (0.0, 0.0, honest_rejected), None
    got = product_update(new, fake)
    if not np.isfinite(got).all():
        return (float("nan"), float("inf"), honest_rejected), None
    return (ff.cosine(got, reference), float(np.linalg.norm(got) / np.linalg.norm(reference)),
            honest_rejected), got


def draw_honest(fake: ff.FakeRound) -> list[Arrays]:
    """One honest reply for each of :data:`SIZES` (in that order, from ``fake.rng``)."""
    return [fake.honest(n) for n in SIZES]


def scenarios(fake: ff.FakeRound, honest: list[Arrays] | None = None,
              oracle: OracleFactory = ff.screen_oracle) -> dict[str, tuple[list, list, int]]:
    """name -> (replies' arrays, their sizes, how many of the first are honest).

    ``honest``: the replies of :func:`draw_honest` (None: drawn here); ``oracle``: the screens
    the adaptive attacks search against, from (state, the other replies, all sizes).
    """
    honest = draw_honest(fake) if honest is None else honest
    out = {"honest only, 3": (honest[:3], list(SIZES[:3]), 3),
           "honest only, 4": (honest[:4], list(SIZES[:4]), 4)}
    pair = honest[:2]
    for name, attack in ff.ATTACKS.items():
        hostile = attack(pair, fake, oracle(fake, pair, SIZES[:3]))
        for claim in (SIZES[2], CLAIM):
            label = f"1 of 3: {name}" + (", n = 1e7" if claim == CLAIM else "")
            out[label] = ([*pair, hostile], [*SIZES[:2], claim], 2)
    trio = honest[:3]
    pairs = {f"identical, at -{scale:g}x the honest mean": ff.colluders(trio, fake, scale)
             for scale in COLLUDER_SCALES}
    pairs["adaptive (just pass the screens)"] = ff.adaptive_colluders(
        trio, fake, oracle(fake, trio, [*SIZES[:3], SIZES[3], SIZES[3]]))
    for name, hostile in pairs.items():
        for claim in (SIZES[3], CLAIM):
            label = f"2 of 5: {name}" + (", n = 1e7" if claim == CLAIM else "")
            out[label] = ([*trio, *hostile], [*SIZES[:3], claim, claim], 3)
    return out


# --- an arm's own coordinates --------------------------------------------------------------


def as_arrays(state: dict) -> Arrays:
    """A strategy's state (tensors) as float32 arrays."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


@dataclass
class Frame:
    """An arm's state and its coordinates against the first round's (A_0).

    FedSVD only turns A (A = T A_0, T orthogonal: the row space stays), so with R = A_0 Aᵀ
    (= T⁻¹) an update u of B drawn against A_0 is u R here (the same ΔW u A_0), and B here is
    B Rᵀ in the first round's coordinates.
    """

    fake: ff.FakeRound  # the state sent, in its own coordinates
    first: ff.FakeRound  # round 1 of the arm: A_0, the signal
    rotation: dict[str, np.ndarray]  # B's key -> R = A_0 Aᵀ (r, r), float64

    @classmethod
    def of(cls, state: Arrays, first: ff.FakeRound) -> Frame:
        """The frame of ``state`` (arrays) for rounds that started from ``first``."""
        rotation = {ff.b_key(m): first.sent[ff.a_key(m)].astype(np.float64)
                    @ state[ff.a_key(m)].astype(np.float64).T for m in ff.LAYERS}
        return cls(ff.FakeRound(state, first.signal, first.rng), first, rotation)

    def origin(self) -> ff.FakeRound:
        """The same state in the first round's coordinates: B Rᵀ, A_0, the head."""
        sent = dict(self.fake.sent)
        for m in ff.LAYERS:
            b, a = ff.b_key(m), ff.a_key(m)
            sent[b] = (sent[b].astype(np.float64) @ self.rotation[b].T).astype(np.float32)
            sent[a] = self.first.sent[a]
        return ff.FakeRound(sent, self.first.signal, self.first.rng)

    def place(self, update: Arrays) -> Arrays:
        """sent + u R for B, sent + u for the head: an update of the first coordinates, here."""
        return {k: (self.fake.sent[k] + (update[k] @ self.rotation[k] if k in self.rotation
                                         else update[k])).astype(np.float32)
                for k in self.fake.trained}

    def here(self, arrays: Arrays, origin: ff.FakeRound) -> Arrays:
        """Replied arrays of the first coordinates (sent ``origin``), sent here instead."""
        return self.place({k: arrays[k].astype(np.float64) - origin.sent[k]
                           for k in self.fake.trained})

    def oracle(self, origin: ff.FakeRound) -> OracleFactory:
        """The default screens of this state, for replies made in the first coordinates."""
        def factory(_: ff.FakeRound, others: Sequence[Arrays], sizes: Sequence[int]
                    ) -> ff.Oracle:
            passes = ff.screen_oracle(self.fake, [self.here(o, origin) for o in others], sizes)
            return lambda candidates: passes([self.here(c, origin) for c in candidates])
        return factory


def updates_of(replies: list[Arrays], fake: ff.FakeRound) -> list[Arrays]:
    """Each reply's update X − X_sent of the trained arrays (float64)."""
    return [{k: r[k].astype(np.float64) - fake.sent[k] for k in fake.trained} for r in replies]


def warmed(seed: int, rounds: int, kind: str
           ) -> tuple[Arrays, ServerOptimizer, ff.FakeRound, Arrays]:
    """(state, optimizer, the first round, the plain history) after ``rounds`` honest rounds.

    The replies are those ``make_round(seed, rounds_before=rounds)`` averages for its history
    (:func:`benchmarks.fake_federation.honest_history`: 3 of 1,885 examples a round, the same
    draws in the same order), their updates placed in
    the strategy's own coordinates, aggregated by the real strategy (the mean with the default
    screens and bounds, FedSVD) and stepped by a ``kind`` optimizer, round t = 1..``rounds``.
    The plain history is make_round's own state after them (its replies' plain means, A
    untouched), to check that the draws are its.
    """
    history = ff.make_round(seed, reference_examples=HISTORY_EXAMPLES)
    first = ff.FakeRound(dict(history.sent), history.signal, history.rng)
    state, optimizer = dict(first.sent), server_optimizer(kind)
    for t, replies in enumerate(ff.honest_history(history, rounds, HISTORY_EXAMPLES), 1):
        frame = Frame.of(state, first)
        arrays = [frame.place(u) for u in updates_of(replies, history)]
        new, _ = aggregate(SETTINGS[DEFAULTS], frame.fake, arrays, [HISTORY_EXAMPLES] * 3, 3,
                           optimizer, t)
        state = as_arrays(new) if new is not None else state
    return state, optimizer, first, history.sent


# --- one seed ------------------------------------------------------------------------------

Rows = dict[tuple, list]  # (scenario, setting, optimizer[, rounds before]) -> rows


def arm(kind: str, seed: int, before: int, fake: ff.FakeRound, honest: list[Arrays],
        plain: dict) -> tuple[ff.FakeRound, dict, ServerOptimizer]:
    """(the state sent, the scenarios, the optimizer) of ``kind`` at a moment.

    Plain averaging, and any optimizer in round 1 (fresh moments, B = 0): ``fake`` and the
    scenarios ``plain`` themselves. Otherwise :func:`warmed`'s state and moments, the same
    honest updates, the attacks searched again against that state.
    """
    optimizer = server_optimizer(kind)
    if kind == "none" or before == 0:
        return fake, plain, optimizer
    state, optimizer, first, history = warmed(seed, before, kind)
    if not all(np.array_equal(history[k], fake.sent[k]) for k in fake.sent):
        raise RuntimeError(f"seed {seed}: the warm-up did not replay make_round's history")
    frame = Frame.of(state, first)
    origin = frame.origin()
    honest0 = [{k: (origin.sent[k] + u[k]).astype(np.float32) for k in origin.trained}
               for u in updates_of(honest, fake)]
    made = scenarios(origin, honest0, frame.oracle(origin))
    return frame.fake, {name: ([frame.here(a, origin) for a in arrays], sizes, h)
                        for name, (arrays, sizes, h) in made.items()}, optimizer


def measure(seed: int, kinds: Sequence[str], settings: dict = SETTINGS,
            moments: Sequence[int] = MOMENTS) -> tuple[Rows, Rows]:
    """(rows, cosines with the signal of the honest-only rows) of one seed.

    Keyed by (scenario, setting, optimizer, rounds before the measured one).
    """
    results: Rows = {}
    signal_cos: Rows = {}
    for before in moments:
        fake = ff.make_round(1000 * seed + before, rounds_before=before,
                             reference_examples=HISTORY_EXAMPLES)
        signal = honest_update({k: fake.sent[k] + fake.signal[k] for k in fake.trained}, fake)
        honest = draw_honest(fake)
        plain = scenarios(fake, honest)
        for kind in kinds:
            sent, made, optimizer = arm(kind, 1000 * seed + before, before, fake, honest, plain)
            for name, (arrays, sizes, h) in made.items():
                reference = reference_update(ff.weighted_mean(arrays[:h], sizes[:h]), sent,
                                             optimizer, before + 1)
                for setting, kwargs in settings.items():
                    row, got = one_round(kwargs, sent, arrays, sizes, h, reference, optimizer,
                                         before + 1)
                    results.setdefault((name, setting, kind, before), []).append(row)
                    if name.startswith("honest") and got is not None:
                        signal_cos.setdefault((name, setting, kind, before), []).append(
                            ff.cosine(got, signal))
    return results, signal_cos


def persistent(seed: int, kinds: Sequence[str], rounds: int) -> dict[tuple[str, str], tuple]:
    """(scenario, optimizer) -> (cos, norm ratio, most honest rejected) of ``rounds`` rounds.

    Round 1 is the first moment of :func:`measure` (``make_round(1000 seed)``, the same first
    honest replies); each later round draws its own from the same generator.
    """
    first = ff.make_round(1000 * seed, reference_examples=HISTORY_EXAMPLES)
    draws = [updates_of(draw_honest(first), first) for _ in range(rounds)]
    start = product(first.sent)
    plans = {"honest only, 3": (3, [*SIZES[:3]], None),
             ONE_OF_THREE: (2, [*SIZES[:3]], lambda h, f, o: [ff.adaptive_flip(h, f, o)]),
             SHRINK: (2, [*SIZES[:3]], lambda h, f, o: [ff.shrink_under_erase(h, f, o)]),
             TWO_OF_FIVE: (3, [*SIZES[:3], SIZES[3], SIZES[3]], ff.adaptive_colluders)}
    out = {}
    for kind in kinds:
        for name, (h, sizes, attack) in plans.items():
            attacked = honest_only = first.sent
            attacked_opt, honest_opt = server_optimizer(kind), server_optimizer(kind)
            most_rejected = 0
            for t, updates in enumerate(draws, start=1):
                frame = Frame.of(attacked, first)
                origin = frame.origin()
                honest0 = [{k: (origin.sent[k] + u[k]).astype(np.float32)
                            for k in origin.trained} for u in updates[:h]]
                hostile = [] if attack is None else attack(
                    honest0, origin, frame.oracle(origin)(origin, honest0, sizes))
                arrays = [frame.here(a, origin) for a in [*honest0, *hostile]]
                new, rejected = aggregate(SETTINGS[DEFAULTS], frame.fake, arrays, sizes, h,
                                          attacked_opt, t)
                attacked = as_arrays(new) if new is not None else attacked
                most_rejected = max(most_rejected, rejected)
                frame = Frame.of(honest_only, first)
                new, _ = aggregate(OFF, frame.fake, [frame.place(u) for u in updates[:h]],
                                   sizes[:h], h, honest_opt, t)
                honest_only = as_arrays(new) if new is not None else honest_only
            got, reference = product(attacked) - start, product(honest_only) - start
            out[name, kind] = (ff.cosine(got, reference),
                               float(np.linalg.norm(got) / np.linalg.norm(reference)),
                               most_rejected)
    return out


# --- the report ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--server-optimizer", type=_kinds, default=("none", "adam"),
                        help="comma list of none, adam: each measured on the same replies")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the persistent attackers (0: not measured)")
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # one WARNING per rejected reply
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message needs it
    start = time.perf_counter()
    by_moment: Rows = {}
    signal_cos: Rows = {}
    multi: dict[tuple[str, str], list] = {}
    for seed in range(args.seeds):  # every setting sees the same replies: paired
        rows, signal = measure(seed, args.server_optimizer)
        for key, values in rows.items():
            by_moment.setdefault(key, []).extend(values)
        for key, values in signal.items():
            signal_cos.setdefault(key[:3], []).extend(values)
        if args.rounds:
            for key, row in persistent(seed, args.server_optimizer, args.rounds).items():
                multi.setdefault(key, []).append(row)
    results = pooled(by_moment)
    print(f"{args.seeds} seeds x (round 1, round 6); median [worst] over them\n")
    print(f"{'scenario':<52} {'setting':<30} {'optimizer':<9} {'cos':>15} {'norm':>14} "
          f"{'honest rej':>10} {'cos signal':>15}")
    for (name, setting, kind), rows in results.items():
        print(f"{name:<52} {setting:<30} {kind:<9} " + " ".join(_cells(rows, signal_cos.get(
            (name, setting, kind)))))
    print(f"\n{DEFAULTS}, by moment; {args.seeds} seeds\n")
    print(f"{'scenario':<52} {'optimizer':<9} {'round':>5} {'cos':>15} {'norm':>14} "
          f"{'honest rej':>10} {'max norm':>8}")
    for (name, setting, kind, before), rows in grouped(by_moment).items():
        if setting == DEFAULTS:
            print(f"{name:<52} {kind:<9} {before + 1:>5} " + " ".join(_cells(rows, None)[:3])
                  + f" {max(row[1] for row in rows):>8.3f}")
    if multi:
        print(f"\n{args.rounds} rounds attacked, from round 1, {DEFAULTS}; the cumulative ΔW vs "
              f"the same rounds honest-only (the plain weighted mean); {args.seeds} seeds\n")
        print(f"{'scenario':<52} {'optimizer':<9} {'cos':>15} {'norm':>14} {'honest rej':>10} "
              f"{'max norm':>8}")
        for (name, kind), rows in multi.items():
            print(f"{name:<52} {kind:<9} " + " ".join(_cells(rows, None)[:3])
                  + f" {max(row[1] for row in rows):>8.3f}")
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.markdown:
        print(markdown(results, multi, args.rounds))


def pooled(by_moment: Rows) -> Rows:
    """(scenario, setting, optimizer) -> the rows of every moment."""
    out: Rows = {}
    for (name, setting, kind, _), rows in grouped(by_moment).items():
        out.setdefault((name, setting, kind), []).extend(rows)
    return out


def grouped(rows: Rows) -> Rows:
    """``rows`` ordered by scenario, then setting, optimizer, moment (each as first seen)."""
    order = [{part: i for i, part in enumerate(dict.fromkeys(key[j] for key in rows))}
             for j in range(len(next(iter(rows), ())))]
    return {key: rows[key] for key in sorted(rows, key=lambda key: [
        index[part] for index, part in zip(order, key, strict=True)])}


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in OPTIMIZERS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(OPTIMIZERS)}")
    return kinds


def _cells(rows: list, signal: list | None) -> list[str]:
    cos, ratio, rejected = (np.array(column) for column in zip(*rows, strict=True))
    return [f"{statistics.median(cos):.3f} [{np.nanmin(cos):.3f}]".rjust(15),
            f"{statistics.median(ratio):.2f} [{_worst_ratio(ratio):.3g}]".rjust(14),
            f"{int(rejected.max())}".rjust(10),
            (f"{statistics.median(signal):.3f} [{min(signal):.3f}]" if signal else "-").rjust(15)]


def _worst_ratio(ratio: np.ndarray) -> float:
    """The norm ratio farthest from 1 on a log scale."""
    return float(ratio[np.argmax(np.abs(np.log(np.where(ratio > 0, ratio, 1e-300))))])


def _pair(rows: list) -> list[str]:
    """median [worst] cos, median [worst] norm."""
    cos, ratio, _ = (np.array(c) for c in zip(*rows, strict=True))
    return [f"{statistics.median(cos):.2f} [{np.nanmin(cos):.2f}]",
            f"{statistics.median(ratio):.2f} [{_worst_ratio(ratio):.2f}]"]


def markdown(results: Rows, multi: dict[tuple[str, str], list] | None = None,
             rounds: int = 5) -> str:
    """The default settings (a cos, norm pair per optimizer), every setting, the persistent.

    Every setting: one row per scenario, a column per setting and optimizer: median cos / norm
    [worst cos].
    """
    names = list(dict.fromkeys(name for name, _, _ in results))
    settings = list(dict.fromkeys(setting for _, setting, _ in results))
    kinds = list(dict.fromkeys(kind for _, _, kind in results))
    out = [_pair_table("scenario (the mean with the default screens and bounds)", names, kinds,
                       lambda name, kind: results[name, DEFAULTS, kind]) if DEFAULTS in settings
           else ""]
    lines = ["| scenario | " + " | ".join(f"{setting}, {OPTIMIZERS[kind]}" for setting in settings
                                           for kind in kinds) + " |",
             "|---|" + "---|" * (len(settings) * len(kinds))]
    for name in names:
        cells = []
        for setting in settings:
            for kind in kinds:
                cos, ratio, _ = (np.array(c) for c in zip(*results[name, setting, kind],
                                                            strict=True))
                cells.append(f"{statistics.median(cos):.2f} / {statistics.median(ratio):.2f} "
                             f"[{np.nanmin(cos):.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
    if multi:
        persistent_names = list(dict.fromkeys(name for name, _ in multi))
        out.append(_pair_table(f"every round of {rounds} attacked (cumulative ΔW)",
                               persistent_names, kinds, lambda name, kind: multi[name, kind]))
    return "\n\n".join(part for part in out if part)


def _pair_table(title: str, names: list[str], kinds: list[str],
                rows_of: Callable[[str, str], list]) -> str:
    """| title | cos, kind | norm, kind | ... | honest rejected |: median [worst]."""
    lines = [f"| {title} | " + " | ".join(f"cos, {OPTIMIZERS[k]} | norm, {OPTIMIZERS[k]}"
                                          for k in kinds) + " | honest rejected |",
             "|---|" + "---|---|" * len(kinds) + "---|"]
    for name in names:
        cells = [cell for kind in kinds for cell in _pair(rows_of(name, kind))]
        rejected = max(int(row[2]) for kind in kinds for row in rows_of(name, kind))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rejected} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
