"""Privacy planning: from a budget to σ, and from σ to the ε a client spends round by round.

    python -m privacy.planning --epsilon 6 --examples 1885 --local-steps 10 --rounds 10
    python -m privacy.planning --sigma 1.1 --examples 1885 --batch-size 32 --rounds 10
    python -m privacy.planning --epsilon 3 --examples 1700 --rounds 30 --batch-sizes 16,32,64,128
    python -m privacy.planning --recommend --epsilon 3 --examples 400
    python -m privacy.planning --epsilon 3 --examples 1885 --census-noise-multiplier 10
    python -m privacy.planning --epsilon 3 --examples 1885 --trials 1,2,3,4,8

``--recommend`` prints the defaults fitted to the smallest client's ``--examples`` at
``--epsilon`` (the rule of :mod:`privacy.recommend`), their σ and noise, and the overrides that
apply them.

``--trials K,...`` prints σ when K runs of the schedule share ``--epsilon`` (``privacy.trials``,
learning-rate tuning on the private data; :mod:`privacy.trials`), against one run's σ.

``--batch-sizes`` compares expected batch sizes B at the same compute per round as
``--batch-size`` B₀ × ``--local-steps`` K₀ (K = max(1, round(K₀ · B₀ / B)) steps of batch B) and
the same budget: σ(B) for that schedule and the relative noise of one round's update,
σ / (B · √K) against B₀'s (the noise std of the sum of K noisy mean gradients over the sum of
their signal, for a gradient that stays the same over the round). This is the noise side of the
choice only: fewer, larger steps also make fewer updates, which only a run can weigh.

The command line refuses (exit status 2, the flag and value named on the last line) what
training would refuse: ε <= 0, δ outside (0, 1), δ >= 1/n for a private plan (the rule of
`privacy.policy.check_delta`), fewer examples than one batch, steps, rounds or batch
size < 1, and σ that is negative, infinite or NaN.

A client holds n examples and runs K DP-SGD steps per round, each on a Poisson batch with
sample rate q = 1 / ⌈n / batch⌉ (the rate Opacus' ``DPDataLoader`` uses), for at most R rounds.

Without amplification (the default, for an untrusted server) the plan assumes the client may
be sampled in every round: R · K steps of the subsampled Gaussian mechanism, accounted by an
Opacus accountant (``rdp`` or ``prv``). This is what the clients of this project do: they
calibrate σ for R · K steps and their ledger counts every step they actually take. Client
sampling by the server is not counted: a client cannot verify that it was sampled at random
and in secret.

With amplification (``--amplification``, only if the server is trusted to sample each client
independently with probability p per round and to keep that choice secret), one round is the
mechanism "with probability p, run the K steps; otherwise touch nothing of this client". Its
Rényi divergence is bounded by joint convexity of exp((α − 1) D_α):

    ε_round(α) ≤ log(1 − p + p · exp((α − 1) · K · ε_SGM(α; q, σ))) / (α − 1),

composed over R rounds and converted to (ε, δ) by Opacus' RDP conversion. The bound is sound
for any base mechanism, and it is loose: it gains about a factor p, not the p² of a Gaussian
subsampled at rate p · q per step. It needs the ``rdp`` accountant.
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.config import (
    ACCOUNTANTS,
    ConfigError,
    PrivacyConfig,
    StrategyConfig,
    TrainConfig,
    fewer_than_one_batch,
)
from privacy.accounting import HistoryEntry, calibrate_noise, epsilon_of
from privacy.census import census_entry
from privacy.policy import check_delta, sample_rate
from privacy.reach import reach_problem, shortfall
from privacy.recommend import describe, fitted_batch, recommend
from privacy.trials import plan_trials, trials_table

ORDERS = RDPAccountant.DEFAULT_ALPHAS
# the flags whose values --recommend chooses: refused beside it
CHOSEN_BY_RECOMMEND = ("--batch-size", "--local-steps", "--rounds", "--batch-sizes", "--sigma",
                       "--participation", "--amplification")
# run-config key of a value training checks -> the flag of this command line that sets it
FLAGS = {"privacy.epsilon": "--epsilon", "privacy.delta": "--delta",
         "privacy.accountant": "--accountant", "train.local-steps": "--local-steps",
         "train.batch-size": "--batch-size", "strategy.num-rounds": "--rounds",
         "privacy.trials": "--trials"}


@dataclass(frozen=True)
class Schedule:
    """What one client does: q per step, K steps per round, at most R rounds.

    ``participation`` p is the probability that the server samples the client in a round; it
    only changes the accounting when ``amplification`` is on. ``census_noise`` σ_c > 0: the
    client answers the DP label census first (:mod:`privacy.census`), composed before its steps.
    """

    sample_rate: float
    local_steps: int
    rounds: int
    participation: float = 1.0
    amplification: bool = False
    accountant: str = "rdp"
    census_noise: float = 0.0  # σ_c of a census before round 1; 0: none

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate={self.sample_rate}: must be in (0, 1]")
        if self.local_steps < 1:
            problems.append(f"local_steps={self.local_steps}: must be >= 1")
        if self.rounds < 1:
            problems.append(f"rounds={self.rounds}: must be >= 1")
        if not 0 < self.participation <= 1:
            problems.append(f"participation={self.participation}: must be in (0, 1]")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant={self.accountant!r}: one of {ACCOUNTANTS}")
        if not (math.isfinite(self.census_noise) and self.census_noise >= 0):
            problems.append(f"census_noise={self.census_noise}: must be finite and >= 0")
        if self.amplification and self.census_noise:
            problems.append("census_noise: a census is not combined with amplification by "
                            "client sampling (every node answers it)")
        if self.amplification and self.accountant != "rdp":
            problems.append(f"accountant={self.accountant!r}: amplification by client "
                            "sampling is only implemented for 'rdp'")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def spent(self) -> list[HistoryEntry]:
        """What the ledger holds before round 1: the census's entry, or nothing."""
        return [census_entry(self.census_noise)] if self.census_noise else []


