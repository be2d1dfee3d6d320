"""What computed a run: the resolved precision, the device, the CPU and the package versions.

``model.compute-dtype = "auto"`` resolves to bfloat16 on a host that computes it natively
(:mod:`common.precision`) and to float32 elsewhere, so the run config alone does not say how a
result was computed: two cells of one sweep, resumed on two hosts, can differ in precision.
A run therefore writes ``environment.json`` (:data:`common.schema.ENVIRONMENT_FILE`) beside its
``config.json``, and a sweep's record keeps it with the cell.

It describes the server's process. In a simulation the ClientApps run on the same host with the
same settings, so it describes them too; in a deployment each node resolves its own precision
(its log says which).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from common.precision import native_bfloat16

PACKAGES = ("torch", "transformers", "peft", "opacus", "flwr")


def run_environment(compute_dtype: torch.dtype, device: torch.device | str,
                    model_commit: str = "") -> dict[str, object]:
    """The facts of this process that can change a run's numbers or its speed.

    ``compute-dtype`` is the frozen encoder's resolved dtype (``"float32"`` or ``"bfloat16"``),
    ``native-bfloat16`` whether ``device`` computes bfloat16 in hardware, ``cpu`` the CPU's model
    name (``/proc/cpuinfo``; the platform's processor string elsewhere), ``cpu-cores`` the cores
    this process may use. ``model-commit`` (a hub model only): the commit its ``model.path`` and
    ``model.revision`` resolved to here, which a branch or tag does not pin.
    """
    return {
        **({"model-commit": model_commit} if model_commit else {}),
        "compute-dtype": str(compute_dtype).removeprefix("torch."),
        "device": str(torch.device(device)),
        "native-bfloat16": native_bfloat16(device),
        "cpu": cpu_model(),
        "cpu-cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch-threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first ``model name`` of ``cpuinfo``, else ``platform.processor()`` (may be "")."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
