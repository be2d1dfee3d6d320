"""A sweep that spans machines: per-cell records in git, resume from them, reports, progress."""

import csv
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from common.config import SERVER_OPTIMIZER_KEYS, SERVER_OPTIMIZERS, TrainConfig, inert_settings
from simulations import sweep
from simulations.experiments import cells as sweep_cells
from simulations.experiments.cells import Cell, cell_config, grid, run_cells
from simulations.experiments.record_folder import (
    BatchCommits,
    differing_settings,
    is_recorded,
    record_environment_path,
    record_paths,
    write_record,
)
from simulations.launch import console
from simulations.launch.console import Progress, parse_round_line
from simulations.reports.records import (
    RECORD_COLUMNS,
    compute_dtype,
    load_runs,
    settings_digest,
)
from simulations.reports.tables import README_END, README_START, write_report
from tests.test_sweep import FINALS, fake_runner, write_run

INF = math.inf
RC = ["--run-config", "strategy.num-rounds=2", "--lr-file", "none"]


def evaluator_line(r, accuracy, epsilon, seconds, split="test", balanced=None, auc=None):
    """The line server.evaluation.GlobalEvaluator logs (its format string, copied)."""
    eps = "-" if epsilon is None else f"{epsilon:.3f}"
    bal = "" if balanced is None else f"balanced accuracy {balanced:.4f} | "
    bal += "" if auc is None else f"AUC {auc:.4f} | "
    return ("round %d | %s accuracy %.4f | %s%s loss %.4f | client ε mean %s max %s "  # noqa: UP031
            "| MB up %.2f down %.2f | %.0f s") % (r, split, accuracy, bal, split, 2.0, eps, eps,
                                                  1.5, 3.0, seconds)


# --- the round line of the ServerApp's log -----------------------------------------------------

def test_round_line_is_read_from_what_the_evaluator_logs(monkeypatch):
    from flwr.app import ArrayRecord

    from common.evaluation import Evaluation
    from common.schema import RoundTrainingMetrics
    from server import evaluation

    monkeypatch.setattr(evaluation, "evaluation",
                        lambda model, data, **kw: Evaluation(1.25, 0.3125, 0.5, 1, 0.75, 0.875))

    class Layout:
        def load(self, state):
            pass

    training = RoundTrainingMetrics()
    for r in (2, 3):
        training.record(r, {"epsilon-mean": 1.2, "epsilon-max": 1.25, "bytes-up": 2e6,
                            "bytes-down": 4e6})

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        evaluator = evaluation.GlobalEvaluator(None, Layout(), subset=[0] * 4, full=[0] * 9,
                                               final_round=4, training=training, eval_every=2)
        for r in (0, 2, 3):
            evaluator(r, ArrayRecord())
    finally:
        logger.removeHandler(handler)
    rows = [parse_round_line(line) for line in logged if "round" in line]
    assert [r.round for r in rows] == [0, 2, 3]
    assert rows[1].accuracy == pytest.approx(0.3125) and rows[1].epsilon == pytest.approx(1.25)
    assert rows[1].balanced_accuracy == pytest.approx(0.5) and rows[1].auc == pytest.approx(0.875)
    assert evaluator.rows[1]["most-predicted-share"] == 0.75 and evaluator.rows[1]["auc"] == 0.875
    assert math.isnan(rows[0].epsilon)
    # round 3 is not evaluated (strategy.eval-every = 2): no accuracy, ε all the same
    assert math.isnan(rows[2].accuracy) and rows[2].epsilon == pytest.approx(1.25)
    assert [row["round"] for row in evaluator.rows] == [0, 2, 3]
    assert "accuracy" not in evaluator.rows[2] and evaluator.rows[2]["epsilon-max"] == 1.25
    # As it reaches the cell's log through flwr run --stream (a real line, colours and all):
    real = ("\x1b[92mINFO \x1b[0m:      round 1 | validation accuracy 0.3750 | validation loss "
            "1.0949 | client ε mean 5.995 max 5.995 | MB up 0.01 down 0.01 | 22 s")
    row = parse_round_line(real)
    assert (row.round, row.accuracy, row.epsilon, row.seconds) == (1, 0.375, 5.995, 22.0)
    assert math.isnan(row.balanced_accuracy) and math.isnan(row.auc)
    assert parse_round_line(evaluator_line(4, 0.5, INF, 80)).epsilon == INF
    for other in ("INFO :      ├── Number of rounds: 1", "round 3 | nothing else", ""):
        assert parse_round_line(other) is None


