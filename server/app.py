"""Flower ServerApp: the configured LoRA strategy over DP-SGD clients, evaluation, results."""

from __future__ import annotations

import random
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.adapter import AdapterLayout
from common.config import AppConfig, check_delta
from common.data import encode, eval_subset, load_corpus
from common.model import build_model, load_tokenizer
from server.evaluation import GlobalEvaluator
from server.results import save_run
from server.resume import prepare_run
from strategies import (
    FedAvgLoRA,
    FedExLoRA,
    FedSVD,
    FFALoRA,
    FLoRA,
    LoraStrategy,
    MergeSV,
    RoLoRA,
)
from strategies.merge_sv import merged_adapter_state

app = ServerApp()


STRATEGY_CLASSES: dict[str, type[LoraStrategy]] = {
    "fedsvd": FedSVD, "ffa": FFALoRA, "fedavg": FedAvgLoRA, "flora": FLoRA, "fedex": FedExLoRA,
    "rolora": RoLoRA, "merge-sv": MergeSV,
}


def build_strategy(cfg: AppConfig, layout: AdapterLayout) -> LoraStrategy:
    """The strategy named by ``strategy.name``, for the LoRA layers of ``layout``."""
    s = cfg.strategy
    own = {  # the settings only one method has
        "fedsvd": {"svd_period": s.svd_period},
        "flora": {"lora_scale": layout.scale, "seed": cfg.seed},
        "fedex": {"lora_scale": layout.scale},
        "merge-sv": {"sv_rounds": s.sv_rounds, "svd_period": s.svd_period},
    }.get(s.name, {})
    return STRATEGY_CLASSES[s.name](
        layout.modules, **own, train_head=cfg.lora.train_head,
        min_valid_replies=s.min_valid_replies, max_norm_ratio=s.max_norm_ratio,
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes, min_available_nodes=s.min_train_nodes,
        min_evaluate_nodes=1 if s.fraction_evaluate else 0,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Initial adapter or the last checkpoint → rounds → results folder.

    The initial adapter is B = 0 and peft's A, or for merge-sv the merged adapter in SVD form
    (:mod:`strategies.merge_sv`). A checkpoint is written after every round
    (:mod:`server.resume`); with ``output.resume`` the run continues after the last one.
    """
    cfg = AppConfig.from_run_config(context.run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    if cfg.privacy.is_private:  # before any training; each client checks its own partition
        check_delta(cfg.privacy.delta, len(corpus.train), "the whole training split")
    model = build_model(cfg.model, cfg.lora, num_labels=corpus.num_labels, seed=cfg.seed,
                        svd_form=cfg.strategy.svd_form)
    layout = AdapterLayout.from_model(model)
    initial_state = layout.tensors()  # B = 0, A = peft's init, the seeded head
    if cfg.strategy.svd_form:  # merge-sv: U, V and σ of the merged adapter
        initial_state |= merged_adapter_state(cfg.strategy.merged_adapter, layout.modules,
                                              cfg.lora.r, layout.scale)
    tokenizer = load_tokenizer(cfg.model)
    full_test = encode(corpus.test, tokenizer, cfg.model.max_length)
    subset = encode(eval_subset(corpus.test, cfg.data.max_eval_examples, cfg.seed), tokenizer,
                    cfg.model.max_length)
    strategy = build_strategy(cfg, layout)
    evaluator = GlobalEvaluator(model, layout, subset=subset, full=full_test,
                                final_round=cfg.strategy.num_rounds, strategy=strategy,
                                split=corpus.eval_split)
    folder = Path(cfg.output.dir).expanduser().resolve() / cfg.run_name
    if cfg.train.deterministic:  # the same clients sampled in the same order, given node ids
        random.seed(cfg.seed)
    run, initial = prepare_run(strategy, evaluator, folder, cfg,
                               ArrayRecord(torch_state_dict=initial_state))
    result = run.start(grid=grid, initial_arrays=initial, num_rounds=cfg.strategy.num_rounds,
                       train_config=ConfigRecord(), evaluate_fn=evaluator)
    save_run(folder, cfg, evaluator.rows, model=model, layout=layout,
             arrays=result.arrays or initial)
    log(INFO, "results written to %s", folder)
