"""The timed parts of :mod:`benchmarks.round_time`: start-up, one client round, the server's.

Each function runs a part with the project's own functions, as the run does, and appends its
wall time to a :data:`Samples` dict: part name -> dtype label ("" for start-up) -> seconds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = {"forward": "forward", "loss": "loss", "backward": "backward + per-sample grads",
          "clip": "clipping", "noise": "noise", "optimizer": "rest of optimizer step",
          "other": "other (Poisson batch, zero_grad)"}
CLIENT_ROUND, PER_STEP = "client round", "per step (mean of the round's steps)"
CONFIGURE, AGGREGATE = "server: configure round", "server: aggregate + refactorize"
Samples = dict[str, dict[str, list[float]]]


@contextmanager
def timed(samples: Samples, part: str, label: str = ""):
    """Append the block's wall time to ``samples[part][label]`` (parts listed as they start)."""
    times = samples.setdefault(part, {}).setdefault(label, [])
    start = time.perf_counter()
    yield
    times.append(time.perf_counter() - start)


def evaluation_part(examples: int, *, final: bool = False) -> str:
    """The name of the evaluation part on ``examples`` examples."""
    return f"server: {'final ' if final else ''}evaluation ({examples} examples)"


def import_seconds(module: str) -> float:
    """Seconds a fresh interpreter takes to import ``module`` (its own start excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return float(done.stdout.split()[-1])


def clear_data_caches() -> None:
    """Forget every corpus, partition and tokenized partition this process has cached."""
    import common.data
    from client.training import load_local_data

    load_local_data.cache_clear()
    for value in vars(common.data).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


class StepClock:
    """The phases of each DP-SGD step, from hooks around what ``run_local_steps`` calls.

    A forward pre-hook and hook on the private module, and wrappers on its criterion and on the
    optimizer's ``step``, ``clip_and_accumulate`` and ``add_noise``. Backward (with Opacus'
    per-sample gradients, computed in its backward hooks) is the time from the loss to ``step``;
    "other" is the rest of the step (Poisson batch, ``zero_grad``, the last ``loss.item()``).
    ``steps`` holds one dict of seconds per step.
    """

    def __init__(self, private) -> None:
        self.steps: list[dict[str, float]] = []
        self.marks: dict[str, float] = {}
        self.last = time.perf_counter()
        self.private, self.criterion = private, private.criterion
        self.handles = [private.module.register_forward_pre_hook(self._mark("forward-start")),
                        private.module.register_forward_hook(self._mark("forward-end"))]
        private.criterion = self._loss
        optimizer = private.optimizer
        for name in ("clip_and_accumulate", "add_noise"):  # a DPOptimizer's (none without DP)
            if hasattr(optimizer, name):
                setattr(optimizer, name, self._summed(getattr(optimizer, name), name))
        optimizer.step = self._step(optimizer.step)

    def _mark(self, name: str):
        def hook(*_):
            self.marks[name] = time.perf_counter()
        return hook

    def _loss(self, *args):
        out = self.criterion(*args)
        self.marks["loss-end"] = time.perf_counter()
        return out

    def _summed(self, method, name: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.marks[name] = self.marks.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    def _step(self, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            end, m = time.perf_counter(), self.marks
            phases = {"clip": m.get("clip_and_accumulate", 0.0), "noise": m.get("add_noise", 0.0)}
            if "loss-end" in m:  # else an empty Poisson batch: no forward, no backward
                phases |= {"forward": m["forward-end"] - m["forward-start"],
                           "loss": m["loss-end"] - m["forward-end"],
                           "backward": start - m["loss-end"]}
            phases["optimizer"] = end - start - phases["clip"] - phases["noise"]
            phases["other"] = end - self.last - sum(phases.values())
            self.steps.append({"step": end - self.last, **phases})
            self.last, self.marks = end, {}
            return out
        return wrapper

    def remove(self) -> None:
        """Take the hooks and wrappers off again."""
        for handle in self.handles:
            handle.remove()
        self.private.criterion = self.criterion
        for name in ("clip_and_accumulate", "add_noise", "step"):
            vars(self.private.optimizer).pop(name, None)


def start_up(flat: dict, *, partition: int, num_partitions: int, repeats: int,
             imports: bool, samples: Samples) -> dict:
    """Time the parts before the first round ``repeats`` times; return what the rounds need."""
    from flwr.app import ConfigRecord

    from client import training as t
    from common.adapter import AdapterLayout
    from common.config import AppConfig
    from common.data import eval_subset, load_corpus
    from common.model import build_model, load_tokenizer
    from common.public_head import set_class_name_head
    from common.tasks import TASKS
    from privacy import PrivacyLedger
    from privacy.policy import plan_round
    from server.preflight import check_run, preflight

    cfg = AppConfig.from_run_config(flat)
    task = TASKS[cfg.model.task]
    for _ in range(repeats):
        if imports:
            samples.setdefault("imports (client.app, fresh interpreter)", {}).setdefault(
                "", []).append(import_seconds("client.app"))
        clear_data_caches()
        with timed(samples, "load corpus (each process, once)"):
            load_corpus(cfg.data, cfg.seed, cfg.model.task_kind)
        clear_data_caches()
        with timed(samples, f"launcher: preflight (corpus, {num_partitions} partitions)"):
            preflight(flat, num_partitions=num_partitions)
        clear_data_caches()
        with timed(samples, "server: check_run (corpus)"):
            corpus = check_run(cfg)
        with timed(samples, "server: build model + LoRA + class-name head"):
            model = build_model(cfg.model, cfg.lora, num_labels=corpus.num_labels, seed=cfg.seed,
                                device=t.device(cfg.model), svd_form=cfg.strategy.svd_form)
            tokenizer = load_tokenizer(cfg.model)
            if cfg.lora.head_init == "class-names":
                set_class_name_head(model, tokenizer, corpus.label_names)
        with timed(samples, f"server: tokenize all {len(corpus.test)} test examples"):
            full = task.encode(corpus.test, tokenizer, cfg.model.max_length)
        with timed(samples, "server: tokenize the evaluation subset"):
            subset = task.encode(eval_subset(corpus.test, cfg.data.max_eval_examples, cfg.seed),
                                 tokenizer, cfg.model.max_length)
        clear_data_caches()
        with timed(samples, "client: load + tokenize its partition (corpus; once per actor)"):
            data = t.load_local_data(cfg, partition, num_partitions)
        with timed(samples, "client: calibrate σ (its first round only)"):
            sigma = plan_round(cfg, PrivacyLedger.from_dict(cfg.privacy.accountant, {}),
                               num_examples=len(data.train), noise_multiplier=None,
                               where=f"partition {partition}").noise_multiplier
    layout = AdapterLayout.from_model(model)
    return {"cfg": cfg, "corpus": corpus, "model": model, "layout": layout, "full": full,
            "subset": subset, "data": data, "sigma": sigma, "initial": layout.tensors(),
            "factors": t.parse_factors(ConfigRecord())}


def client_round(s: dict, dtype, label: str, samples: Samples):
    """Time one client round as :func:`client.app.train` runs it; return its reply's records."""
    from flwr.app import ArrayRecord

    from client import training as t
    from privacy import PrivacyLedger
    from privacy.policy import plan_round

    cfg, data, factors = s["cfg"], s["data"], s["factors"]
    with timed(samples, CLIENT_ROUND, label):
        with timed(samples, "  build model from disk + global adapter (every round)", label):
            model, layout = t.build_global_model(cfg, data.num_labels,
                                                 ArrayRecord(torch_state_dict=s["initial"]))
        with timed(samples, "  privacy plan (σ known)", label):
            ledger = PrivacyLedger.from_dict(cfg.privacy.accountant, {})
            budget = plan_round(cfg, ledger, num_examples=len(data.train),
                                noise_multiplier=s["sigma"], where="the timed partition")
        before = layout.tensors(factors, head=False)
        with timed(samples, "  privatize (Opacus make_private)", label):
            private = t.privatize(cfg, model, layout, factors, data.train, budget, ledger)
        clock = StepClock(private)
        with timed(samples, f"  {budget.steps} DP-SGD steps", label):
            t.run_local_steps(private, budget.steps, dtype,
                              encoder_dropout=cfg.model.encoder_dropout)
        clock.remove()
        with timed(samples, "  reply (ε, moved norm, arrays)", label):
            private.record_into(ledger)
            moved = t.moved_norm(before, layout, factors, require_each=cfg.privacy.is_private)
            arrays = ArrayRecord(torch_state_dict=layout.tensors(factors,
                                                                 head=cfg.lora.train_head))
            metrics = t.train_reply_metrics(
                num_examples=len(data.train), loss=0.0, ledger=ledger, privacy=cfg.privacy,
                sigma=budget.noise_multiplier, steps=budget.steps, exhausted=False, moved=moved)
    samples.setdefault(f"    {PER_STEP}", {}).setdefault(label, []).append(
        statistics.mean(step["step"] for step in clock.steps))
    for phase, name in PHASES.items():  # they add up to the step
        samples.setdefault(f"      {name}", {}).setdefault(label, []).append(
            sum(step.get(phase, 0.0) for step in clock.steps) / len(clock.steps))
    return arrays, metrics