def test_progress_line_rates_and_etas():
    lines = []
    progress = Progress(lines.append)
    on_line = progress.cell("[1/2]", "fedsvd-eps3-a0.5-seed1", 20, rounds_after=20)
    on_line(evaluator_line(0, 0.05, None, 5))
    assert lines == []  # round 0 is the initial adapter: no line
    on_line(evaluator_line(4, 0.312, 1.2, 185))
    on_line(evaluator_line(4, 0.312, 1.2, 185))  # repeated: once
    assert lines == ["[1/2] fedsvd-eps3-a0.5-seed1 round 4/20 | accuracy 0.312 | ε 1.20 | "
                     "45 s/round | cell ETA 12 min | sweep ETA 27 min"]
    on_line(evaluator_line(5, 0.32, 1.3, 230, balanced=0.297))  # a classifier's line
    assert lines[-1].startswith("[1/2] fedsvd-eps3-a0.5-seed1 round 5/20 | accuracy 0.320 "
                                "(balanced 0.297) | ε 1.30 | 45 s/round")
    assert progress.seconds_per_round == pytest.approx(45)
    on_line(evaluator_line(6, 0.33, 1.4, 275, balanced=0.31, auc=0.8612))
    assert "| accuracy 0.330 (balanced 0.310, AUC 0.861) | ε 1.40 |" in lines[-1]
    later = progress.cell("[2/2]", "ffa-eps3-a0.5-seed1", 20, rounds_after=0)
    later(evaluator_line(10, 0.4, 2.0, 1000))  # resumed at round 10: its own mean, 100 s
    assert lines[-1].endswith("| 100 s/round | cell ETA 17 min | sweep ETA 8 min")


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_progress_lines_are_printed_while_the_cell_runs(tmp_path):
    lines, seen_while_running = [], []

    def runner(items, log):
        cfg = cell_config(items)
        for r in range(cfg.strategy.num_rounds + 1):
            with log.open("a") as f:
                f.write(f"INFO :      {evaluator_line(r, 0.1 * r, 0.5 * r or None, 10 * r)}\n")
            time.sleep(0.05)
        seen_while_running.append(_wait_for(
            lambda: any(f"{cfg.run_name} round 3/3" in line for line in lines)))
        write_run(Path(cfg.output.dir), method=cfg.strategy.name, seed=cfg.seed, rounds=3,
                  **{"output.run-name": cfg.run_name})
        return 0

    cells = grid(["fedsvd", "ffa"], [6.0], [0.5], [0])
    run_cells(cells, tmp_path, overrides=["strategy.num-rounds=3"], runner=runner,
              command="c", say=lines.append)
    assert seen_while_running == [True, True]
    assert "[1/2] fedsvd-eps6-a0.5-seed0 round 1/3 | accuracy 0.100 | ε 0.50 | 10 s/round | " \
        "cell ETA 20 s | sweep ETA 50 s" in lines
    done = next(i for i, line in enumerate(lines) if "fedsvd-eps6-a0.5-seed0 DONE" in line)
    assert lines.index("[1/2] fedsvd-eps6-a0.5-seed0 round 3/3 | accuracy 0.300 | ε 1.50 | "
                       "10 s/round | cell ETA 0 s | sweep ETA 30 s") < done


def test_progress_goes_to_the_terminal_while_the_output_goes_to_the_log(tmp_path, capfd,
                                                                       monkeypatch):
    printed = threading.Event()

    class Flagged(Progress):
        def cell(self, *args):
            inner = super().cell(*args)

            def on_line(line):
                inner(line)
                if parse_round_line(line):
                    printed.set()
            return on_line

    monkeypatch.setattr(sweep_cells, "Progress", Flagged)

    def runner(items, log):
        cfg = cell_config(items)
        with console.output_to(log):
            subprocess.run(["echo", "from flwr"], check=True)
            os.write(1, f"INFO : {evaluator_line(1, 0.25, 1.0, 12)}\n".encode())  # as flwr does
            assert printed.wait(10)  # said while fd 1 and 2 still go to the log
        write_run(Path(cfg.output.dir), seed=cfg.seed, rounds=1,
                  **{"output.run-name": cfg.run_name})
        return 0

    run_cells(grid(["fedsvd"], [6.0], [0.5], [0]), tmp_path, runner=runner, command="c",
              overrides=["strategy.num-rounds=1"])
    log = (tmp_path / "logs" / "fedsvd-eps6-a0.5-seed0.log").read_text()
    assert "from flwr" in log and "round 1/1" not in log
    assert "fedsvd-eps6-a0.5-seed0 round 1/1 | accuracy 0.250 | ε 1.00 | 12 s/round" in \
        capfd.readouterr().out


