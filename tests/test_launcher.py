"""What a user sees when something is wrong: exit codes and the last lines of every command."""

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from common.config import AppConfig, ConfigError
from common.run_config import override_text
from deploy import local as deploy_local
from server.checkpoint import CHECKPOINT_FILE
from server.preflight import (
    RESULT_FILES,
    OutputExists,
    check_output_folder,
    check_output_writable,
    clear_results,
)
from simulations import run as sim_run
from simulations import sweep
from simulations.launch.superlink import flwr_run
from tests.conftest import ROOT
from tests.test_fault_tolerance import app_with_client_app, faulty_run_config

BAD_CONFIG = "lora.rr=4 privacy.epsilon=-1"


def test_a_bad_configuration_exits_2_within_10_s_naming_every_key():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "simulations.run", "--run-config", BAD_CONFIG],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - start
    assert done.returncode == 2 and seconds < 10
    last = done.stderr.strip().splitlines()[-4:]
    assert last == [
        "error: invalid run configuration:",
        "  lora.rr=4: unknown key; did you mean lora.r? (the lora keys: r, alpha, dropout, "
        "target-modules, train-head, head-init)",
        "  privacy.epsilon=-1.0: must be > 0 (or inf)",
        "refused before starting: nothing was run"]


def _tiny_overrides(tiny_run_config: dict, **extra) -> list[str]:
    keys = {k: v for k, v in tiny_run_config.items() if k.split(".")[0] in ("model", "data")}
    return [override_text({**keys, **extra})]


def test_bad_data_is_refused_before_any_superlink(tiny_run_config, tmp_path, capsys):
    three = tmp_path / "three.csv"
    three.write_text("text,label\nhello world,0\nfoo bar,1\nbaz,0\n")
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **{"data.source": str(three),
                                                  "data.text-column": "text",
                                                  "data.label-column": "label"})]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith(f"  data.source='{three}': the test split has ")
    assert not (tmp_path / "results").exists()


def test_a_folder_with_results_is_refused_unless_resume_or_overwrite(tiny_run_config, tmp_path,
                                                                     capsys):
    results = tmp_path / "results"
    folder = results / "fedsvd-eps6-seed0-x"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("round\n0\n")
    base = ["--results-dir", str(results), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **{"output.run-name": folder.name})]
    assert sim_run.main(base) == 2
    assert "already holds the results of a run (metrics.csv)" in capsys.readouterr().err
    assert sim_run.main([*base, "--run-config", "output.resume=true"]) == 2
    assert f"no checkpoint at {folder / CHECKPOINT_FILE}" in capsys.readouterr().err
    assert (folder / "metrics.csv").read_text() == "round\n0\n"


def test_an_output_dir_that_cannot_be_made_is_refused_naming_it(tiny_run_config, tmp_path,
                                                                capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = ["--results-dir", str(a_file / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **{"output.run-name": "r"})]
    assert sim_run.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-2] == (
        f"  output.dir='{a_file / 'results'}': the run's folder {a_file / 'results' / 'r'} "
        f"cannot be made: {a_file} is a file, not a folder; set output.dir to a folder you can "
        "write")

    def read_only(**_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # root may write to any mode
    cfg = AppConfig.from_run_config({**tiny_run_config, "output.dir": str(tmp_path / "ro")})
    with pytest.raises(ConfigError, match=rf"cannot be made: no folder can be created in "
                                          rf"{tmp_path} \(Permission denied\)"):
        check_output_writable(cfg.results_folder, cfg.output)


def test_overwrite_removes_only_what_a_run_writes(tiny_run_config, tmp_path):
    cfg = AppConfig.from_run_config({**tiny_run_config, "output.run-name": "r"})
    folder = cfg.results_folder
    (folder / "adapter").mkdir(parents=True)
    (folder / "privacy").mkdir()
    for name in ("metrics.csv", "config.json", "notes.txt"):
        (folder / name).write_text("x")
    with pytest.raises(OutputExists, match="set output.resume=true to continue it"):
        check_output_folder(folder, cfg)
    overwrite = AppConfig.from_run_config({**tiny_run_config, "output.run-name": "r",
                                           "output.overwrite": True})
    check_output_folder(folder, overwrite)
    assert clear_results(folder) == ["metrics.csv", "config.json", "adapter", "privacy"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert CHECKPOINT_FILE in RESULT_FILES


def test_deploy_local_refuses_a_bad_configuration_before_starting(tmp_path, capsys):
    code = deploy_local.main(["--run-dir", str(tmp_path / "deploy"), "--insecure",
                              "--run-config", BAD_CONFIG])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "refused before starting: nothing was run")
    assert not (tmp_path / "deploy" / "pids").exists()


def test_a_sweep_whose_cell_would_fail_runs_nothing(tiny_run_config, tmp_path, capsys):
    calls = []
    argv = ["--methods", "fedsvd", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "sweep"), "--num-supernodes", "40", "--lr-file", "none",
            "--run-config", *_tiny_overrides(tiny_run_config)]
    assert sweep.main(argv, runner=lambda items, log: calls.append(items) or 0) == 2
    err = capsys.readouterr().err
    assert calls == [] and "fedsvd-eps6-a0.5-seed0: unusable data" in err
    assert "partition 0 of 40" in err and err.strip().endswith("nothing was run")


def test_a_run_whose_clients_all_fail_exits_1_with_their_reason(tiny_run_config, tmp_path,
                                                                capfd):
    app = app_with_client_app(tmp_path / "app", "faulty_clients:always_raises")
    run_config = faulty_run_config(tiny_run_config, {"strategy.num-rounds": 2,
                                               "output.run-name": "broken"})
    code = flwr_run(app, run_config=run_config, num_supernodes=3, flwr_home=tmp_path / "home",
                    timeout=240)
    assert code == 1
    # (under capfd, Flower's fd output and ours interleave differently than in a terminal)
    last = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[run]")]
    assert len(last) == 2 and last[0].startswith("[run] FAILED: run ")
    assert "finished:failed" in last[0]
    assert last[1].startswith("[run] Simulation failed with exception: RoundFailed: round 1: all "
                              "3 sampled client(s) failed, so nothing can be trained: Flower "
                              "error reply (code 2): IndexError: simulated bug in partition ")
    assert not (Path(tiny_run_config["output.dir"]) / "broken" / "adapter").exists()


def test_a_launcher_killed_by_sigterm_still_stops_its_superlink(tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from simulations.launch.superlink import simulation_superlink\n"
        "with simulation_superlink(Path(sys.argv[1])):\n"
        "    print('up', flush=True)\n"
        "    time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
    superlinks: list[psutil.Process] = []
    try:
        assert launcher.stdout.readline().strip() == "up"
        superlinks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if "flower-superlink" in " ".join(p.cmdline())]
        assert len(superlinks) == 1
        launcher.terminate()  # SIGTERM, as `kill` or a job scheduler sends it
        assert launcher.wait(timeout=60) == 143
        gone, alive = psutil.wait_procs(superlinks, timeout=5)
        assert not alive, f"still running after the launcher's SIGTERM: {alive}"
    finally:
        launcher.kill()
        for proc in superlinks:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
