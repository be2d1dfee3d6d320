"""Merge inputs: peft LoRA adapter folders and full fine-tuned model folders, read per module.

Every delta is per targeted module, named as peft names it (``bert.encoder.layer.0.attention.
self.query``), in ``nn.Linear`` orientation (d_out, d_in), float32:

- a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``): Δ = s · B A with
  s = alpha / r (alpha / √r with rsLoRA; per-module ``rank_pattern`` / ``alpha_pattern`` as peft
  resolves them), plus this project's ``base_delta.safetensors`` when present (FLoRA,
  FedEx-LoRA: the dense ΔW folded into the base weights, ``base.<module>.weight``, scale
  included), so Δ = ΔW + s · B A;
- a full fine-tuned model folder (``config.json`` + ``model.safetensors`` or a sharded index):
  Δ = W_ft − W_0 against the base model, for the targeted modules only.

Low-rank parts stay factored. The dense parts (ΔW, W_ft − W_0) have no factors, so
:meth:`Source.factors` takes their truncated SVD with ``torch.linalg.svd``: the only place the
merge decomposes an m × n matrix, and only for such sources.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from torch import Tensor

from common.contract import base_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DELTA_FILE = "base_delta.safetensors"  # written beside the adapter by server.results
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
UNSUPPORTED = ("lora_embedding_", "lora_magnitude_vector", ".lora_B.bias")  # not B A deltas

Pair = tuple[Tensor, Tensor]  # (B (m, r), A (r, n))


class SourceError(ValueError):
    """A merge input that cannot be used; the message starts with the source's folder."""

    def __init__(self, source: str | Path, message: str):
        super().__init__(f"{source}: {message}")
        self.source = str(source)


