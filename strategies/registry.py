"""Build the strategy that ``strategy.name`` names, from the table of :mod:`common.methods`."""

from __future__ import annotations

import importlib

import torch

from common.adapter import AdapterLayout
from common.config import AppConfig
from common.methods import METHODS
from common.schema import RoundTrainingMetrics
from strategies.base import LoraStrategy
from strategies.broadcast import ChangesBroadcast, FullBroadcast
from strategies.sampling import PartitionSampler
from strategies.server_optimizer import ServerOptimizer


def strategy_class(name: str) -> type[LoraStrategy]:
    """The :class:`LoraStrategy` subclass of method ``name`` (``"module:Class"`` in the table)."""
    module, _, attr = METHODS[name].strategy.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, LoraStrategy)):
        raise TypeError(f"method {name!r}: {METHODS[name].strategy} is not a LoraStrategy")
    return cls


def build_strategy(cfg: AppConfig, layout: AdapterLayout, *,
                   training_metrics: RoundTrainingMetrics | None = None,
                   device: torch.device | str = "cpu") -> LoraStrategy:
    """The strategy named by ``strategy.name``, for the LoRA layers of ``layout``.

    Its own settings come from its :class:`common.methods.Method`; the reply screen, the
    aggregation and client sampling are the same for every method. It records each round's
    training columns into ``training_metrics`` (None: a new one, ``strategy.training_metrics``)
    and merges on ``device``.
    """
    s = cfg.strategy
    return strategy_class(s.name)(
        layout.modules, **METHODS[s.name].settings(cfg, layout.scale),
        train_head=cfg.lora.train_head,
        round_timeout=s.round_timeout, short_round=s.short_round, max_norm_ratio=s.max_norm_ratio,
        # The direction and erase screens rest on DP noise: it makes honest updates nearly
        # orthogonal (cosine ~ 1/√d). Without it, honest clients may disagree in earnest.
        min_update_cosine=s.min_update_cosine if cfg.privacy.is_private else -1.0,
        max_weight_ratio=s.max_weight_ratio, bound_updates=s.bound_updates,
        private=cfg.privacy.is_private,
        aggregation=s.aggregation, trim_fraction=s.trim_fraction, num_malicious=s.num_malicious,
        stop_on_failed_round=s.stop_on_failed_round,
        sampler=(PartitionSampler(cfg.seed, timeout=s.round_timeout)
                 if s.client_sampling == "seeded" else None),
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes, min_available_nodes=s.min_train_nodes,
        min_evaluate_nodes=1 if s.fraction_evaluate else 0, training_metrics=training_metrics,
        device=device,
        broadcast=(ChangesBroadcast(layout.modules) if s.broadcast == "changes"
                   else FullBroadcast()),
        server_optimizer=ServerOptimizer(s.server_optimizer, s.server_learning_rate,
                                         s.server_momentum, s.server_beta2, s.server_tau),
    )