def epsilon_curve(noise_multiplier: float, schedule: Schedule, delta: float) -> list[float]:
    """ε at ``delta`` after rounds 1..R, for a client that is sampled in every round.

    Without amplification, round r means r · K steps of the subsampled Gaussian. With it, r
    rounds of the client-sampled mechanism of the module docstring (which already accounts for
    the rounds the client sat out).
    """
    _check_delta(delta)
    if not 0 <= noise_multiplier < math.inf:  # NaN or inf would never return from Opacus
        raise ValueError(f"noise_multiplier={noise_multiplier}: must be finite and >= 0")
    s = schedule
    if noise_multiplier == 0:
        return [math.inf] * s.rounds
    if not s.amplification:
        curve = []
        for r in range(1, s.rounds + 1):
            history = [*s.spent, (noise_multiplier, s.sample_rate, r * s.local_steps)]
            curve.append(epsilon_of(s.accountant, history, delta))
        return curve
    per_round = _amplified_round_rdp(noise_multiplier, s)
    return [float(get_privacy_spent(orders=ORDERS, rdp=r * per_round, delta=delta)[0])
            for r in range(1, s.rounds + 1)]


def plan_noise(epsilon: float, schedule: Schedule, delta: float) -> float:
    """Smallest σ whose ε after all R rounds is at most ``epsilon`` (0 for ε = inf).

    Without amplification this is Opacus' ``get_noise_multiplier`` for R · K steps (what the
    clients use; after a census, :func:`privacy.accounting.calibrate_noise` with it spent); with
    it, a bisection on :func:`epsilon_curve` to 1e-4 relative in σ.
    """
    _check_delta(delta)
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon}: must be > 0 (inf for no privacy)")
    s = schedule
    if math.isinf(epsilon):
        return 0.0
    if not s.amplification:
        steps = s.rounds * s.local_steps
        if short := shortfall(epsilon, delta=delta, sample_rate=s.sample_rate, steps=steps,
                              accountant=s.accountant, spent=s.spent):
            raise ValueError(f"epsilon={epsilon:g} is out of reach of {steps} steps at q = "
                             f"{s.sample_rate:.4g}: {short.reason()}")
        return calibrate_noise(target_epsilon=epsilon, target_delta=delta,
                               sample_rate=s.sample_rate, steps=steps,
                               accountant=s.accountant, spent=s.spent)

    def spent(sigma: float) -> float:
        return epsilon_curve(sigma, s, delta)[-1]

    low, high = 0.0, 1.0
    while spent(high) > epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"epsilon={epsilon}: unreachable with σ <= 1e4")
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high


