"""The Flower way: ``fedsvd-federation start``, then Flower's own ``flwr run``, then ``stop``."""

import os
import subprocess
import sys

import psutil

from common.run_config import override_text
from simulations.launch import federation
from tests.conftest import ROOT

TINY = ("model.path", "model.max-length", "data.source", "data.text-column",
        "data.label-column", "data.max-eval-examples", "data.partitioner", "train.batch-size",
        "train.local-steps", "lora.r", "lora.alpha", "output.dir")


def test_flwr_run_on_the_started_federation_runs_its_supernodes_and_stop_ends_it(
        tiny_run_config, tmp_path, capsys):
    home = tmp_path / "flwr-home"
    assert federation.main(["start", "--home", str(home), "--num-supernodes", "3"]) == 0
    out = capsys.readouterr().out
    assert f"export FLWR_HOME={home}" in out and "flwr run . fedsvd --stream" in out
    pid = federation.running_pid(home)
    try:
        assert pid is not None
        assert federation.main(["start", "--home", str(home)]) == 0  # a second start: a no-op
        assert "already running" in capsys.readouterr().out
        overrides = {k: tiny_run_config[k] for k in TINY} | {"strategy.num-rounds": 1,
                                                            "output.run-name": "flower-way"}
        env = {**os.environ, "FLWR_HOME": str(home),
               "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
        done = subprocess.run(["flwr", "run", ".", "fedsvd", "--stream",
                               "--run-config", override_text(overrides)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "(3 simulated SuperNodes)" in done.stdout
        assert (tmp_path / "results" / "flower-way" / "metrics.csv").is_file()
        superlink = psutil.Process(pid)
        family = [superlink, *superlink.children(recursive=True)]  # SuperExec, Ray, ...
    finally:
        assert federation.main(["stop", "--home", str(home)]) == 0
    assert "stopped: superlink" in capsys.readouterr().out
    _, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert federation.running_pid(home) is None
