"""A model folder checked against the run before any weight is read: config.json and lora.r.

:func:`check_model` reads the folder's ``config.json`` with transformers' ``AutoConfig`` (which
checks each field's type), builds the model it describes on the meta device (shapes only, no
weights and no memory: about 0.1 s for MiniLM) and finds the modules that LoRA will adapt, as
peft matches ``lora.target-modules``. The update ΔW = B A of a d_out × d_in weight has rank at
most min(d_out, d_in), so a ``lora.r`` above the smallest such side of any target module only
adds parameters (and DP noise on them) and makes r × r cores the weight cannot fill: refused.
Everything refused is a :class:`~common.config.ConfigError` naming ``model.path`` and the file,
or ``lora.r`` / ``lora.target-modules``. A hub id is first resolved to its snapshot folder
(:func:`common.model_path.hub_snapshot`: fetched online, else the cache), or refused naming the
id and the cache folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoConfig

from common.config import ConfigError, LoraSettings, ModelConfig
from common.model_path import resolve_model_path
from common.quiet import quiet_model_loading
from common.tasks import TASKS

# What transformers raises for a config.json it cannot use (StrictDataclassError: a field of
# the wrong type, or fields that contradict each other)
UNUSABLE = (ValueError, TypeError, KeyError, AttributeError, OSError, StrictDataclassError)
SHOWN_MODULES = 12  # module names quoted when no module matches lora.target-modules


def check_model(model_cfg: ModelConfig, lora_cfg: LoraSettings) -> Path:
    """Refuse a model folder transformers cannot build, or a LoRA it cannot take; the folder.

    Raise :class:`ConfigError` when ``config.json`` is unusable (the file and transformers'
    reason, which names the field), when no module matches ``lora.target-modules``, or when
    ``lora.r`` exceeds the smaller side of a target module's weight.
    """
    folder = resolve_model_path(model_cfg)
    where = f"model.path={model_cfg.path!r} ({folder / 'config.json'})"
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with quiet_model_loading(), torch.device("meta"):
            skeleton = TASKS[model_cfg.task].model_class.from_config(config)
    except UNUSABLE as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError([f"{where}: not a config transformers can build a model from "
                           f"({type(exc).__name__}: {reason}); fix the file, or set model.path "
                           "to another model folder"]) from None
    sides = target_sides(skeleton, lora_cfg)
    targets = ",".join(lora_cfg.target_modules)
    if not sides:
        names = sorted({name.rpartition(".")[2] for name, module in skeleton.named_modules()
                        if _weight_shape(module)})
        shown = ", ".join(names[:SHOWN_MODULES]) + (", ..." if names[SHOWN_MODULES:] else "")
        raise ConfigError([f"lora.target-modules={targets!r}: no module with a weight matrix "
                           f"in the model of {where} is named so (its modules with one: "
                           f"{shown})"])
    name, shape = min(sides.items(), key=lambda item: min(item[1]))
    if lora_cfg.r > min(shape):
        raise ConfigError([f"lora.r={lora_cfg.r}: above {min(shape)}, the smaller side of the "
                           f"weight ({shape[0]} × {shape[1]}) of the target module {name!r} of "
                           f"{where}; ΔW = B A of that weight has rank at most {min(shape)}: "
                           f"set lora.r <= {min(shape)}"])
    return folder


def target_sides(model: torch.nn.Module, lora_cfg: LoraSettings) -> dict[str, tuple[int, int]]:
    """The weight shape of each module of ``model`` that peft would adapt, by module name."""
    peft_config = LoraConfig(r=lora_cfg.r, target_modules=list(lora_cfg.target_modules))
    return {name: shape for name, module in model.named_modules()
            if (shape := _weight_shape(module)) and check_target_module_exists(peft_config, name)}


def _weight_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """The first two sides of the module's own weight (a matrix or a convolution), or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    return int(weight.shape[0]), int(weight.shape[1])