def _amplified_round_rdp(noise_multiplier: float, s: Schedule) -> np.ndarray:
    """RDP of one client-sampled round at every order in ORDERS (module docstring)."""
    base = s.local_steps * np.asarray(
        compute_rdp(q=s.sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS))
    alpha = np.asarray(ORDERS, dtype=float)
    p = s.participation
    if p == 1:
        return base
    log_h = np.logaddexp(math.log1p(-p), math.log(p) + (alpha - 1) * base)
    return log_h / (alpha - 1)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta}: must be in (0, 1)")


def _as_flag(problem: str) -> str:
    """``privacy.delta=0.5: must be ...`` (common.config's form) -> ``--delta 0.5: must be ...``.

    Every key of :data:`FLAGS` in ``problem`` becomes its flag.
    """
    for key, flag in FLAGS.items():
        problem = problem.replace(f"{key}=", f"{flag} ").replace(key, flag)
    return problem


@dataclass(frozen=True)
class BatchOption:
    """One expected batch size at a fixed compute per round, and the noise it costs."""

    batch_size: int
    local_steps: int
    sample_rate: float
    noise_multiplier: float

    @property
    def round_noise(self) -> float:
        """σ / (B · √K): noise-to-signal of one round's summed update, up to C / ‖g‖."""
        return self.noise_multiplier / (self.batch_size * math.sqrt(self.local_steps))


def batch_options(epsilon: float, examples: int, batch_sizes: Sequence[int], *,
                  reference_batch: int, reference_steps: int, rounds: int, delta: float,
                  accountant: str = "rdp") -> list[BatchOption]:
    """σ and round noise of each batch size at the compute of ``reference_batch`` × steps."""
    options = []
    for batch in batch_sizes:
        steps = max(1, round(reference_steps * reference_batch / batch))
        schedule = Schedule(sample_rate(examples, batch), steps, rounds, accountant=accountant)
        options.append(BatchOption(batch, steps, schedule.sample_rate,
                                   plan_noise(epsilon, schedule, delta)))
    return options


def cli_problems(args: argparse.Namespace) -> list[str]:
    """What training would refuse in these settings, one line per problem naming the flag.

    The rules are training's own: :meth:`common.config.PrivacyConfig.problems`,
    :meth:`~common.config.TrainConfig.problems`, ``strategy.num-rounds``,
    `privacy.policy.check_delta` (δ < 1/n, checked by clients only when ε is finite:
    here for a finite ``--epsilon`` or a ``--sigma`` > 0) and
    :func:`common.config.fewer_than_one_batch` (at least one batch of examples), and a budget
    that no σ meets (:func:`privacy.reach.reach_problem`, without amplification). Plus what only
    the planner takes: ``--sigma`` finite and >= 0, ``--participation`` in (0, 1].
    """
    epsilon = math.inf if args.epsilon is None else args.epsilon
    privacy = PrivacyConfig(epsilon=epsilon, delta=args.delta, accountant=args.accountant,
                            trials=max(args.trials or [1]))
    problems = [*privacy.problems(),
                *TrainConfig(local_steps=args.local_steps, batch_size=args.batch_size).problems(),
                *StrategyConfig(num_rounds=args.rounds).problems()]
    problems = [_as_flag(p) for p in problems]
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma >= 0):
        problems.append(f"--sigma {args.sigma!r}: must be finite and >= 0 (0: no noise)")
    if not 0 < args.participation <= 1:
        problems.append(f"--participation {args.participation!r}: must be in (0, 1]")
    if args.batch_size >= 1 and fewer_than_one_batch(args.examples, args.batch_size):
        problems.append(f"--examples {args.examples}: fewer than one batch (--batch-size "
                            f"{args.batch_size}); a client with fewer examples refuses to train")
    private = math.isfinite(epsilon) if args.sigma is None else args.sigma > 0
    if private:
        problems += _delta_problems(args.delta, args.examples)
    if not problems and args.sigma is None and not args.amplification:
        problems += _reach_problems(args, privacy)
    return problems


