"""model.device: each process resolves it; cuda is refused without a GPU; kernels follow it."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from client import training as t
from common import devices
from common.config import AppConfig, ConfigError
from server.preflight import refusal
from strategies import FedSVD
from tests.conftest import ROOT
from tests.helpers import FakeGrid
from tests.test_strategy import MODULES, global_state, train_reply

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_is_cuda_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"model.device='cuda': this process sees no CUDA"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda") == torch.device("cuda")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="model.device='tpu'"):
        devices.resolve_device("tpu")


def test_an_unknown_device_is_refused_with_its_key():
    with pytest.raises(ConfigError, match=r"model.device.*'tpu'.*one of \('auto', 'cpu', 'cuda'\)"):
        AppConfig.from_run_config({"model.device": "tpu"})


def test_cuda_without_a_gpu_is_refused_before_starting(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    why = refusal(ROOT, ['model.device="cuda"'], num_partitions=None)
    assert why is not None and "model.device='cuda'" in why
    assert why.endswith("refused before starting: nothing was run")


def test_the_client_computes_where_model_device_says(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    cfg = AppConfig.from_run_config({"model.device": "cpu"})
    assert t.device(cfg.model) == torch.device("cpu")
    data = torch.utils.data.TensorDataset(torch.zeros(4, 2))
    assert not t.train_loader(data, 2, t.device(cfg.model)).pin_memory  # pinned only for a GPU


def _aggregate(device: str) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    strategy = FedSVD(MODULES, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                      device=device)
    strategy.configure_train(1, ArrayRecord(torch_state_dict=global_state(rng)), ConfigRecord(),
                             FakeGrid(2))
    arrays, _ = strategy.aggregate_train(1, [train_reply(rng, 30)[0], train_reply(rng, 90)[0]])
    return arrays.to_torch_state_dict()


def test_the_strategy_merges_on_its_device_and_sends_from_the_cpu():
    state = _aggregate("cpu")
    assert all(v.device.type == "cpu" for v in state.values())


@NEEDS_CUDA
def test_the_strategy_on_cuda_gives_the_cpu_result():
    on_cpu, on_cuda = _aggregate("cpu"), _aggregate("cuda")
    assert on_cpu.keys() == on_cuda.keys()
    for key, value in on_cpu.items():  # refactorized: B'A' agrees; the factors up to signs
        assert on_cuda[key].device.type == "cpu"
        assert torch.allclose(value.abs(), on_cuda[key].abs(), atol=1e-4), key


@NEEDS_CUDA
def test_a_private_client_round_on_cuda_trains_b_there(tiny_run_config, task_identity):
    from flwr.app import Context, RecordDict

    from client.app import train
    from common import contract
    from tests.helpers import global_arrays, train_message

    run_config = {**tiny_run_config, "model.device": "cuda", "privacy.epsilon": 4.0}
    cfg = AppConfig.from_run_config(run_config)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    data = t.load_local_data(cfg, 0, 2)
    reply = train(train_message(global_arrays(cfg, data.num_labels)), context)
    metrics = reply.content[contract.METRICS]
    assert metrics[contract.B_DELTA_NORM] > 0 and 0 < metrics[contract.EPSILON] <= 4.0
    assert t.train_loader(data.train, cfg.train.batch_size, t.device(cfg.model)).pin_memory


def test_a_simulation_reserves_a_share_of_a_gpu_per_client_only_when_asked():
    from simulations.launch.superlink import federation_config

    assert federation_config(6, 1) == "num-supernodes=6 client-resources-num-cpus=1"
    assert federation_config(4, 2, 0.5) == \
        "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.5"


def test_the_launcher_refuses_a_gpu_share_outside_zero_to_one(capsys):
    from simulations import run as sim_run

    with pytest.raises(SystemExit) as exit_info:
        sim_run.main(["--gpus-per-client", "2"])
    assert exit_info.value.code == 2
    assert "--gpus-per-client 2: a share of one GPU, in [0, 1]" in capsys.readouterr().err