def test_a_thread_follows_only_new_lines(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("old line\n")
    got = []
    with console.following(log, got.append, interval=0.01):
        with log.open("a") as f:
            f.write("new 1\nnew")
            f.flush()
            assert _wait_for(lambda: got == ["new 1"])
            f.write(" 2\n")
    assert got == ["new 1", "new 2"]
    assert not any(t.name == "follow a.log" for t in threading.enumerate())


# --- records ------------------------------------------------------------------------------------

def test_a_record_is_the_metrics_with_the_cell_columns_and_the_config(tmp_path):
    run = write_run(tmp_path / "out", method="ffa", epsilon=INF, seed=2, lr=0.5, rounds=3)
    table, config = write_record(run, tmp_path / "rec")  # no environment.json: two files
    assert (table, config) == record_paths(tmp_path / "rec", "ffa-epsinf-a0.5-seed2")
    assert config.read_text() == (run / "config.json").read_text()
    rows = list(csv.DictReader(table.open()))
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0])[:len(RECORD_COLUMNS)] == list(RECORD_COLUMNS)
    assert list(rows[0])[len(RECORD_COLUMNS):] == list(metrics[0])
    assert [{k: r[k] for k in metrics[0]} for r in rows] == metrics
    assert {(r["run"], r["method"], r["epsilon"], r["alpha"], r["seed"], r["learning_rate"],
             r["num_rounds"]) for r in rows} == {("ffa-epsinf-a0.5-seed2", "ffa", "inf", "0.5",
                                                  "2", "0.5", "3")}
    assert rows[0]["settings"] == settings_digest(json.loads(config.read_text()))
    assert sorted(p.name for p in table.parent.iterdir()) == [table.name, config.name]


def test_a_record_keeps_what_computed_the_run(tmp_path):
    run = write_run(tmp_path / "out", method="ffa", seed=1)
    environment = {"compute-dtype": "bfloat16", "native-bfloat16": True, "cpu": "X"}
    (run / "environment.json").write_text(json.dumps(environment))
    written = write_record(run, tmp_path / "rec")
    assert written[:2] == list(record_paths(tmp_path / "rec", "ffa-eps6-a0.5-seed1"))
    assert written[2] == record_environment_path(tmp_path / "rec", "ffa-eps6-a0.5-seed1")
    assert json.loads(written[2].read_text()) == environment
    assert written[2].name == "ffa-eps6-a0.5-seed1.environment.json"
    # the report reads cells by their CSV: the environment file is not taken for a cell
    tidy = load_runs(tmp_path / "rec").tidy
    assert list(tidy["run"].unique()) == ["ffa-eps6-a0.5-seed1"]
    assert set(tidy["compute_dtype"]) == {"bfloat16"}
    pd.testing.assert_frame_equal(load_runs(tmp_path / "out").tidy, tidy, check_dtype=False)


def test_the_precision_of_a_run_without_environment_is_pinned_or_unrecorded():
    assert compute_dtype({"model.compute-dtype": "auto"}, None) == "unrecorded"
    assert compute_dtype({}, None) == "unrecorded"
    assert compute_dtype({"model.compute-dtype": "float32"}, None) == "float32"
    assert compute_dtype({"model.compute-dtype": "auto"}, {"compute-dtype": "bfloat16"}) == \
        "bfloat16"


def test_settings_digest_is_shared_by_the_cells_of_one_experiment():
    a = cell_config(["strategy.num-rounds=2 strategy.name='ffa' seed=3"]).to_dict()
    b = cell_config(["strategy.num-rounds=2 privacy.epsilon=1 output.dir='/x'"]).to_dict()
    c = cell_config(["strategy.num-rounds=3"]).to_dict()
    assert settings_digest(a) == settings_digest(b) != settings_digest(c)
    assert len(settings_digest(a)) == 8


def test_load_runs_reads_records_as_it_reads_run_folders(tmp_path):
    out, rec = tmp_path / "out", tmp_path / "rec"
    for (method, eps), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_record(write_run(out, method=method, epsilon=eps, seed=seed, final=final), rec)
    from_runs, from_records = load_runs(out), load_runs(rec)
    assert from_records.incomplete == ()
    pd.testing.assert_frame_equal(from_runs.tidy, from_records.tidy, check_dtype=False)
    assert from_records.tidy["settings"].nunique() == 1
    (rec / "cells" / "torn.csv").write_text("")
    (rec / "cells" / "nojson.csv").write_text("round,accuracy\n0,0.1\n")
    assert sorted(load_runs(rec).incomplete) == ["nojson", "torn"]


