"""Build the frozen pretrained encoder with peft LoRA adapters, strictly offline."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from common.config import LoraSettings, ModelConfig
from common.model_path import resolve_model_path
from common.precision import keep_float32
from common.quiet import quiet_model_loading
from common.singular_values import install_singular_values

HEAD_MODULES = ["classifier"]  # the newly initialised sequence-classification head


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored beside the model weights (from disk only, never a hub)."""
    return AutoTokenizer.from_pretrained(resolve_model_path(cfg), local_files_only=True)


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraSettings,
    *,
    num_labels: int,
    seed: int,
    device: torch.device | str = "cpu",
    svd_form: bool = False,
) -> PeftModel:
    """Pretrained encoder + LoRA on ``lora_cfg.target_modules`` + a new classification head.

    The weights are read from disk only (``local_files_only``: nothing is ever downloaded).
    Every base weight is frozen. The head is a peft ``modules_to_save`` module, so it is part of
    the saved adapter; whether it trains is decided later by the caller. ``seed`` makes the head
    and A initialisation identical on every node. The model is moved to ``device`` *before*
    ``get_peft_model`` (Opacus #820: otherwise LoRA weights can silently never change).
    With ``svd_form`` every LoRA layer computes W0 + s · B diag(σ) A with a σ (r,) of its own
    (:func:`common.singular_values.install_singular_values`; the ``merge-sv`` strategy).
    Every module that can train (LoRA A, B, σ and the head) is a float32 island under bfloat16
    autocast (:func:`common.precision.keep_float32`).
    """
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        modules_to_save=HEAD_MODULES,
    )
    with quiet_model_loading():
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(model_cfg), num_labels=num_labels, local_files_only=True,
            ignore_mismatched_sizes=True,  # a local checkpoint's own head is replaced by a new one
        ).to(device)
        model = get_peft_model(base, config)
    if svd_form:
        install_singular_values(model)
    keep_float32(trainable_modules(model))
    return model


def trainable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose parameters may train: every lora_A, lora_B and the head."""
    found: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            found += [*module.lora_A.values(), *module.lora_B.values()]
        elif isinstance(module, ModulesToSaveWrapper):
            found += list(module.modules_to_save.values())
    return found


def train_mode(model: torch.nn.Module, *, encoder_dropout: bool) -> None:
    """Training mode for the adapter; the frozen encoder's own dropout only if asked.

    ``model.train()`` turns on every dropout of the pretrained encoder (hidden and attention,
    0.1 in BERT) besides LoRA's own ``lora.dropout``. Without ``encoder_dropout`` every module
    but the trainable ones (Opacus captures activations only in training mode) and LoRA's
    dropout is put back in eval mode, as DP fine-tuning usually runs: the frozen encoder then
    computes what it computes at evaluation, and a step skips its random masks (about a fifth of
    a MiniLM step on 2 CPU cores, ``benchmarks/dp_step_bench.py``).
    """
    model.train()
    if encoder_dropout:
        return
    keep = {id(m) for m in trainable_modules(model)}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            keep |= {id(m) for d in module.lora_dropout.values() for m in d.modules()}
    for module in model.modules():
        if id(module) not in keep:
            module.training = False
