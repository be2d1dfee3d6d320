"""The federated methods: one table from ``strategy.name`` to everything the code needs of it.

Adding a method is one file in ``strategies/`` (a :class:`strategies.base.LoraStrategy`
subclass, whose ``train_factors`` names the LoRA factors its clients train each round) and one
:class:`Method` line in :data:`METHODS`. The config validator (:mod:`common.config`), the
ServerApp and the diagnostics (:func:`strategies.registry.build_strategy`), the sweep and its
reports read this table and nothing else.

The strategy class is named as ``"module:Class"`` (as Flower names its apps) rather than
imported, so that this table stays in ``common/``, below the strategies that implement it: the
typed config validates ``strategy.name`` without importing any server code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class RunSettings(Protocol):
    """What a method's settings read of the typed config (:class:`common.config.AppConfig`).

    A protocol, so that this table does not import the config that validates names with it.
    """

    seed: int
    strategy: Any  # common.config.StrategyConfig


def _no_settings(cfg: RunSettings, lora_scale: float) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One federated method.

    Attributes
    ----------
    name : the value of ``strategy.name``.
    label : how tables and plots name it.
    strategy : ``"module:Class"`` of its :class:`strategies.base.LoraStrategy` subclass.
    settings : the constructor arguments only this method has, from the typed config and the
        LoRA scale s = alpha / r (the shared ones, screening and sampling, are built by
        :func:`strategies.registry.build_strategy` for every method).
    from_scratch : trains a fresh adapter (B = 0); False: adapts a merged one (merge-sv).
    needs_products : the server folds every client's B_k A_k into the base weights, which
        only the weighted mean over replies defines (no robust aggregation).
    svd_form : LoRA layers compute W0 + s · B diag(σ) A with σ trained alone
        (:func:`common.model.build_model`); needs ``strategy.merged-adapter``.
    """

    name: str
    label: str
    strategy: str
    settings: Callable[[RunSettings, float], Mapping[str, Any]] = field(default=_no_settings)
    from_scratch: bool = True
    needs_products: bool = False
    svd_form: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedsvd", "FedSVD", "strategies.fedsvd:FedSVD",
           settings=lambda cfg, scale: {"svd_period": cfg.strategy.svd_period}),
    Method("ffa", "FFA-LoRA", "strategies.ffa:FFALoRA"),
    Method("fedavg", "FedAvg-LoRA", "strategies.fedavg_lora:FedAvgLoRA"),
    Method("flora", "FLoRA", "strategies.flora:FLoRA", needs_products=True,
           settings=lambda cfg, scale: {"lora_scale": scale, "seed": cfg.seed}),
    Method("fedex", "FedEx-LoRA", "strategies.fedex:FedExLoRA", needs_products=True,
           settings=lambda cfg, scale: {"lora_scale": scale}),
    Method("rolora", "RoLoRA", "strategies.rolora:RoLoRA"),
    Method("merge-sv", "merge-sv", "strategies.merge_sv:MergeSV", from_scratch=False,
           svd_form=True, settings=lambda cfg, scale: {"sv_rounds": cfg.strategy.sv_rounds,
                                                       "svd_period": cfg.strategy.svd_period}),
)}
METHOD_NAMES = tuple(METHODS)  # the docs' order: tables and plots list methods so
FROM_SCRATCH = tuple(name for name, m in METHODS.items() if m.from_scratch)  # the sweep's default


def method_order(names) -> list[str]:
    """The distinct ``names`` in :data:`METHODS` order, unknown names last (alphabetically)."""
    return sorted(set(names), key=lambda m: (METHOD_NAMES.index(m) if m in METHODS
                                             else len(METHOD_NAMES), m))
