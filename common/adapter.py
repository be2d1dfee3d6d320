"""Explicit names for the adapter's tensors: LoRA pairs (A, B) and the classification head.

The layout is read once from a peft model by module type (``LoraLayer``,
``ModulesToSaveWrapper``), never by slicing state-dict names. Array names follow
:mod:`common.contract`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from common.contract import Factor, head_key, lora_key


@dataclass(frozen=True)
class LoraPair:
    """One LoRA layer: W = W0 + s · B A with A (r, d_in), B (d_out, r), s = alpha / r."""

    module: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter

    def factor(self, name: Factor) -> torch.nn.Parameter:
        """Return A or B by name."""
        return self.A if name == "A" else self.B


@dataclass(frozen=True)
class AdapterLayout:
    """All adapter tensors of one peft model, addressable by their message array names."""

    pairs: tuple[LoraPair, ...]
    head: Mapping[str, torch.nn.Parameter]  # array name -> parameter

    @classmethod
    def from_model(cls, model: PeftModel) -> AdapterLayout:
        """Read the LoRA pairs and head parameters of the active adapter of ``model``."""
        adapter = model.active_adapter
        pairs: list[LoraPair] = []
        head: dict[str, torch.nn.Parameter] = {}
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                pairs.append(
                    LoraPair(name, module.lora_A[adapter].weight, module.lora_B[adapter].weight)
                )
            elif isinstance(module, ModulesToSaveWrapper):
                for pname, param in module.modules_to_save[adapter].named_parameters():
                    head[head_key(f"{name}.{pname}")] = param
        if not pairs:
            raise ValueError("the model has no LoRA layers: check lora.target-modules")
        return cls(tuple(pairs), head)

    @property
    def modules(self) -> list[str]:
        """LoRA module names, in model order."""
        return [p.module for p in self.pairs]

    def tensors(self, factors: Iterable[Factor] = ("A", "B"), head: bool = True) -> dict:
        """Detached CPU copies of the chosen tensors, keyed by array name."""
        factors = tuple(factors)
        out: dict[str, torch.Tensor] = {}
        for pair in self.pairs:
            for f in factors:
                out[lora_key(pair.module, f)] = pair.factor(f).detach().cpu().clone()
        if head:
            out.update({k: p.detach().cpu().clone() for k, p in self.head.items()})
        return out

    def all_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every adapter parameter keyed by array name."""
        params = {lora_key(p.module, f): p.factor(f) for p in self.pairs for f in ("A", "B")}
        params.update(self.head)
        return params

    @torch.no_grad()
    def load(self, arrays: Mapping[str, torch.Tensor]) -> None:
        """Copy every adapter tensor from ``arrays``; raise on a missing key or a shape mismatch."""
        params = self.all_parameters()
        missing = sorted(set(params) - set(arrays))
        if missing:
            raise KeyError(f"global arrays lack {len(missing)} adapter tensors, e.g. {missing[0]}")
        for key, param in params.items():
            value = torch.as_tensor(arrays[key])
            if value.shape != param.shape:
                raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(value.to(dtype=param.dtype, device=param.device))

    def set_trainable(self, model: torch.nn.Module, factors: Iterable[Factor],
                      train_head: bool) -> list[torch.nn.Parameter]:
        """Freeze every parameter of ``model`` except the chosen factors (and the head)."""
        for param in model.parameters():
            param.requires_grad_(False)
        trainable = [pair.factor(f) for pair in self.pairs for f in factors]
        if train_head:
            trainable += list(self.head.values())
        for param in trainable:
            param.requires_grad_(True)
        return trainable