def _reach_problems(args: argparse.Namespace, privacy: PrivacyConfig) -> list[str]:
    """Training's refusal of a budget no σ meets (:func:`privacy.reach.reach_problem`), by flag."""
    sigma_c = args.census_noise_multiplier
    census = [census_entry(sigma_c)] if math.isfinite(sigma_c) and sigma_c > 0 else []
    problem = reach_problem(privacy, rounds=args.rounds, local_steps=args.local_steps,
                            batch_size=args.batch_size, num_examples=args.examples,
                            census=census, where="this client")
    return [_as_flag(problem)] if problem else []


def main(argv: Sequence[str] | None = None) -> None:
    """Print σ for a budget (``--epsilon``) or the ε curve of a given ``--sigma``.

    Settings that training refuses (:func:`cli_problems`) exit with status 2 (``parser.error``),
    the last line of the output naming each flag, its value and the rule.
    """
    parser = argparse.ArgumentParser(prog="python -m privacy.planning",
                                     description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="budget per client for the whole run")
    target.add_argument("--sigma", type=float, help="noise multiplier to evaluate")
    train, strategy = TrainConfig(), StrategyConfig()  # the run's defaults, one home
    parser.add_argument("--delta", type=float, default=PrivacyConfig().delta)
    parser.add_argument("--examples", type=int, required=True, help="examples on the client")
    parser.add_argument("--batch-size", type=int, default=train.batch_size,
                        help="expected Poisson batch")
    parser.add_argument("--local-steps", type=int, default=train.local_steps)
    parser.add_argument("--rounds", type=int, default=strategy.num_rounds)
    parser.add_argument("--participation", type=float, default=1.0,
                        help="probability the server samples the client in a round")
    parser.add_argument("--amplification", action="store_true",
                        help="count client sampling as amplification (trusted, secret sampling)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=PrivacyConfig().accountant)
    parser.add_argument("--census-noise-multiplier", type=float, default=0.0, metavar="SIGMA_C",
                        help="the client answers a DP label census first (data.class-prior="
                             "'census'; privacy.census-noise-multiplier, e.g. 10); 0: none")
    parser.add_argument("--batch-sizes", type=_positive_integers("batch sizes"),
                        metavar="B,B,...",
                        help="with --epsilon: compare these expected batch sizes at the compute "
                             "per round of --batch-size x --local-steps")
    parser.add_argument("--trials", type=_positive_integers("each number of trials"),
                        metavar="K,K,...",
                        help="with --epsilon: σ when K runs of this schedule share the budget "
                             "(privacy.trials = K, learning-rate tuning), against one run's")
    parser.add_argument("--recommend", action="store_true",
                        help="with --epsilon and --examples (the smallest client's): the "
                             "defaults fitted to them, with σ and the run-config overrides")
    args = parser.parse_args(argv)
    if args.recommend:
        problems = recommend_problems(args, given_flags(parser, argv, CHOSEN_BY_RECOMMEND))
        if problems:
            parser.error("; ".join(problems))
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            fitted = recommend(args.examples, args.epsilon, args.delta, args.accountant)
        except ValueError as exc:
            parser.error(_as_flag(str(exc)))
        print("\n".join(describe(fitted)))
        return
    problems = cli_problems(args)
    if args.batch_sizes and args.epsilon is None:
        problems.append("--batch-sizes: needs --epsilon (the budget every option meets)")
    if args.batch_sizes and args.census_noise_multiplier:
        problems.append("--batch-sizes: compares plans without a census; drop "
                        "--census-noise-multiplier")
    if not (math.isfinite(args.census_noise_multiplier) and args.census_noise_multiplier >= 0):
        problems.append(f"--census-noise-multiplier {args.census_noise_multiplier!r}: must be "
                        "finite and >= 0 (0: no census)")
    if args.batch_sizes and (args.amplification or args.participation < 1):
        problems.append("--batch-sizes: compares plans without amplification; drop "
                        "--amplification and --participation")
    problems += _trials_problems(args)
    for batch in args.batch_sizes or ():
        if batch >= 1 and fewer_than_one_batch(args.examples, batch):
            problems.append(f"--batch-sizes {batch}: more than --examples {args.examples}")
    if problems:
        parser.error("; ".join(problems))
    # Opacus warns when the best RDP order is its largest one; clients use the same orders,
    # so the plan matches what they will report.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    if args.batch_sizes:
        try:
            print_batch_options(args)
        except ValueError as exc:  # an option's budget out of reach (plan_noise)
            parser.error(str(exc))
        return
    if args.trials:
        print_trials(args)
        return
    try:
        schedule = Schedule(sample_rate(args.examples, args.batch_size), args.local_steps,
                            args.rounds, args.participation, args.amplification,
                            args.accountant, args.census_noise_multiplier)
        sigma = (plan_noise(args.epsilon, schedule, args.delta) if args.epsilon is not None
                 else args.sigma)
        curve = epsilon_curve(sigma, schedule, args.delta)
    except ValueError as exc:
        parser.error(str(exc))
    amp = (f"amplified by client sampling p = {args.participation}" if args.amplification
           else "no amplification (sampled every round, worst case)")
    census = (f", after a label census at σ_c = {args.census_noise_multiplier:g}"
              if args.census_noise_multiplier else "")
    print(f"q = {schedule.sample_rate:.5f} (n = {args.examples}, batch {args.batch_size}), "
          f"{args.local_steps} steps/round, {args.rounds} rounds, {args.accountant}, {amp}"
          f"{census}")
    print(f"noise multiplier σ = {sigma:.4f}")
    print("round  epsilon")
    for r, eps in enumerate(curve, start=1):
        print(f"{r:5d}  {eps:.4f}")
    if not args.amplification and args.participation < 1:
        expected = max(1, round(args.participation * args.rounds))
        print(f"expected rounds sampled at p = {args.participation}: {expected} "
              f"-> ε ≈ {curve[expected - 1]:.4f}")


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                flags: Sequence[str]) -> list[str]:
    """Those of ``flags`` that ``argv`` sets, however spelt (``--flag=v``, an abbreviation).

    ``argv`` is parsed again with those options' defaults set to None, so an option is given
    exactly when its value is not None.
    """
    probe = copy.deepcopy(parser)
    dests = {flag: flag.removeprefix("--").replace("-", "_") for flag in flags}
    probe.set_defaults(**dict.fromkeys(dests.values()))
    values = probe.parse_args(argv)
    return [flag for flag, dest in dests.items() if getattr(values, dest) is not None]


