"""Mixed precision for the frozen encoder: bfloat16 autocast where the hardware has it natively.

``model.compute-dtype`` = ``auto`` (bfloat16 where the device computes it natively: a CPU with
AVX-512 BF16 or AMX, a CUDA GPU that supports it; float32 elsewhere), ``float32`` or
``bfloat16``. Under bfloat16 the frozen encoder's matrix products run in bfloat16 under
``torch.autocast``, while every module that trains (LoRA A and B, the σ of the SVD form, the
head) is a *float32 island* (:func:`keep_float32`): autocast is off inside it and its inputs are
cast to float32. So its activations, the gradients flowing into its output, its per-sample
gradients (Opacus), their clipping, the DP noise and the accounting are all float32; only the
frozen path the gradient travels through to reach earlier layers is bfloat16.

On a CPU without native bfloat16 (AVX2 only) torch emulates it about 100 times slower than
float32, which is why ``auto`` checks the hardware instead of assuming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from common.config import COMPUTE_DTYPES

_SAVED_STATE = "_float32_island_autocast"  # the autocast state a pre-hook turned off


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware.

    CPU: AVX-512 BF16 or AMX tiles (``torch.cpu``'s own checks); CUDA: the GPU supports it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_compute_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the frozen encoder's products for ``model.compute-dtype`` on ``device``."""
    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute-dtype={setting!r}: one of {COMPUTE_DTYPES}")
    if setting == "bfloat16" or (setting == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return torch.float32


def emulation_warning(setting: str, device: torch.device | str) -> str | None:
    """Why ``model.compute-dtype = setting`` will be slow on ``device``, or None.

    Only a pinned ``bfloat16`` on a device without native bfloat16 is: torch emulates it about
    100 times slower than float32 (``auto`` would pick float32 there).
    """
    if setting != "bfloat16" or native_bfloat16(device):
        return None
    return (f"model.compute-dtype=bfloat16 on {torch.device(device)}, which has no native "
            "bfloat16: it is emulated, about 100x slower than float32; \"auto\" picks float32 "
            "here")


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keep_float32(modules: Iterable[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
    """Make each module a float32 island inside autocast; return the hook handles.

    A forward pre-hook turns autocast off for the module's device type and casts its floating
    inputs to float32; a forward hook restores the previous autocast state. Hooks registered
    later (Opacus' activation capture) see the float32 inputs. Outside autocast the hooks change
    nothing but the dtype of non-float32 inputs.
    """
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(_enter_float32))
        handles.append(module.register_forward_hook(_leave_float32, always_call=True))
    return handles


def _device_type(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return "cpu" if param is None else param.device.type


def _enter_float32(module: nn.Module, args: tuple) -> tuple:
    device_type = _device_type(module)
    setattr(module, _SAVED_STATE, torch.is_autocast_enabled(device_type))
    torch.set_autocast_enabled(device_type, False)
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _leave_float32(module: nn.Module, args: tuple, output: object) -> None:
    torch.set_autocast_enabled(_device_type(module), getattr(module, _SAVED_STATE, False))

