"""Importing any module of the project changes nothing global: only entry points may."""

import subprocess
import sys

from tests.conftest import ROOT

THIRD_PARTY = ["torch", "torch._dynamo", "transformers", "peft", "flwr.app",
               "flwr.clientapp", "flwr.serverapp", "flwr_datasets", "datasets", "sklearn",
               "scipy.stats", "pandas", "matplotlib", "safetensors"]
PACKAGES = ["kernels", "common", "privacy", "merging", "strategies", "client", "server",
            "deploy", "simulations", "benchmarks"]

SCRIPT = """
import importlib, logging, os, pkgutil, sys, warnings
# What the libraries do when imported is not ours to judge: import them first. Not opacus:
# its import adds a root log handler, which importing privacy/ must take back.
for library in THIRD_PARTY:
    importlib.import_module(library)
from transformers.utils import logging as hf_logging

def snapshot():
    root = logging.getLogger()
    return {"root handlers": list(root.handlers), "root level": root.level,
            "logging.disable": logging.root.manager.disable,
            "warning filters": list(warnings.filters), "environment": dict(os.environ),
            "transformers verbosity": hf_logging.get_verbosity(),
            "transformers progress bars": hf_logging.is_progress_bar_enabled()}

before = snapshot()
names = []
for package in PACKAGES:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
            names.append(info.name)
after = snapshot()
changed = [key for key in before if before[key] != after[key]]
if "environment" in changed:
    print({k: v for k, v in after["environment"].items() if before["environment"].get(k) != v})
if "warning filters" in changed:
    print([f for f in after["warning filters"] if f not in before["warning filters"]])
print(len(names), "modules imported")
if changed:
    sys.exit("changed on import: " + ", ".join(changed))
"""


def test_importing_every_module_changes_no_global_state():
    code = f"PACKAGES = {PACKAGES!r}\nTHIRD_PARTY = {THIRD_PARTY!r}\n" + SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) > 80
