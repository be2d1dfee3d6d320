"""Build the frozen pretrained model with peft LoRA adapters from a local folder.

A hub id in ``model.path`` is resolved to its snapshot folder in the Hugging Face cache first
(:func:`common.model_path.resolve_model_path`); transformers then reads that folder only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.config import LoraSettings, ModelConfig
from common.model_path import resolve_model_path
from common.precision import keep_float32
from common.quiet import quiet_model_loading
from common.singular_values import install_singular_values
from common.tasks import TASKS


def load_tokenizer(cfg: ModelConfig, folder: Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored beside the model weights (from the resolved local folder).

    ``folder``: that folder, where the caller has resolved it already (None: resolve ``cfg``).
    A causal LM pads (right) with its end-of-sequence token when it has no padding token:
    padding is masked out of attention and of the loss.
    """
    folder = resolve_model_path(cfg) if folder is None else folder
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not cfg.task_kind.is_classification:  # a decoder
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraSettings,
    *,
    num_labels: int,
    seed: int,
    device: torch.device | str = "cpu",
    svd_form: bool = False,
) -> PeftModel:
    """The pretrained model of ``model_cfg.task`` + LoRA on ``lora_cfg.target_modules``.

    Classification adds a new head (a peft ``modules_to_save`` module, so it is part of the
    saved adapter; whether it trains is decided later by the caller); a causal LM adds none
    (:mod:`common.tasks`). The weights are read from the resolved local folder only
    (``local_files_only``; a hub id is fetched into its cache by ``resolve_model_path``). Every
    base weight is frozen. ``seed`` makes the head and A initialisation identical on every node.
    The model is moved to ``device`` *before* ``get_peft_model`` (Opacus #820: otherwise LoRA
    weights can silently never change).
    With ``svd_form`` every LoRA layer computes W0 + s · B diag(σ) A with a σ (r,) of its own
    (:func:`common.singular_values.install_singular_values`; the ``merge-sv`` strategy).
    Every module that can train (LoRA A, B, σ and the head) is a float32 island under bfloat16
    autocast (:func:`common.precision.keep_float32`).
    """
    torch.manual_seed(seed)
    task = TASKS[model_cfg.task]
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        modules_to_save=task.head_modules,
        task_type=task.peft_task_type,
    )
    with quiet_model_loading():
        base = task.load_model(resolve_model_path(model_cfg), num_labels=num_labels).to(device)
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