def recommend_problems(args: argparse.Namespace, given: Sequence[str]) -> list[str]:
    """What ``--recommend`` refuses: no ``--epsilon``, flags it sets itself, what training refuses.

    ``given``: the flags of :data:`CHOSEN_BY_RECOMMEND` on the command line. They are the
    recommendation's output, so giving one is refused rather than silently ignored.
    """
    problems = [f"{flag}: --recommend chooses it (drop the flag)" for flag in given]
    if args.census_noise_multiplier:
        problems.append("--census-noise-multiplier: --recommend plans without a census (drop "
                        "the flag, then plan its σ with --epsilon and the recommended settings)")
    if args.trials:
        problems.append("--trials: --recommend plans one run (drop the flag, then plan the "
                        "trials with --epsilon and the recommended settings)")
    if args.epsilon is None:
        problems.append("--recommend: needs --epsilon (the budget to plan for)")
        return problems
    problems += [_as_flag(p) for p in PrivacyConfig(epsilon=args.epsilon, delta=args.delta,
                                                    accountant=args.accountant).problems()]
    if args.examples < 1:
        problems.append(f"--examples {args.examples}: must be >= 1")
    elif fewer_than_one_batch(args.examples, fitted_batch(args.examples, TrainConfig().batch_size)):
        problems.append(f"--examples {args.examples}: fewer than one batch of the smallest "
                        "recommended size; a client with fewer examples refuses to train")
    elif math.isfinite(args.epsilon):
        problems += _delta_problems(args.delta, args.examples)
    return problems


