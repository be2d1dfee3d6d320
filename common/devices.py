"""Where a process computes: ``model.device`` = ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

Every process resolves the setting for itself: the server for its evaluation and the
strategies' kernels, each ClientApp for its local training. ``auto`` is CUDA on a node that has
a GPU and the CPU elsewhere, so one run can mix them; ``cuda`` is refused where there is no GPU
(:func:`resolve_device` raises, naming the key), rather than silently running on the CPU.
Nothing else depends on the device: Poisson sampling draws on the CPU generator and the DP
noise on the parameters' device, both reseeded from the OS every round
(:func:`client.training.seed_local_randomness`: ``torch.seed`` seeds every device).
"""

from __future__ import annotations

import torch

from common.config import DEVICES


def cuda_available() -> bool:
    """Whether this process sees a CUDA device."""
    return torch.cuda.is_available()


def resolve_device(setting: str) -> torch.device:
    """The device ``model.device = setting`` means in this process.

    Raise ``ValueError`` for an unknown setting or for ``cuda`` without a CUDA device.
    """
    if setting not in DEVICES:
        raise ValueError(f"model.device={setting!r}: one of {DEVICES}")
    if setting == "cuda" and not cuda_available():
        raise ValueError("model.device='cuda': this process sees no CUDA device "
                         "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    if setting == "cpu" or not cuda_available():
        return torch.device("cpu")
    return torch.device("cuda")
