"""Explicit names for the adapter's tensors: LoRA pairs (A, B) and the classification head.

The layout is read once from a peft model by module type (``LoraLayer``,
``ModulesToSaveWrapper``, :class:`~common.singular_values.SingularValueLinear`), never by
slicing state-dict names. Array names follow
:mod:`common.contract`. Besides A, B and the head, :meth:`AdapterLayout.load` applies the
optional base-weight residuals ΔW (``contract.base_key``) of FLoRA and FedEx-LoRA on top of the
pretrained weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from common.contract import Factor, base_key, head_key, lora_key
from common.singular_values import SingularValueLinear


@dataclass(frozen=True)
class LoraPair:
    """One LoRA layer: W = W0 + s · B A with A (r, d_in), B (d_out, r), s = alpha / r.

    ``W`` is the frozen base weight (``<module>.base_layer.weight``), (d_out, d_in) like
    ``nn.Linear.weight``, or (d_in, d_out) when ``fan_in_fan_out`` (GPT-2's ``Conv1D``).
    ``S`` (r,) is set for a layer in SVD form (:mod:`common.singular_values`):
    W = W0 + s · B diag(S) A.
    """

    module: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    W: torch.nn.Parameter
    scale: float
    fan_in_fan_out: bool = False
    S: torch.nn.Parameter | None = None

    @property
    def factor_names(self) -> tuple[Factor, ...]:
        """The factors this layer has: A, B, and S in SVD form."""
        return ("A", "B") if self.S is None else ("A", "B", "S")

    def factor(self, name: Factor) -> torch.nn.Parameter:
        """Return A, B or S by name; raise if the layer has no such factor."""
        param = {"A": self.A, "B": self.B, "S": self.S}.get(name)
        if param is None:
            raise ValueError(f"LoRA layer {self.module!r} has no factor {name!r} (it has "
                             f"{', '.join(self.factor_names)})")
        return param


@dataclass(frozen=True)
class AdapterLayout:
    """All adapter tensors of one peft model, addressable by their message array names."""

    pairs: tuple[LoraPair, ...]
    head: Mapping[str, torch.nn.Parameter]  # array name -> parameter
    # module -> its pretrained W0, copied the first time a base residual is applied to it
    pretrained: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_model(cls, model: PeftModel) -> AdapterLayout:
        """Read the LoRA pairs and head parameters of the active adapter of ``model``."""
        adapter = model.active_adapter
        pairs: list[LoraPair] = []
        head: dict[str, torch.nn.Parameter] = {}
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                lora_A = module.lora_A[adapter]
                pairs.append(LoraPair(
                    name, lora_A.weight, module.lora_B[adapter].weight,
                    module.get_base_layer().weight, float(module.scaling[adapter]),
                    bool(getattr(module, "fan_in_fan_out", False)),
                    lora_A.singular_values if isinstance(lora_A, SingularValueLinear) else None,
                ))
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

    @property
    def scale(self) -> float:
        """The LoRA scale s (alpha / r) shared by every layer; raise if the layers differ."""
        scales = {p.scale for p in self.pairs}
        if len(scales) != 1:
            raise ValueError(f"the LoRA layers have different scales {sorted(scales)}: "
                             "rank or alpha patterns are not supported")
        return scales.pop()

    def tensors(self, factors: Iterable[Factor] | None = None, head: bool = True) -> dict:
        """Detached CPU copies of the chosen factors (default: all) and the head, by array name."""
        chosen = None if factors is None else tuple(factors)
        out: dict[str, torch.Tensor] = {}
        for pair in self.pairs:
            for f in pair.factor_names if chosen is None else chosen:
                out[lora_key(pair.module, f)] = pair.factor(f).detach().cpu().clone()
        if head:
            out.update({k: p.detach().cpu().clone() for k, p in self.head.items()})
        return out

    def all_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every adapter parameter keyed by array name."""
        params = {lora_key(p.module, f): p.factor(f) for p in self.pairs for f in p.factor_names}
        params.update(self.head)
        return params

    @torch.no_grad()
    def load(self, arrays: Mapping[str, torch.Tensor]) -> None:
        """Copy every adapter tensor from ``arrays``; raise on a missing key or a shape mismatch.

        Each LoRA layer's base weight becomes W0 + ΔW, ΔW = ``arrays[base_key(module)]`` (absent:
        0). W0 is the pretrained weight, kept from the first load that changed it, so loading
        again (the server does every round) replaces ΔW instead of adding it twice.
        """
        params = self.all_parameters()
        missing = sorted(set(params) - set(arrays))
        if missing:
            raise KeyError(f"global arrays lack {len(missing)} adapter tensors, e.g. {missing[0]}")
        for key, param in params.items():
            _copy_checked(key, param, torch.as_tensor(arrays[key]))
        self.load_base(arrays)

    @torch.no_grad()
    def load_base(self, arrays: Mapping[str, torch.Tensor]) -> None:
        """Set every LoRA layer's base weight to W0 + ``arrays[base_key(module)]`` (absent: W0)."""
        for pair in self.pairs:
            self._load_base(pair, arrays.get(base_key(pair.module)))

    def _load_base(self, pair: LoraPair, delta: torch.Tensor | None) -> None:
        """W ← W0 + ΔW, ΔW (d_out, d_in) (transposed for ``fan_in_fan_out``), added in float32."""
        if delta is None:
            if pair.module in self.pretrained:
                pair.W.copy_(self.pretrained[pair.module])
            return
        delta = torch.as_tensor(delta)
        expected = (pair.B.shape[0], pair.A.shape[1])
        if tuple(delta.shape) != expected:
            raise ValueError(f"array {base_key(pair.module)!r} has shape {tuple(delta.shape)}, "
                             f"expected {expected} (d_out, d_in)")
        w0 = self.pretrained.setdefault(pair.module, pair.W.detach().clone())
        delta = delta.to(device=w0.device, dtype=torch.float32)
        pair.W.copy_(w0.float() + (delta.T if pair.fan_in_fan_out else delta))

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


def _copy_checked(key: str, param: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape != param.shape:
        raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.copy_(value.to(dtype=param.dtype, device=param.device))