def test_sweep_with_records_resumes_on_a_fresh_clone(tmp_path, capsys):
    out, rec = tmp_path / "results", tmp_path / "repo" / "experiments" / "main"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out", str(out),
            "--record", str(rec), *RC]
    runner = fake_runner()
    assert sweep.main(argv, runner=runner) == 0
    assert len(runner.calls) == 2
    names = ["fedsvd-eps6-a0.5-seed0", "ffa-eps6-a0.5-seed0"]
    assert sorted(p.name for p in (rec / "cells").iterdir()) == sorted(
        f"{n}.{ext}" for n in names for ext in ("csv", "json"))
    for name in ("sweep.csv", "summary.csv", "paired.csv", "table.md",
                 "accuracy_vs_round_a0.5.png"):
        assert (rec / name).is_file(), name
    command = (rec / "commands.txt").read_text().splitlines()
    assert command == ["python -m simulations.sweep " + " ".join(argv)]
    capsys.readouterr()
    # A fresh clone: no results folder; the recorded cells are not run again.
    shutil.rmtree(out)
    assert sweep.main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert all(f"{n}  lr (run config)  recorded" in text for n in names)
    assert "[dry-run] 2 cells: 2 recorded" in text
    runner = fake_runner()
    assert sweep.main(argv, runner=runner) == 0
    assert runner.calls == []
    assert "2 cells, 2 recorded in" in capsys.readouterr().out
    # A larger sweep into the same records runs only the new cells; its command is added.
    bigger = [*argv[:5], "0,1", *argv[6:]]
    runner = fake_runner()
    assert sweep.main(bigger, runner=runner) == 0
    assert sorted(c.run_name for c in runner.calls) == ["fedsvd-eps6-a0.5-seed1",
                                                        "ffa-eps6-a0.5-seed1"]
    assert len((rec / "commands.txt").read_text().splitlines()) == 2
    assert "fedsvd-eps6-a0.5-seed1" in set(pd.read_csv(rec / "sweep.csv")["run"])


def _adapter_runner(without: frozenset = frozenset()):
    """fake_runner whose runs also save peft's two adapter files (unless named in ``without``)."""
    runner = fake_runner()

    def run(items, log):
        code = runner(items, log)
        cfg = runner.calls[-1]
        if cfg.run_name not in without:
            adapter = Path(cfg.output.dir) / cfg.run_name / "adapter"
            adapter.mkdir()
            (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "run": cfg.seed}))
            (adapter / "adapter_model.safetensors").write_bytes(bytes([cfg.seed]) * 100)
        return code
    run.calls = runner.calls
    return run


def test_record_adapters_keeps_each_cells_adapter_as_a_run_folder_and_reruns_one_without(
        tmp_path, capsys):
    out, rec = tmp_path / "results", tmp_path / "rec"
    plain = ["--methods", "fedsvd", "--epsilons", "6", "--seeds", "0,1", "--out", str(out),
             "--record", str(rec), *RC]
    # seed 0 recorded before, without its adapter; seed 1's run saves none
    assert sweep.main([*plain[:5], "0", *plain[6:]], runner=_adapter_runner()) == 0
    shutil.rmtree(out)
    runner = _adapter_runner(without=frozenset({"fedsvd-eps6-a0.5-seed1"}))
    assert sweep.main([*plain, "--record-adapters"], runner=runner) == 1
    # seed 0 ran again (its record had no adapter) and was kept; seed 1 is NOT RECORDED, loudly
    assert [c.run_name for c in runner.calls] == ["fedsvd-eps6-a0.5-seed0",
                                                  "fedsvd-eps6-a0.5-seed1"]
    kept = rec / "adapters" / "fedsvd-eps6-a0.5-seed0"
    assert (kept / "config.json").read_text() == (
        out / "fedsvd-eps6-a0.5-seed0" / "config.json").read_text()
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == bytes([0]) * 100
    assert json.loads((kept / "adapter" / "adapter_config.json").read_text())["run"] == 0
    assert not (rec / "adapters" / "fedsvd-eps6-a0.5-seed1").exists()
    assert "fedsvd-eps6-a0.5-seed1 is done but NOT RECORDED" in capsys.readouterr().out
    # now the run saves its adapter: only seed 1 runs; then nothing is left to run
    runner = _adapter_runner()
    shutil.rmtree(out / "fedsvd-eps6-a0.5-seed1")
    assert sweep.main([*plain, "--record-adapters"], runner=runner) == 0
    assert [c.run_name for c in runner.calls] == ["fedsvd-eps6-a0.5-seed1"]
    runner = _adapter_runner()
    assert sweep.main([*plain, "--record-adapters"], runner=runner) == 0 and not runner.calls
    assert sweep.main(plain[:4] + ["--record-adapters"]) == 2  # needs --record