def _delta_problems(delta: float, examples: int) -> list[str]:
    """Training's δ < 1/n rule (`privacy.policy.check_delta`) for a private plan, by flag."""
    if not (0 < delta < 1 and examples >= 1):
        return []  # refused elsewhere: δ by PrivacyConfig, n by the batch checks
    try:
        check_delta(delta, examples, "this client")
    except ConfigError as exc:
        return [_as_flag(p) for p in exc.problems]
    return []


def _trials_problems(args: argparse.Namespace) -> list[str]:
    """What ``--trials`` is not combined with: it plans σ for a budget, without amplification."""
    if not args.trials:
        return []
    problems = []
    if args.epsilon is None:
        problems.append("--trials: needs --epsilon (the budget the trials share)")
    if args.batch_sizes:
        problems.append("--trials: not combined with --batch-sizes (one table at a time)")
    if args.amplification or args.participation < 1:
        problems.append("--trials: plans without amplification; drop --amplification and "
                        "--participation")
    return problems


def print_trials(args: argparse.Namespace) -> None:
    """The table of ``--trials``: σ of each K (:func:`privacy.trials.plan_trials`)."""
    q = sample_rate(args.examples, args.batch_size)
    census = [census_entry(args.census_noise_multiplier)] if args.census_noise_multiplier else []
    plans = plan_trials(args.trials, epsilon=args.epsilon, delta=args.delta, sample_rate=q,
                        steps=args.rounds * args.local_steps, census=census,
                        accountant=args.accountant)
    with_census = (f", a label census at σ_c = {args.census_noise_multiplier:g} per run"
                   if census else "")
    print(f"q = {q:.5f} (n = {args.examples}, batch {args.batch_size}), {args.local_steps} "
          f"steps/round, {args.rounds} rounds{with_census}, {args.accountant}: K runs of this "
          f"schedule share ε = {args.epsilon:g} at δ = {args.delta:g} (plain composition)")
    print("\n".join(trials_table(plans)))


def _positive_integers(what: str) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers >= 1 (``what`` names them in the refusal)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be >= 1")
        return values
    return parse


def print_batch_options(args: argparse.Namespace) -> None:
    """The table of ``--batch-sizes``: σ and round noise of each, relative to ``--batch-size``."""
    planned = batch_options(args.epsilon, args.examples,
                            list(dict.fromkeys([*args.batch_sizes, args.batch_size])),
                            reference_batch=args.batch_size, reference_steps=args.local_steps,
                            rounds=args.rounds, delta=args.delta, accountant=args.accountant)
    by_size = {o.batch_size: o for o in planned}  # --batch-size's σ planned once, listed or not
    reference = by_size[args.batch_size].round_noise
    options = [by_size[batch] for batch in dict.fromkeys(args.batch_sizes)]
    best = min(options, key=lambda o: o.round_noise)
    print(f"ε = {args.epsilon:g}, δ = {args.delta:g}, n = {args.examples}, {args.rounds} rounds, "
          f"{args.batch_size * args.local_steps} examples per round (batch {args.batch_size} × "
          f"{args.local_steps} steps), {args.accountant}, no amplification")
    print("batch  steps/round  examples/round        q        σ   σ/B per step   round noise "
          f"vs batch {args.batch_size}")
    for o in options:
        mark = "  <- least noise" if o is best else ""
        print(f"{o.batch_size:5d}  {o.local_steps:11d}  {o.batch_size * o.local_steps:14d}  "
              f"{o.sample_rate:7.4f}  "
              f"{o.noise_multiplier:7.4f}  {o.noise_multiplier / o.batch_size:13.4f}   "
              f"{o.round_noise / reference:>10.2f}x{mark}")
    print("round noise: σ / (B · √steps), the noise of a round's update over its signal; fewer, "
          "larger steps also make fewer updates, which only a run can weigh")


if __name__ == "__main__":
    main()