def twin(arrays, k: int):
    """``arrays`` (k = 0) or, for the k-th other node, plus noise of each tensor's own scale.

    Stands in for another node's reply: identical replies would be rejected as colluders.
    """
    import torch
    from flwr.app import ArrayRecord

    if k == 0:
        return arrays
    generator = torch.Generator().manual_seed(k)
    return ArrayRecord(torch_state_dict={
        name: x + (float(x.std()) or 1.0) * torch.randn(x.shape, generator=generator)
        for name, x in arrays.to_torch_state_dict().items()})


def server_round(s: dict, flat: dict, *, num_partitions: int, dtype, label: str,
                 samples: Samples, client, full_eval: bool) -> None:
    """Time a round's server parts around ``client()``, which returns one reply's records.

    ``configure_train`` and ``aggregate_train`` of the run's strategy, every sampled node
    replying with the timed client's arrays (:func:`twin`), then the server's evaluation of
    the new adapter (with ``full_eval`` also the final round's, on the whole test split).
    """
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from benchmarks.fake_federation import FakeGrid
    from common import contract
    from common.config import AppConfig
    from common.schema import RoundTrainingMetrics
    from common.tasks import TASKS
    from server.evaluation import GlobalEvaluator
    from strategies.registry import build_strategy

    cfg = s["cfg"]
    # Seeded sampling asks real nodes for their partition ids (a roll call): sample at random.
    sampling = AppConfig.from_run_config({**flat, "strategy.client-sampling": "random"})
    strategy = build_strategy(sampling, s["layout"], device=s["model"].device)
    initial = ArrayRecord(torch_state_dict=s["initial"])
    with timed(samples, CONFIGURE, label):
        sent = list(strategy.configure_train(1, initial, ConfigRecord(),
                                             FakeGrid(num_partitions)))
    s["sampled"] = len(sent)
    arrays, metrics = client()
    replies = [Message(RecordDict({contract.ARRAYS: twin(arrays, k), contract.METRICS: metrics}),
                       reply_to=instruction) for k, instruction in enumerate(sent)]
    with timed(samples, AGGREGATE, label):
        new, _ = strategy.aggregate_train(1, replies)
    s["aggregated"] = new is not None
    evaluator = GlobalEvaluator(
        s["model"], s["layout"], subset=s["subset"], full=s["full"],
        final_round=cfg.strategy.num_rounds, training=RoundTrainingMetrics(),
        split=s["corpus"].eval_split, compute_dtype=dtype, task=TASKS[cfg.model.task],
        label_names=s["corpus"].label_names)
    state = new if new is not None else initial
    with timed(samples, evaluation_part(len(s["subset"])), label):
        evaluator(1, state)
    final = evaluation_part(len(s["full"]), final=True)
    if full_eval and label not in samples.get(final, {}):  # once: it is long
        with timed(samples, final, label):
            evaluator(cfg.strategy.num_rounds, state)