def test_dry_run_says_recorded_complete_or_to_run(tmp_path, capsys):
    out, rec = tmp_path / "out", tmp_path / "rec"
    write_record(write_run(out, method="fedsvd"), rec)
    shutil.rmtree(out / "fedsvd-eps6-a0.5-seed0")
    write_run(out, method="ffa")
    argv = ["--methods", "fedsvd,ffa,fedavg", "--epsilons", "6", "--seeds", "0", "--out",
            str(out), "--record", str(rec), *RC]
    assert sweep.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit("  ", 1)[1] for line in lines[:3]] == ["recorded", "complete locally",
                                                               "to run"]
    assert lines[3].startswith("[dry-run] 3 cells: 1 recorded, 1 complete locally, 1 to run")
    # A sweep records the complete local run without running it again.
    runner = fake_runner()
    assert sweep.main(argv, runner=runner) == 0
    assert [c.run_name for c in runner.calls] == ["fedavg-eps6-a0.5-seed0"]
    assert record_paths(rec, "ffa-eps6-a0.5-seed0")[0].is_file()


def test_a_recorded_cell_with_other_settings_stops_the_sweep(tmp_path, capsys):
    rec = tmp_path / "rec"
    write_record(write_run(tmp_path / "elsewhere", method="ffa", **{"train.local-steps": 99}),
                 rec)
    runner = fake_runner()
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), *RC]
    assert sweep.main(argv, runner=runner) == 2
    err = capsys.readouterr().err
    local_steps = TrainConfig().local_steps
    assert f"ffa-eps6-a0.5-seed0: train.local-steps: 99 there, {local_steps} now" in err
    assert "recorded in" in err and "nothing was run" in err
    assert runner.calls == []
    assert sweep.main([*argv, "--dry-run"]) == 2


def test_a_server_rate_that_acts_in_neither_config_is_not_a_difference(tmp_path):
    """Under plain averaging (x ← x̄) the server rates do nothing: a cell recorded with the old
    default rate matches a plan with the new one; under FedAdam they differ, and a change of
    the optimizer itself is a difference."""
    plain = ['strategy.server-optimizer="none"']
    recorded = tmp_path / "config.json"
    config = cell_config([*plain, "strategy.server-learning-rate=1.0",
                          "strategy.server-beta2=0.9"]).to_dict()
    recorded.write_text(json.dumps(config))
    new_rate = cell_config([*plain, "strategy.server-learning-rate=0.03"])
    assert differing_settings(recorded, new_rate) == []
    adam = cell_config(['strategy.server-optimizer="adam"', "strategy.server-learning-rate=0.03"])
    assert differing_settings(recorded, adam) == [
        "strategy.server-beta2: 0.9 there, 0.99 now",
        "strategy.server-learning-rate: 1.0 there, 0.03 now",
        "strategy.server-optimizer: 'none' there, 'adam' now"]
    avgm = cell_config(['strategy.server-optimizer="avgm"', "strategy.server-beta2=0.5"])
    recorded.write_text(json.dumps(cell_config(['strategy.server-optimizer="avgm"']).to_dict()))
    assert differing_settings(recorded, avgm) == []  # FedAvgM reads no β₂
    assert inert_settings(config) >= {"strategy.server-learning-rate", "strategy.server-tau"}
    assert set(SERVER_OPTIMIZER_KEYS) == set(SERVER_OPTIMIZERS)


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def _repo(path: Path) -> Path:
    """A git repository at ``path`` with one commit, someone's staged file and an untracked one."""
    path.mkdir()
    _git(path, "init", "-q")
    _git(path, "config", "user.name", "Sweep Test")
    _git(path, "config", "user.email", "sweep@example.com")
    (path / "README.md").write_text("x\n")
    _git(path, "add", "README.md")
    _git(path, "commit", "-q", "-m", "start")
    (path / "staged.txt").write_text("someone else's work\n")
    _git(path, "add", "staged.txt")
    (path / "untracked.txt").write_text("not mine\n")
    return path


def _committed(repo: Path, commit: str = "HEAD") -> list[str]:
    return _git(repo, "show", "--name-only", "--format=", commit).split()


CELLS = ["fedsvd-eps6-a0.5-seed0", "ffa-eps6-a0.5-seed0"]


