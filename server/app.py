"""Flower ServerApp: FedSVD over DP-SGD clients, with global evaluation and saved results."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.adapter import AdapterLayout
from common.config import AppConfig, StrategyConfig, check_delta
from common.data import encode, eval_subset, load_corpus
from common.model import build_model, load_tokenizer
from server.evaluation import GlobalEvaluator
from server.results import save_run
from strategies import FedSVD

app = ServerApp()


def build_strategy(cfg: StrategyConfig, lora_modules: list[str], *, train_head: bool) -> FedSVD:
    """The configured strategy; ``train_head``: whether client replies carry the head."""
    return FedSVD(
        lora_modules, svd_period=cfg.svd_period, train_head=train_head,
        min_valid_replies=cfg.min_valid_replies, max_norm_ratio=cfg.max_norm_ratio,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate, min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=1 if cfg.fraction_evaluate else 0,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Initial adapter (B = 0, A = peft init) → strategy rounds → results folder."""
    cfg = AppConfig.from_run_config(context.run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    if cfg.privacy.is_private:  # before any training; each client checks its own partition
        check_delta(cfg.privacy.delta, len(corpus.train), "the whole training split")
    model = build_model(cfg.model, cfg.lora, num_labels=corpus.num_labels, seed=cfg.seed)
    layout = AdapterLayout.from_model(model)
    tokenizer = load_tokenizer(cfg.model)
    full_test = encode(corpus.test, tokenizer, cfg.model.max_length)
    subset = encode(eval_subset(corpus.test, cfg.data.max_eval_examples, cfg.seed), tokenizer,
                    cfg.model.max_length)
    strategy = build_strategy(cfg.strategy, layout.modules, train_head=cfg.lora.train_head)
    evaluator = GlobalEvaluator(model, layout, subset=subset, full=full_test,
                                final_round=cfg.strategy.num_rounds, strategy=strategy)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(torch_state_dict=layout.tensors()),
        num_rounds=cfg.strategy.num_rounds, train_config=ConfigRecord(),
        evaluate_fn=evaluator,
    )
    folder = Path(cfg.output.dir).expanduser().resolve() / cfg.run_name
    save_run(folder, cfg, evaluator.rows, model=model, layout=layout,
             arrays=result.arrays or ArrayRecord(torch_state_dict=layout.tensors()))
    log(INFO, "results written to %s", folder)
