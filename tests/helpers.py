"""Fakes and helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig
from common.model import build_model
from privacy import PrivacyLedger, PrivateTraining, make_private
from tests.conftest import ROOT


class FakeGrid:
    """The part of a Flower ``Grid`` a strategy's ``configure_train`` uses: node ids 1..n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def private_sgd(model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                dataset: torch.utils.data.Dataset, *, loader=None, lr: float = 0.5,
                **kwargs) -> PrivateTraining:
    """Real Opacus DP-SGD over ``trainable`` (σ = 1, C = 1, batch 8, a fresh ledger)."""
    return make_private(
        module=model, optimizer=torch.optim.SGD(trainable, lr=lr),
        data_loader=loader or torch.utils.data.DataLoader(dataset, batch_size=8),
        noise_multiplier=kwargs.pop("noise_multiplier", 1.0),
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0), ledger=PrivacyLedger(), **kwargs)


def global_arrays(cfg: AppConfig, num_labels: int) -> ArrayRecord:
    """The global arrays of a fresh model with a non-zero B, as after a few rounds."""
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed)
    layout = AdapterLayout.from_model(model)
    with torch.no_grad():  # a non-zero B, as after a few rounds
        for pair in layout.pairs:
            pair.B.normal_(0, 0.1)
    return ArrayRecord(torch_state_dict=layout.tensors())


def train_message(arrays: ArrayRecord) -> Message:
    """A train instruction carrying ``arrays`` that asks for B."""
    content = RecordDict({contract.ARRAYS: arrays,
                          contract.CONFIG: ConfigRecord({contract.TRAIN_FACTORS: "B"})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def experiment_script(path: str) -> ModuleType:
    """The script ``path`` of a record (``experiments/<record>/<name>.py``: not installed)."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