def test_commit_takes_the_cells_of_a_batch_in_one_commit_and_nothing_else(tmp_path):
    repo = _repo(tmp_path / "clone")
    rec = repo / "experiments" / "main"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), "--commit", *RC]
    assert sweep.main(argv, runner=fake_runner()) == 0
    # Two cells within the first 30 minutes: one commit, at the end of the sweep
    assert _git(repo, "log", "--format=%s").splitlines() == [f"sweep {rec}: 2 cells", "start"]
    assert _git(repo, "log", "-1", "--format=%b").split("\n")[:2] == [
        f"{n} (final accuracy 0.5000)" for n in CELLS]
    assert sorted(_committed(repo)) == sorted(
        [*(f"experiments/main/cells/{n}.{ext}" for n in CELLS for ext in ("csv", "json")),
         "experiments/main/commands.txt"])
    status = _git(repo, "status", "--porcelain").splitlines()
    assert "A  staged.txt" in status and "?? untracked.txt" in status
    assert not any("cells/" in line for line in status)  # the report is left to the user


def test_commit_every_0_commits_each_cell_as_it_completes(tmp_path):
    repo = _repo(tmp_path / "clone")
    rec = repo / "experiments" / "main"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), "--commit", "--commit-every", "0", *RC]
    assert sweep.main(argv, runner=fake_runner()) == 0
    assert _git(repo, "log", "--format=%s").splitlines() == [
        *(f"sweep {rec}: {n} (final accuracy 0.5000)" for n in reversed(CELLS)), "start"]
    assert _committed(repo) == [f"experiments/main/cells/{CELLS[1]}.{ext}"
                                for ext in ("csv", "json")]
    assert "experiments/main/commands.txt" in _committed(repo, "HEAD~1")


def test_a_batch_is_committed_once_its_minutes_have_passed(tmp_path):
    repo = _repo(tmp_path / "clone")
    rec, now, said = repo / "rec", [0.0], []
    commits = BatchCommits(rec, 30, said.append, clock=lambda: now[0])
    for minute, name in ((10, "a"), (20, "b"), (31, "c"), (50, "d")):
        now[0] = minute * 60.0
        (rec / "cells").mkdir(parents=True, exist_ok=True)
        (rec / "cells" / f"{name}.csv").write_text(name)
        commits.add(name, [rec / "cells" / f"{name}.csv"])
        commits.commit_if_due()
    # a, b, c waited for minute 31; d waits for the next 30 minutes, or the end
    assert _git(repo, "log", "--format=%s").splitlines() == [f"sweep {rec}: 3 cells", "start"]
    assert list(commits.queued) == ["d"]
    assert commits.commit() == [] and commits.commit() == []  # the end; nothing left
    assert _git(repo, "log", "--format=%s").splitlines()[0] == f"sweep {rec}: d"


def test_a_sweep_that_ends_early_commits_what_it_recorded_and_resumes(tmp_path, capsys):
    repo = _repo(tmp_path / "clone")
    rec = repo / "experiments" / "main"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), "--commit", *RC]
    runner = fake_runner()

    def interrupted_at_the_second_cell(items, log):
        if runner.calls:
            raise KeyboardInterrupt
        return runner(items, log)

    with pytest.raises(KeyboardInterrupt):
        sweep.main(argv, runner=interrupted_at_the_second_cell)
    assert _git(repo, "log", "--format=%s").splitlines() == [
        f"sweep {rec}: {CELLS[0]} (final accuracy 0.5000)", "start"]
    # The same command on a fresh clone: the committed cell is skipped, the other one runs
    clone = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    _git(clone, "config", "user.name", "Sweep Test")
    _git(clone, "config", "user.email", "sweep@example.com")
    again = fake_runner()
    fresh = [*argv[:7], str(tmp_path / "out-fresh"), "--record",
             str(clone / "experiments" / "main"), *argv[10:]]
    assert sweep.main(fresh, runner=again) == 0
    assert [c.run_name for c in again.calls] == [CELLS[1]]


def test_records_an_earlier_sweep_left_uncommitted_go_into_the_first_batch(tmp_path):
    repo = _repo(tmp_path / "clone")
    rec = repo / "experiments" / "main"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), *RC]
    assert sweep.main([argv[0], "fedsvd", *argv[2:]], runner=fake_runner()) == 0  # no commit
    runner = fake_runner()
    assert sweep.main([*argv, "--commit"], runner=runner) == 0
    assert [c.run_name for c in runner.calls] == [CELLS[1]]
    assert _git(repo, "log", "-1", "--format=%b").split("\n")[:2] == [
        f"{CELLS[0]} (recorded earlier)", f"{CELLS[1]} (final accuracy 0.5000)"]
    assert not any("cells/" in line for line in _git(repo, "status", "--porcelain").splitlines())


