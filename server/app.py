"""Flower ServerApp: the configured LoRA strategy over DP-SGD clients, evaluation, results."""

from __future__ import annotations

import json
import random
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import schema
from common.adapter import AdapterLayout
from common.class_prior import decision_offsets, log_prior
from common.config import AppConfig
from common.data import eval_subset
from common.devices import resolve_device
from common.environment import run_environment
from common.model import build_model, load_tokenizer
from common.model_path import hub_commit
from common.precision import emulation_warning, resolve_compute_dtype
from common.public_head import names_without_letters, set_class_name_head
from common.schema import RoundTrainingMetrics
from common.tasks import TASKS
from server.census import take_census
from server.evaluation import GlobalEvaluator
from server.generations import generate_samples
from server.merged_adapter import merged_adapter_state
from server.preflight import check_run, clear_results
from server.results import save_run
from server.resume import prepare_run
from strategies.registry import build_strategy

app = ServerApp()


class RunFailed(RuntimeError):
    """The run cannot produce a result; the message says why.

    Flower records it as the run's ``status-details``, which the launchers print last.
    """


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run, and turn any failure into one :class:`RunFailed` line that names its cause."""
    try:
        run(grid, context)
    except RunFailed as exc:
        log(ERROR, "the run failed: %s", exc)
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log(ERROR, "the run failed: %s", reason)
        raise RunFailed(reason) from exc


def run(grid: Grid, context: Context) -> None:
    """Check → initial adapter or the last checkpoint → rounds → results folder.

    Nothing trains before :func:`server.preflight.check_run` has passed. The initial adapter is
    B = 0, peft's A and the seeded head (the class-name head with ``lora.head-init``), or for
    merge-sv the merged adapter in SVD form
    (:mod:`strategies.merge_sv`). A checkpoint is written after every round
    (:mod:`server.resume`); with ``output.resume`` the run continues after the last one. Each
    round waits at most ``strategy.round-timeout`` for the nodes' replies. A run in which no
    round updated the global adapter fails instead of saving an untrained one.
    """
    cfg = AppConfig.from_run_config(context.run_config)
    corpus = check_run(cfg)
    folder = cfg.results_folder
    if cfg.output.overwrite and (removed := clear_results(folder)):
        log(WARNING, "output.overwrite=true: removed %s from %s", ", ".join(removed), folder)
    model_device = resolve_device(cfg.model.device)
    model = build_model(cfg.model, cfg.lora, num_labels=corpus.num_labels, seed=cfg.seed,
                        device=model_device, svd_form=cfg.strategy.svd_form)
    layout = AdapterLayout.from_model(model)
    tokenizer = load_tokenizer(cfg.model)
    task = TASKS[cfg.model.task]
    if cfg.lora.head_init == "class-names":  # public: the encoder and the class names alone
        set_class_name_head(model, tokenizer, corpus.label_names)
        if unnamed := names_without_letters(corpus.label_names):
            log(WARNING, "lora.head-init='class-names': the class names %s have no letters, so "
                "the frozen head set from them knows nothing of what the classes mean (it is "
                "still public and spends no privacy); give the labels names in the data, or "
                "train the head: lora.train-head=true (simulations/conf/trained_head.toml)",
                ", ".join(unnamed[:5]) + (" …" if len(unnamed) > 5 else ""))
    initial_state = layout.tensors()  # B = 0, A = peft's init, the seeded or public head
    if cfg.strategy.svd_form:  # merge-sv: U, V and σ of the merged adapter
        initial_state |= merged_adapter_state(cfg.strategy.merged_adapter, layout.modules,
                                              cfg.lora.r, layout.scale)
    full_test = task.encode(corpus.test, tokenizer, cfg.model.max_length)
    subset_texts = eval_subset(corpus.test, cfg.data.max_eval_examples, cfg.seed)
    subset = task.encode(subset_texts, tokenizer, cfg.model.max_length)
    training = RoundTrainingMetrics()  # the strategy records each round's, the evaluator reads
    strategy = build_strategy(cfg, layout, training_metrics=training, device=model_device)
    compute_dtype = resolve_compute_dtype(cfg.model.compute_dtype, model_device)
    log(INFO, "frozen encoder computes in %s here (model.compute-dtype=%s)",
        str(compute_dtype).removeprefix("torch."), cfg.model.compute_dtype)
    if slow := emulation_warning(cfg.model.compute_dtype, model_device):
        log(WARNING, "%s", slow)
    decision_prior = None  # data.class-prior: decisions argmax(z − τ log π), checked above
    prior, source = cfg.data.declared_prior, "declared public"
    if cfg.data.class_prior_census:  # before any training: the nodes' ledgers count it first
        prior = take_census(grid, cfg.strategy, corpus.label_names, folder,
                            resume=cfg.output.resume, noise_multiplier=cfg.privacy.census_noise)
        source = "counted under DP"
    if prior:
        strength = cfg.data.class_prior_strength
        decision_prior = decision_offsets(prior, corpus.label_names, strength)
        shares = log_prior(prior, corpus.label_names).exp().tolist()
        log(INFO, "data.class-prior: every decision is argmax(logit − %g · log share), shares "
            "%s (%s; loss and AUC are the model's own)", strength, ", ".join(
                f"{name} {share:.4g}" for name, share in
                zip(corpus.label_names, shares, strict=True)), source)
    evaluator = GlobalEvaluator(model, layout, subset=subset, full=full_test,
                                final_round=cfg.strategy.num_rounds, training=training,
                                split=corpus.eval_split, eval_every=cfg.strategy.eval_every,
                                compute_dtype=compute_dtype, task=task,
                                label_names=corpus.label_names, log_prior=decision_prior)
    if cfg.train.deterministic:  # the same clients sampled in the same order, given node ids
        random.seed(cfg.seed)
    checkpointed, initial = prepare_run(strategy, evaluator, folder, cfg,
                                        ArrayRecord(torch_state_dict=initial_state))
    result = checkpointed.start(grid=grid, initial_arrays=initial,
                                num_rounds=cfg.strategy.num_rounds,
                                timeout=cfg.strategy.round_timeout, train_config=ConfigRecord(),
                                evaluate_fn=evaluator)
    if not any(row.get(schema.CLIENTS_TRAINED, 0) for row in evaluator.rows):
        raise RunFailed("no round updated the global adapter: every client reply failed, was "
                        "rejected or had spent its budget (see the WARNING lines above); nothing "
                        f"was saved to {folder}")
    save_run(folder, cfg, evaluator.rows, model=model, layout=layout,
             arrays=result.arrays or initial,
             environment=run_environment(compute_dtype, model_device,
                                         model_commit=hub_commit(cfg.model)))
    if task.writes_generations:  # the saved model's own words, beside its adapter
        samples = generate_samples(model, tokenizer, subset_texts, cfg.model.max_length)
        (folder / schema.GENERATIONS_FILE).write_text(json.dumps(samples, indent=2) + "\n")
    log(INFO, "results written to %s", folder)