class Weights:
    """Named tensors of a safetensors file or of a model folder (sharded or not), read lazily."""

    def __init__(self, files: dict[str, Path], owner: str | Path):
        self.files, self.owner = files, str(owner)  # tensor name -> file

    @classmethod
    def of_file(cls, path: Path, owner: str | Path) -> Weights:
        """The tensors of one safetensors file; ``owner`` is the source named in errors."""
        try:
            with safe_open(path, framework="pt") as f:
                return cls(dict.fromkeys(f.keys(), path), owner)
        except Exception as exc:  # safetensors' own error type: not a ValueError
            raise SourceError(owner, f"cannot read {path.name}: {exc}") from exc

    @classmethod
    def of_model(cls, folder: Path) -> Weights:
        """A model folder: ``model.safetensors`` or the shards of its index."""
        if (folder / MODEL_INDEX).is_file():
            weight_map = json.loads((folder / MODEL_INDEX).read_text())["weight_map"]
            return cls({k: folder / v for k, v in weight_map.items()}, folder)
        if (folder / MODEL_WEIGHTS).is_file():
            return cls.of_file(folder / MODEL_WEIGHTS, folder)
        raise SourceError(folder, f"no {MODEL_WEIGHTS} or {MODEL_INDEX} (only safetensors "
                          "checkpoints are read: convert pytorch_model.bin with save_pretrained)")

    def resolve(self, name: str) -> str | None:
        """``name`` as stored here, allowing one model prefix more or less, else None.

        A task checkpoint (``BertForSequenceClassification``: ``bert.encoder...``) and a base
        checkpoint (``BertModel``: ``encoder...``) name the same weight differently; this is
        the prefix transformers adds or strips (``base_model_prefix``) when loading.
        """
        if name in self.files:
            return name
        tail = name.partition(".")[2]
        if tail in self.files:
            return tail
        longer = [key for key in self.files if key.partition(".")[2] == name]
        return longer[0] if len(longer) == 1 else None

    def get(self, name: str) -> Tensor:
        """One tensor, read from its file now."""
        key = self._key(name)
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """One tensor's shape, from the file header only."""
        key = self._key(name)
        with safe_open(self.files[key], framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _key(self, name: str) -> str:
        key = self.resolve(name)
        if key is None:
            raise SourceError(self.owner, f"has no tensor {name!r}")
        return key


@dataclass(frozen=True)
class DenseDelta:
    """The part of a source's delta without low-rank factors, read per module on demand."""

    tuned: Weights  # base_delta.safetensors, or the fine-tuned model
    base: Weights | None = None  # full models: W_0, subtracted
    transpose: bool = False  # full models with fan_in_fan_out (GPT-2 Conv1D stores (d_in, d_out))

    def __call__(self, module: str) -> Tensor | None:
        """(d_out, d_in) float32, or None where the source has no dense part for ``module``."""
        if self.base is None:
            key = base_key(module)
            return self.tuned.get(key).float() if key in self.tuned.files else None
        key = f"{module}.weight"
        delta = self.tuned.get(key).float() - self.base.get(key).float()
        return delta.T if self.transpose else delta


@dataclass(frozen=True)
class Source:
    """One merge input: per-module scaled LoRA factors and/or a dense part (module docstring)."""

    name: str  # the folder as given: every error names it
    kind: Literal["adapter", "full"]
    shapes: dict[str, tuple[int, int]]  # module -> (d_out, d_in), in checkpoint order
    lora: dict[str, Pair] = field(default_factory=dict)  # module -> (s · B, A); {} if full
    dense: DenseDelta | None = None
    config: LoraConfig | None = None  # adapters only

    def delta(self, module: str) -> Tensor:
        """The dense (d_out, d_in) float32 delta of one module (TIES, references)."""
        dense = self.dense(module) if self.dense is not None else None
        return self._with_lora(module, torch.zeros(self.shapes[module]) if dense is None
                               else dense)

    def factors(self, dense_rank: int) -> dict[str, Pair]:
        """Module -> (B, A) with B A = Δ; dense parts enter as their rank-``dense_rank`` SVD."""
        out: dict[str, Pair] = {}
        for module in self.shapes:
            dense = self.dense(module) if self.dense is not None else None
            out[module] = self.lora[module] if dense is None else truncate(
                self._with_lora(module, dense), dense_rank)
        return out

    def _with_lora(self, module: str, dense: Tensor) -> Tensor:
        if module not in self.lora:
            return dense
        B, A = self.lora[module]
        return dense + B @ A  # (d_out, d_in)


def truncate(delta: Tensor, rank: int) -> Pair:
    """(U_t diag(S_t), Vh_t): the rank-t truncated SVD of a dense (m, n) delta, t ≤ min(m, n)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (m, p), (p,), (p, n)
    t = min(rank, S.shape[0])
    return (U[:, :t] * S[:t]).contiguous(), Vh[:t].contiguous()


def load_adapter(folder: Path) -> Source:
    """A peft LoRA adapter folder as a :class:`Source` (factors scaled, base_delta attached)."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise SourceError(folder, f"missing {name}: not a saved peft adapter")
    try:
        peft_type = json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type")
        config = LoraConfig.from_pretrained(str(folder)) if peft_type == "LORA" else None
    except (ValueError, TypeError) as exc:  # bad JSON, unknown or ill-typed fields
        raise SourceError(folder, f"cannot read {ADAPTER_CONFIG}: {exc}") from exc
    if config is None:
        raise SourceError(folder, f"peft_type {peft_type!r}: only LoRA adapters can be merged")
    if config.use_dora or config.lora_bias or config.bias != "none":
        raise SourceError(folder, "DoRA, lora_bias and bias != 'none' add terms that are not "
                          "B A: such adapters cannot be merged here")
    weights = Weights.of_file(folder / ADAPTER_WEIGHTS, folder)
    factors: dict[str, dict[str, Tensor]] = {}
    for key in weights.files:
        if any(bad in key for bad in UNSUPPORTED):
            raise SourceError(folder, f"tensor {key!r} is not a Linear LoRA factor: "
                              "embedding LoRA, DoRA and LoRA biases are not supported")
        match = LORA_KEY.match(key)
        if match:  # anything else is a modules_to_save head: task-specific, not merged
            factors.setdefault(match["module"], {})[match["factor"]] = weights.get(key).float()
    if not factors:
        raise SourceError(folder, f"{ADAPTER_WEIGHTS} holds no LoRA factors")
    lora = {module: _scaled(folder, config, module, parts) for module, parts in factors.items()}
    dense = None
    if (folder / BASE_DELTA_FILE).is_file():
        dense = DenseDelta(Weights.of_file(folder / BASE_DELTA_FILE, folder))
        for key in dense.tuned.files:
            module = key.removeprefix("base.").removesuffix(".weight")
            if module not in lora or dense.tuned.shape(key) != (lora[module][0].shape[0],
                                                                lora[module][1].shape[1]):
                raise SourceError(folder, f"{BASE_DELTA_FILE}: {key!r} matches no LoRA module "
                                  "of the same (d_out, d_in)")
    shapes = {module: (B.shape[0], A.shape[1]) for module, (B, A) in lora.items()}
    return Source(str(folder), "adapter", shapes, lora, dense, config)


def _scaled(folder: Path, config: LoraConfig, module: str, parts: dict[str, Tensor]) -> Pair:
    """(s · B, A) of one module, with peft's per-module rank and alpha; shapes checked."""
    if set(parts) != {"A", "B"}:
        raise SourceError(folder, f"module {module!r} has lora_{''.join(parts)} only")
    B, A = parts["B"], parts["A"]
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise SourceError(folder, f"module {module!r}: lora_B {tuple(B.shape)} and lora_A "
                          f"{tuple(A.shape)} are not (d_out, r) and (r, d_in)")
    r, scale = lora_scale(config, module)
    if A.shape[0] != r:
        raise SourceError(folder, f"module {module!r} has rank {A.shape[0]} but its config "
                          f"says r = {r}")
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise SourceError(folder, f"module {module!r} holds NaN or inf")
    return B * scale, A


def lora_scale(config: LoraConfig, module: str) -> tuple[int, float]:
    """(r, s) of ``module`` as peft resolves them: s = alpha / r, or alpha / √r with rsLoRA.

    Per-module ``rank_pattern`` / ``alpha_pattern`` entries override ``r`` / ``lora_alpha``.
    """
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module),
                                     config.lora_alpha)
    return r, alpha / r**0.5 if config.use_rslora else alpha / r


def load_full(folder: Path, base: Path, modules: list[str], fan_in_fan_out: bool) -> Source:
    """A full fine-tuned model folder as a :class:`Source`: W_ft − W_0 on ``modules``."""
    tuned, base_weights = Weights.of_model(folder), Weights.of_model(base)
    shapes = {}
    for module in modules:
        key = f"{module}.weight"
        if tuned.resolve(key) is None:
            raise SourceError(folder, f"has no tensor {key!r}: not a fine-tune of the same "
                              "architecture")
        shape, expected = tuned.shape(key), base_weights.shape(key)
        if shape != expected or len(shape) != 2:
            raise SourceError(folder, f"{key!r} has shape {shape}, the base {base} {expected}")
        shapes[module] = tuple(reversed(shape)) if fan_in_fan_out else shape
    return Source(str(folder), "full", shapes, {}, DenseDelta(tuned, base_weights,
                                                              fan_in_fan_out))