def test_a_failed_commit_is_loud_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    rec = tmp_path / "not-a-repo"
    argv = ["--methods", "fedsvd,ffa", "--epsilons", "6", "--seeds", "0", "--out",
            str(tmp_path / "out"), "--record", str(rec), "--commit", *RC]
    runner = fake_runner()
    assert sweep.main(argv, runner=runner) == 1
    assert len(runner.calls) == 2
    out = capsys.readouterr().out
    assert out.count("2 recorded cell(s) NOT COMMITTED: git add exited") == 1
    assert "2 NOT RECORDED" in out and "[sweep] NOT RECORDED ffa-eps6-a0.5-seed0" in out
    assert record_paths(rec, "ffa-eps6-a0.5-seed0")[0].is_file()
    assert (rec / "table.md").is_file()  # the report is still built
    with pytest.raises(ValueError, match="--commit needs --record"):
        sweep._main(sweep.parse_args(["--commit"]), [], runner)
    with pytest.raises(ValueError, match="--commit-every 5: minutes >= 0, with --commit"):
        sweep._main(sweep.parse_args(["--record", str(rec), "--commit-every", "5"]), [], runner)


def test_every_committed_cell_is_named_by_the_one_run_name_format():
    """Committed records name their files as cells are named today: resume finds them."""
    from common.config import format_run_name
    from tests.conftest import ROOT

    for record, tuning in (("experiments/main", False), ("experiments/lr-grid", True)):
        configs = sorted((ROOT / record / "cells").glob("*[0-9].json"))
        assert len(configs) >= 30, record
        for path in configs:
            c = json.loads(path.read_text())
            cell = Cell(c["strategy.name"], c["privacy.epsilon"], c["data.dirichlet-alpha"],
                        c["seed"], c["train.learning-rate"],
                        c["data.validation-fraction"] if tuning else 0.0)
            assert cell.name == path.stem == c["output.run-name"]
            assert is_recorded(ROOT / record, cell.name, c["strategy.num-rounds"])
    every = [p for p in (ROOT / "experiments").rglob("cells/*.json")
             if not p.name.endswith(".environment.json")]
    for path in every:  # the tuning cells (named with their lr) validate on a held-out split
        c = json.loads(path.read_text())
        named = functools.partial(format_run_name, c["strategy.name"], c["privacy.epsilon"],
                                  c["seed"], alpha=c["data.dirichlet-alpha"])
        tuning = [named(lr=c["train.learning-rate"])] if c["data.validation-fraction"] else []
        assert path.stem in {named(), *tuning}, path
    assert len(every) > 300


# --- reports from the records alone -------------------------------------------------------------

def test_report_only_from_records_alone(tmp_path, capsys):
    out, rec = tmp_path / "out", tmp_path / "experiments" / "main"
    for (method, eps), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_record(write_run(out, method=method, epsilon=eps, seed=seed, final=final), rec)
    shutil.rmtree(out)
    (rec / "commands.txt").write_text("python -m simulations.sweep --record experiments/main\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\n{README_END}\n")
    argv = ["--report-only", "--record", str(rec), "--readme", str(readme)]
    assert sweep.main(argv) == 0
    table = (rec / "table.md").read_text()
    assert "python -m simulations.sweep --record experiments/main" in table
    assert "| fedsvd | 0.7000 ± 0.2484 | 0.3000 ± 0.2484 |" in table
    assert "| ffa | 0.1000 ± 0.2484 | 0.1000 (n = 1) |" in table  # paired: fedsvd − ffa
    assert "Target: a paired half-width ≤ 0.03; met by 0 of 1 comparisons with n ≥ 2" in table
    assert "Total machine time: **3 min 20 s** (sum of the last round's wall-seconds of the " \
        "10 recorded cells" in table  # 10 cells × 20 s
    assert "Frozen encoder computed in (cells): unrecorded 10." in table  # auto, no environment
    assert "![accuracy_vs_round_a0.5](accuracy_vs_round_a0.5.png)" in table
    text = readme.read_text()
    assert "](experiments/main/accuracy_vs_epsilon_a0.5.png)" in text
    assert not (tmp_path / "_static").exists()  # the plots are linked where they are
    docs = tmp_path / "docs" / "experiments.md"  # a page one folder down links upwards
    docs.parent.mkdir()
    docs.write_text(f"# experiments\n\n{README_START}\n{README_END}\n")
    assert sweep.main(["--report-only", "--record", str(rec), "--readme", str(docs)]) == 0
    assert "](../experiments/main/accuracy_vs_epsilon_a0.5.png)" in docs.read_text()
    assert not (docs.parent / "_static").exists()
    paired = pd.read_csv(rec / "paired.csv")
    assert set(paired["method"]) == {"ffa"} and {"n", "mean", "ci95"} <= set(paired.columns)
    assert len(pd.read_csv(rec / "sweep.csv")) == 30
    capsys.readouterr()
    assert sweep.main(["--report-only", "--record", str(tmp_path / "empty")]) == 1
    assert "no record in" in capsys.readouterr().out


def test_records_of_tuning_and_of_the_sweep_are_not_mixed(tmp_path):
    rec = tmp_path / "rec"
    write_record(write_run(tmp_path / "out", seed=0), rec)
    write_record(write_run(tmp_path / "out", seed=1, validation=0.1), rec)
    with pytest.raises(ValueError, match="mixes test and validation runs"):
        write_report(rec)


def test_learning_rate_tuning_resumes_from_its_records(tmp_path):
    from simulations.experiments import learning_rates as sweep_lr

    out, rec, lr_file = tmp_path / "out", tmp_path / "rec-lr", tmp_path / "lr.toml"
    argv = ["--methods", "fedsvd", "--out", str(out), "--lr-file", str(lr_file), "--record",
            str(rec), "--run-config", "strategy.num-rounds=2", "--tune-lr", "--lrs", "0.5,1"]
    runner = fake_runner(accuracy=lambda c: 0.9 - abs(c.train.learning_rate - 0.5))
    assert sweep.main(argv, runner=runner) == 0 and len(runner.calls) == 2
    shutil.rmtree(out)
    lr_file.unlink()
    runner = fake_runner()
    assert sweep.main(argv, runner=runner) == 0 and runner.calls == []
    assert sweep_lr.learning_rates_for(lr_file, ["fedsvd"]) == {"fedsvd": 0.5}


def test_one_text_for_balanced_accuracy_and_auc_from_a_row_or_a_logged_round():
    from simulations.launch.console import balanced_auc_text, class_metrics_text

    assert balanced_auc_text(0.5, 0.987) == " (balanced 0.5000, AUC 0.9870)"
    assert balanced_auc_text(0.5, 0.987, digits=3) == " (balanced 0.500, AUC 0.987)"
    assert balanced_auc_text(0.5, math.nan) == " (balanced 0.5000)"  # before AUC was logged
    assert balanced_auc_text(math.nan, 0.9) == ""  # not evaluated, or no classes
    row = {"accuracy": "0.86", "balanced-accuracy": "0.5", "auc": "0.987"}
    assert class_metrics_text(row) == " (balanced 0.5000, AUC 0.9870)"
    assert class_metrics_text({**row, "auc": ""}) == " (balanced 0.5000)"
    assert class_metrics_text({"accuracy": "0.3", "perplexity": "12.0"}) == ""


def test_report_pairs_other_methods_with_the_fedsvd_cells_of_a_reference_record(tmp_path,
                                                                                capsys):
    out, main, others = tmp_path / "out", tmp_path / "main", tmp_path / "others"
    for seed, final in enumerate([0.5, 0.6, 0.7, 0.9]):  # the reference: four seeds
        write_record(write_run(out, method="fedsvd", seed=seed, final=final), main)
        write_record(write_run(out, method="ffa", seed=seed, final=final - 0.3), main)
    for seed, final in enumerate([0.3, 0.5, 0.5]):  # this table: three seeds, another method
        write_record(write_run(out, method="flora", seed=seed, final=final), others)
    (main / "commands.txt").write_text("python -m simulations.sweep --record main\n")
    (others / "commands.txt").write_text("python -m simulations.sweep --record others\n")
    argv = ["--report-only", "--record", str(others), "--reference-record", str(main)]
    assert sweep.main(argv) == 0
    table = (others / "table.md").read_text()
    assert "over seeds 0, 1, 2;" in table  # FedSVD's seed 3 is left out, and FFA-LoRA
    assert "| fedsvd | 0.6000 ± 0.2484 |" in table and "| ffa |" not in table
    assert "| flora | 0.1667 ± 0.1434 |" in table  # paired: 0.2, 0.1, 0.2
    assert "--record main" in table and "--record others" in table
    assert "of the 6 recorded cells" in table

    write_record(write_run(out, method="fedsvd", seed=0, final=0.1, **{"lora.r": 4}),
                 tmp_path / "other-settings")
    capsys.readouterr()
    argv[-1] = str(tmp_path / "other-settings")
    assert sweep.main(argv) == 1
    assert "differ in their shared settings" in capsys.readouterr().out
    assert sweep.main(["--report-only", "--reference-record", str(main)]) == 2  # no --record
