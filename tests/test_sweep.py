"""The sweep: cell names, the resume rule, failures, tidy CSV, t-intervals, README, lr tuning."""

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from common.config import AppConfig, TrainConfig
from common.run_config import override_text
from simulations import sweep
from simulations.experiments import cells as sweep_cells
from simulations.experiments import learning_rates as sweep_lr
from simulations.experiments.cells import Cell, cell_config, grid, is_complete, run_cells
from simulations.launch import console
from simulations.reports.records import ATTEMPTS_FILE, load_runs
from simulations.reports.statistics import paired_differences, summarize, t_interval
from simulations.reports.tables import (
    README_END,
    README_START,
    markdown_table,
    replace_between_markers,
    table_markers,
    write_report,
)

INF = math.inf


def write_run(folder: Path, *, method="fedsvd", epsilon=6.0, alpha=0.5, seed=0, lr=None,
              final=0.5, rounds=2, complete=True, validation=0.0, **config) -> Path:
    """A run folder as the ServerApp writes it: config.json and metrics.csv (rounds 0..R).

    ``lr`` None: the rate a sweep gives ``method`` without an lr file (its run config's)."""
    if lr is None:
        lr = sweep_lr.method_conf_rates([method]).get(method, TrainConfig().learning_rate)
    cfg = {**AppConfig().to_dict(), "strategy.name": method, "privacy.epsilon": epsilon,
           "data.dirichlet-alpha": alpha, "seed": seed, "train.learning-rate": lr,
           "strategy.num-rounds": rounds, "data.validation-fraction": validation, **config}
    run = folder / (cfg.get("output.run-name") or Cell(method, epsilon, alpha, seed).name)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg))
    last = rounds if complete else rounds - 1
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "wall-seconds", "accuracy", "loss", "eval-examples",
                         "train-loss", "epsilon-mean", "epsilon-max", "bytes-up", "bytes-down"])
        for r in range(last + 1):
            acc = final * r / rounds
            writer.writerow([r, 10.0 * r, acc, 3 - acc, 40 if r < rounds else 60,
                             "" if r == 0 else 1.0, "" if r == 0 else 0.5 * r,
                             "" if r == 0 else r, "" if r == 0 else 1000,
                             "" if r == 0 else 2000])
    return run


# --- cells, resume rule, failures ---------------------------------------------------------------

def test_cell_names_and_grid_order():
    assert Cell("fedsvd", INF, 0.5, 0).name == "fedsvd-epsinf-a0.5-seed0"
    assert Cell("ffa", 6.0, 1.0, 2).name == "ffa-eps6-a1-seed2"
    assert Cell("flora", 3.0, 0.1, 1, lr=0.5, validation_fraction=0.1).name == \
        "flora-eps3-a0.1-seed1-lr0.5"
    cells = grid(["fedsvd", "ffa"], [INF, 1.0], [0.5], [0, 1], {"ffa": 2.0})
    assert [c.name for c in cells[:4]] == ["fedsvd-epsinf-a0.5-seed0", "ffa-epsinf-a0.5-seed0",
                                           "fedsvd-eps1-a0.5-seed0", "ffa-eps1-a0.5-seed0"]
    assert len(cells) == 8 and {c.lr for c in cells} == {None, 2.0}
    assert len(grid(["fedsvd", "fedsvd"], [6.0], [0.5], [0])) == 1


def test_cell_keys_win_over_the_sweep_overrides(tmp_path):
    cell = Cell("rolora", INF, 0.3, 4, lr=0.25)
    cfg = cell_config(sweep_cells.run_config_items(
        cell, tmp_path, ["privacy.epsilon=3 strategy.num-rounds=2 train.learning-rate=9"]))
    assert (cfg.strategy.name, cfg.privacy.epsilon, cfg.data.dirichlet_alpha, cfg.seed) == \
        ("rolora", INF, 0.3, 4)
    assert cfg.train.learning_rate == 0.25 and cfg.strategy.num_rounds == 2
    assert cfg.output.run_name == cell.name and Path(cfg.output.dir) == tmp_path.resolve()


def test_a_cell_is_complete_only_with_its_final_round(tmp_path):
    assert not is_complete(tmp_path / "nothing", 2)
    partial = write_run(tmp_path, seed=1, complete=False)
    done = write_run(tmp_path, seed=2)
    assert not is_complete(partial, 2)
    assert is_complete(done, 2) and not is_complete(done, 3)
    (partial / "metrics.csv").write_text("round,accuracy\n0,0.1\n1,")  # torn write
    assert not is_complete(partial, 2)


def fake_runner(fail=(), accuracy=lambda cfg: 0.5):
    """Stands in for flwr: writes the run folder that the cell's config asks for."""
    calls = []

    def run(items, log):
        cfg = cell_config(items)
        calls.append(cfg)
        log.write_text("flwr output\n")
        if cfg.run_name in fail:
            raise RuntimeError("boom")
        write_run(Path(cfg.output.dir), method=cfg.strategy.name, epsilon=cfg.privacy.epsilon,
                  alpha=cfg.data.dirichlet_alpha, seed=cfg.seed, lr=cfg.train.learning_rate,
                  rounds=cfg.strategy.num_rounds, final=accuracy(cfg),
                  validation=cfg.data.validation_fraction,
                  **{"output.run-name": cfg.run_name})
        return 0
    run.calls = calls
    return run


def test_sweep_skips_complete_cells_survives_a_failure_and_reports_it(tmp_path):
    out = tmp_path / "sweep"
    cells = grid(["fedsvd", "ffa"], [6.0], [0.5], [0, 1])
    write_run(out, method="fedsvd", seed=0)  # complete before the sweep: skipped
    lines = []
    runner = fake_runner(fail={"ffa-eps6-a0.5-seed0"})
    outcomes = run_cells(cells, out, overrides=["strategy.num-rounds=2"], runner=runner,
                         command="python -m simulations.sweep", say=lines.append)
    assert [o.status for o in outcomes] == ["skipped", "failed", "done", "done"]
    assert [c.run_name for c in runner.calls] == [c.name for c in cells[1:]]
    assert "RuntimeError: boom" in outcomes[1].detail
    assert "Traceback" in (out / "logs" / "ffa-eps6-a0.5-seed0.log").read_text()
    assert "1 already complete, 3 to run" in lines[0]
    assert any(line.startswith("[4/4] ffa-eps6-a0.5-seed1 DONE") and "ETA" in line
               for line in lines)
    attempts = list(csv.DictReader((out / ATTEMPTS_FILE).open()))
    assert [a["status"] for a in attempts] == ["failed", "done", "done"]
    assert sweep_cells.report_outcomes(outcomes, say=lines.append) == 1
    # Rerunning resumes: only the failed cell runs again.
    runner = fake_runner()
    run_cells(cells, out, overrides=["strategy.num-rounds=2"], runner=runner, command="c",
              say=lines.append)
    assert [c.run_name for c in runner.calls] == ["ffa-eps6-a0.5-seed0"]


def test_a_stop_file_ends_the_sweep_after_the_running_cell_and_the_same_command_goes_on(
        tmp_path, capsys):
    stop = tmp_path / "STOP"
    runner = fake_runner()

    def run_then_ask_to_stop(items, log):  # the stop file appears while cell 2 runs
        code = runner(items, log)
        if len(runner.calls) == 2:
            stop.touch()
        return code

    lr_file, out = tmp_path / "lr.toml", tmp_path / "sweep"
    argv = ["--tune-lr", "--methods", "fedsvd,ffa", "--lrs", "0.5,1", "--out", str(out),
            "--lr-file", str(lr_file), "--run-config", "strategy.num-rounds=2",
            "--stop-file", str(stop)]
    assert sweep.main(argv, runner=run_then_ask_to_stop) == sweep_cells.STOPPED_EXIT_CODE
    printed = capsys.readouterr().out
    assert len(runner.calls) == 2 and not lr_file.exists()
    assert "STOPPED on request: 2 cell(s) not run" in printed
    assert printed.rstrip().endswith(f"{lr_file} not written")
    stop.unlink()
    assert sweep.main(argv, runner=runner) == 0  # the same command: the two cells left
    assert len(runner.calls) == 4 and lr_file.is_file()


def test_the_recorded_command_leaves_out_the_stop_file():
    argv = ["--seeds", "0,1", "--stop-file", "/tmp/STOP", "--run-config", "a=1 b='x y'",
            "--stop-file=/tmp/OTHER"]
    assert sweep.reproducing_command(argv) == (
        "python -m simulations.sweep --seeds 0,1 --run-config 'a=1 b='\"'\"'x y'\"'\"''")


def test_complete_runs_with_other_settings_stop_the_sweep(tmp_path):
    write_run(tmp_path, method="fedsvd", seed=0, **{"train.local-steps": 99})
    now = TrainConfig().local_steps
    with pytest.raises(ValueError, match=f"train.local-steps: 99 there, {now} now"):
        run_cells(grid(["fedsvd"], [6.0], [0.5], [0]), tmp_path,
                  overrides=["strategy.num-rounds=2"], runner=fake_runner(), command="c",
                  say=print)


def test_cell_output_goes_to_its_log_file(tmp_path):
    log = tmp_path / "cell.log"
    with console.output_to(log):
        subprocess.run(["echo", "from a child"], check=True)
    assert log.read_text() == "from a child\n"


# --- tidy CSV, intervals, table, README ---------------------------------------------------------

FINALS = {("fedsvd", INF): [0.6, 0.7, 0.8], ("fedsvd", 6.0): [0.2, 0.3, 0.4],
          ("ffa", INF): [0.5, 0.5, 0.8], ("ffa", 6.0): [0.1]}


def synthetic_sweep(folder: Path) -> Path:
    for (method, eps), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_run(folder, method=method, epsilon=eps, seed=seed, final=final)
    write_run(folder, method="ffa", epsilon=6.0, seed=1, complete=False)  # failed cell
    return folder


def test_t_interval_matches_the_t_quantile_by_hand_and_scipy():
    mean, half = t_interval([0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t_{0.975, 2} = 4.3027
    low, high = stats.t.interval(0.95, 2, loc=0.3, scale=0.1 / math.sqrt(3))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert math.isnan(t_interval([0.5])[1])


def test_tidy_rows_final_accuracies_and_table(tmp_path):
    runs = load_runs(synthetic_sweep(tmp_path))
    assert runs.incomplete == ("ffa-eps6-a0.5-seed1",)
    assert len(runs.tidy) == 10 * 3  # 10 complete runs × rounds 0, 1, 2
    assert {"method", "epsilon", "alpha", "seed", "round", "accuracy", "loss", "epsilon_mean",
            "epsilon_max", "bytes_up", "bytes_down", "wall_seconds", "eval_split"} <= set(
        runs.tidy.columns)
    assert set(runs.tidy["eval_split"]) == {"test"}
    summary = summarize(runs.final).set_index(["method", "epsilon"])
    ffa_inf = np.array([0.5, 0.5, 0.8])
    want = stats.t.ppf(0.975, 2) * ffa_inf.std(ddof=1) / math.sqrt(3)
    assert summary.loc[("ffa", INF), "ci95"] == pytest.approx(want)
    assert summary.loc[("ffa", INF), "mean"] == pytest.approx(0.6)
    assert summary.loc[("ffa", 6.0), "n"] == 1
    table = markdown_table(summarize(runs.final))
    assert table.splitlines()[0] == "| method | ε = ∞ | ε = 6 |"
    assert "| fedsvd | 0.7000 ± 0.2484 | 0.3000 ± 0.2484 |" in table
    assert "| ffa | 0.6000 ± 0.4303 | 0.1000 (n = 1) |" in table


def test_paired_differences_match_per_seed_subtraction_by_hand(tmp_path):
    runs = load_runs(synthetic_sweep(tmp_path))
    paired = paired_differences(runs.final).set_index(["method", "epsilon"])
    # ε = ∞: fedsvd − ffa per seed = 0.1, 0.2, 0.0; ε = 6: only seed 0 is paired (0.2 − 0.1)
    assert paired.loc[("ffa", INF), "mean"] == pytest.approx(0.1)
    assert paired.loc[("ffa", INF), "ci95"] == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert paired.loc[("ffa", 6.0), "mean"] == pytest.approx(0.1)
    assert paired.loc[("ffa", 6.0), "n"] == 1
    assert "fedsvd" not in paired.index.get_level_values("method")
    assert paired_differences(runs.final[runs.final["method"] == "ffa"]).empty


def test_runs_with_different_settings_are_not_mixed(tmp_path):
    write_run(tmp_path, seed=0)
    write_run(tmp_path, seed=1, **{"model.max-length": 32})
    with pytest.raises(ValueError, match="model.max-length: 32, 64"):
        load_runs(tmp_path)


def test_a_setting_missing_from_an_older_run_counts_as_its_default(tmp_path):
    old = write_run(tmp_path, seed=0)
    config = json.loads((old / "config.json").read_text())
    del config["strategy.merged-adapter"]  # written before the key existed
    (old / "config.json").write_text(json.dumps(config))
    write_run(tmp_path, seed=1)
    assert len(load_runs(tmp_path).final) == 2
    write_run(tmp_path, seed=2, **{"strategy.max-norm-ratio": 3.0})
    with pytest.raises(ValueError, match="strategy.max-norm-ratio: 10.0, 3.0"):
        load_runs(tmp_path)


def test_readme_markers_replace_only_what_is_between_them():
    text = f"intro\n{README_START}\nold table\n{README_END}\nrest {README_END[:4]}\n"
    assert replace_between_markers(text, "new\n") == \
        f"intro\n{README_START}\nnew\n{README_END}\nrest {README_END[:4]}\n"
    for broken in ("no markers", f"{README_END}\n{README_START}", README_START * 2 + README_END):
        with pytest.raises(ValueError, match="sweep-table"):
            replace_between_markers(broken, "x")


def test_named_markers_keep_several_tables_on_one_page(tmp_path):
    """Each table goes between its own markers; the other tables of the page stay as they are."""
    side_start, side_end = table_markers("side-eps")
    assert (side_start, side_end) == ("<!-- sweep-table:start side-eps -->",
                                      "<!-- sweep-table:end side-eps -->")
    assert table_markers() == (README_START, README_END)
    page = (f"{README_START}\nmain table\n{README_END}\n\n{side_start}\nold side\n{side_end}\n")
    assert replace_between_markers(page, "new side", (side_start, side_end)) == (
        f"{README_START}\nmain table\n{README_END}\n\n{side_start}\nnew side\n{side_end}\n")
    assert replace_between_markers(page, "new main") == (
        f"{README_START}\nnew main\n{README_END}\n\n{side_start}\nold side\n{side_end}\n")
    for bad in ("", " side", "a -- b"):
        with pytest.raises(ValueError, match="table name"):
            table_markers(bad)
    folder = synthetic_sweep(tmp_path / "sweep")
    readme = tmp_path / "page.md"
    readme.write_text(page)
    write_report(folder, readme=readme, table="side-eps")
    text = readme.read_text()
    assert "main table" in text and "old side" not in text and "| method |" in text
    with pytest.raises(ValueError, match="sweep-table:start other"):  # no such markers: refused
        write_report(folder, readme=readme, table="other")
    assert sweep.main(["--report-only", "--out", str(folder), "--table", "side-eps"]) == 2


def test_report_writes_csv_plots_table_and_readme(tmp_path):
    folder = synthetic_sweep(tmp_path / "sweep")
    (folder / ATTEMPTS_FILE).write_text("finished,run,status,seconds,command\n"
                                        "t,a,done,3600,python -m simulations.sweep --seeds 0\n"
                                        "t,b,failed,60,python -m simulations.sweep --seeds 0\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\n{README_END}\n\n## next\n")
    written = write_report(folder, readme=readme)
    tidy = pd.read_csv(written["tidy"])
    assert len(tidy) == 30 and math.isinf(tidy["epsilon"].max())
    pngs = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert pngs == ["accuracy_vs_epsilon_a0.5.png", "accuracy_vs_round_a0.5.png",
                    "bytes_per_round.png"]
    assert all((tmp_path / "_static" / "sweep" / p).stat().st_size > 1000 for p in pngs)
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{README_END}\n\n## next\n")
    assert "python -m simulations.sweep --seeds 0" in text
    assert "**1 h 01 min** (2 cell runs)" in text
    assert "| fedsvd | 0.7000 ± 0.2484 | 0.3000 ± 0.2484 |" in text
    assert "](_static/sweep/bytes_per_round.png)" in text
    static_csv = pd.read_csv(tmp_path / "_static" / "sweep" / "sweep.csv")
    assert len(static_csv) == len(pd.read_csv(tmp_path / "sweep" / "sweep.csv"))
    assert (tmp_path / "_static" / "sweep" / "summary.csv").is_file()
    assert "Final test accuracy" in (folder / "results.md").read_text()
    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("# nothing to replace\n")
    assert sweep.report(folder, no_markers) == 1
    assert no_markers.read_text() == "# nothing to replace\n"


# --- learning rates, chosen on the validation split ---------------------------------------------

def test_choose_learning_rates_best_mean_then_lower_loss():
    final = pd.DataFrame({
        "method": ["fedsvd"] * 4 + ["ffa"] * 3,
        "learning_rate": [0.5, 0.5, 1.0, 1.0, 0.5, 1.0, 2.0],
        "accuracy": [0.4, 0.6, 0.3, 0.5, 0.7, 0.7, 0.2],
        "loss": [1.0, 1.0, 1.0, 1.0, 2.0, 1.5, 1.0],
    })
    chosen, incomplete = sweep_lr.choose_learning_rates(final, [0.5, 1.0, 2.0])
    assert incomplete == ["fedsvd"]  # no run at lr 2
    assert chosen["ffa"]["learning-rate"] == 1.0  # tie at 0.7: lower validation loss
    assert chosen["ffa"]["validation-accuracy"] == [0.7, 0.7, 0.2]
    chosen, _ = sweep_lr.choose_learning_rates(final, [0.5, 1.0])
    assert chosen["fedsvd"]["learning-rate"] == 0.5 and chosen["fedsvd"]["runs-per-rate"] == 2


def test_a_causal_lm_s_rate_is_chosen_by_the_lowest_validation_loss(tmp_path):
    final = pd.DataFrame({"method": ["fedsvd"] * 3, "learning_rate": [0.25, 1.0, 4.0],
                          "accuracy": [0.279, 0.281, 0.270], "loss": [4.10, 4.17, 4.60]})
    chosen, _ = sweep_lr.choose_learning_rates(final, [0.25, 1.0, 4.0], by="loss")
    assert chosen["fedsvd"]["learning-rate"] == 0.25  # not 1.0, whose accuracy is higher
    assert chosen["fedsvd"]["validation-loss"] == [4.1, 4.17, 4.6]
    assert chosen["fedsvd"]["chosen-by"] == "loss"
    assert sweep_lr.choose_learning_rates(final, [0.25, 1.0, 4.0])[0]["fedsvd"][
        "learning-rate"] == 1.0
    conf = tmp_path / "clm.toml"
    conf.write_text('model.task = "causal-lm"\n')
    assert sweep.tuning_criterion([str(conf)]) == "loss"
    assert sweep.tuning_criterion(["strategy.num-rounds=2"]) == "accuracy"


def test_learning_rate_file_round_trip_keeps_other_methods(tmp_path):
    path = tmp_path / "lr.toml"
    sweep_lr.write_learning_rates(path, {"ffa": {"learning-rate": 2.0}}, {"command": 'a "b"'})
    sweep_lr.write_learning_rates(path, {"fedsvd": {"learning-rate": 0.5, "grid": [0.5, 1.0]}},
                                  {"command": "c"})
    assert sweep_lr.learning_rates_for(path, ["fedsvd", "ffa"]) == {"fedsvd": 0.5, "ffa": 2.0}
    assert sweep_lr.read_learning_rates(path)["ffa"]["command"] == 'a "b"'
    with pytest.raises(ValueError, match="no learning rate for flora"):
        sweep_lr.learning_rates_for(path, ["flora"])
    with pytest.raises(ValueError, match="tuning on the test split is not allowed"):
        sweep_lr.tuning_grid(["fedsvd"], [6.0], [0.5], [0], [1.0], 0.0)


def test_tune_on_validation_then_sweep_with_the_chosen_rates(tmp_path, capsys):
    best = {"fedsvd": 0.5, "ffa": 2.0}
    runner = fake_runner(
        accuracy=lambda c: 0.9 - abs(c.train.learning_rate - best[c.strategy.name]))
    lr_file, out = tmp_path / "lr.toml", tmp_path / "sweep"
    common = ["--methods", "fedsvd,ffa", "--out", str(out), "--lr-file", str(lr_file),
              "--run-config", "strategy.num-rounds=2"]
    assert sweep.main([*common, "--tune-lr", "--lrs", "0.5,1,2"], runner=runner) == 0
    assert len(runner.calls) == 6
    assert all(c.data.validation_fraction == 0.1 and c.privacy.epsilon == 6 and c.seed == 0
               for c in runner.calls)
    assert sweep_lr.learning_rates_for(lr_file, ["fedsvd", "ffa"]) == best
    assert "learning rate 0.5" in (out / "lr-tuning" / "results.md").read_text()
    runner.calls.clear()
    assert sweep.main([*common, "--epsilons", "inf,1", "--seeds", "0,1"], runner=runner) == 0
    assert {(c.strategy.name, c.train.learning_rate) for c in runner.calls} == set(best.items())
    assert all(c.data.validation_fraction == 0 for c in runner.calls)
    assert len(runner.calls) == 8 and (out / "results.md").is_file()
    assert "lr-tuning" not in set(pd.read_csv(out / "sweep.csv")["run"])
    assert "| ffa | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 |" in capsys.readouterr().out


# --- the validation split (common.data) ---------------------------------------------------------

def test_validation_split_is_seeded_disjoint_and_carved_before_partitioning(tiny_run_config):
    from collections import Counter

    from common.data import load_corpus, load_partition

    def data(**kv):
        return AppConfig.from_run_config({**tiny_run_config, **kv}).data

    plain = load_corpus(data(), 0)
    tuned = data(**{"data.validation-fraction": 0.2})
    corpus = load_corpus(tuned, 0)
    assert (plain.eval_split, corpus.eval_split) == ("test", "validation")
    assert len(corpus.test) == round(0.2 * len(plain.train))
    # train' + validation is exactly the old train split; the test split is not among them.
    assert Counter(corpus.train["text"]) + Counter(corpus.test["text"]) == \
        Counter(plain.train["text"])
    rows = pd.read_csv(tiny_run_config["data.source"])
    assert Counter(corpus.train["text"]) + Counter(corpus.test["text"]) + \
        Counter(plain.test["text"]) == Counter(rows["body"])
    # Seeded: the same seed carves the same share, another seed another one.
    assert load_corpus.__wrapped__(tuned, 0).test["text"] == corpus.test["text"]
    assert load_corpus.__wrapped__(tuned, 1).test["text"] != corpus.test["text"]
    # Before partitioning: the clients' training shares cover train' only.
    parts = [load_partition.__wrapped__(tuned, 0, i, 3) for i in range(3)]
    assert sorted(t for p in parts for t in p[0]["text"]) == sorted(corpus.train["text"])
    assert sorted(t for p in parts for t in p[1]["text"]) == sorted(corpus.test["text"])


def test_max_client_examples_takes_a_subset_of_each_partition(tiny_run_config):
    from common.data import load_partition

    def data(**kv):
        return AppConfig.from_run_config({**tiny_run_config, **kv}).data

    for i in range(3):
        full = load_partition.__wrapped__(data(), 0, i, 3)[0]["text"]
        capped = load_partition.__wrapped__(data(**{"data.max-client-examples": 7}), 0, i, 3)
        assert len(capped[0]) == 7 and set(capped[0]["text"]) <= set(full)
    with pytest.raises(ValueError, match="data.validation-fraction=1.0: must be in"):
        data(**{"data.validation-fraction": 1.0})


# --- through Flower ----------------------------------------------------------------------------

TINY_KEYS = ("model.path", "model.max-length", "data.source", "data.text-column",
             "data.label-column", "data.max-eval-examples", "data.partitioner",
             "train.batch-size", "train.local-steps", "lora.r", "lora.alpha",
             "data.min-test-examples")


def _tiny_sweep_args(tiny_run_config, out: Path, methods: str) -> list[str]:
    overrides = override_text({k: tiny_run_config[k] for k in TINY_KEYS})
    return ["--methods", methods, "--epsilons", "6", "--seeds", "0", "--out", str(out),
            "--num-supernodes", "3", "--run-config", overrides + " strategy.num-rounds=1",
            "--cell-timeout", "300"]


@pytest.mark.skipif(not os.environ.get("SWEEP_SMOKE"),
                    reason="two Flower runs, about 2.5 min on 2 cores: set SWEEP_SMOKE=1")
def test_tiny_sweep_through_flower_builds_the_report(tiny_run_config, tmp_path):
    out = tmp_path / "sweep"
    args = [*_tiny_sweep_args(tiny_run_config, out, "fedsvd,ffa"), "--lr-file", "none"]
    assert sweep.main(args) == 0
    tidy = pd.read_csv(out / "sweep.csv")
    assert sorted(set(tidy["run"])) == ["fedsvd-eps6-a0.5-seed0", "ffa-eps6-a0.5-seed0"]
    assert sorted(tidy["round"]) == [0, 0, 1, 1]
    trained = tidy[tidy["round"] == 1]
    assert (trained["bytes_up"] > 0).all() and (trained["epsilon_max"] <= 6).all()
    assert "| fedsvd | " in (out / "results.md").read_text()
    assert (out / "plots" / "accuracy_vs_epsilon_a0.5.png").is_file()
    assert "fedsvd-eps6-a0.5-seed0" in (out / "logs" / "fedsvd-eps6-a0.5-seed0.log").read_text()


def test_tiny_lr_tuning_through_flower_evaluates_on_the_validation_split(tiny_run_config,
                                                                          tmp_path):
    from common.data import load_corpus

    out, lr_file = tmp_path / "sweep", tmp_path / "lr.toml"
    args = [*_tiny_sweep_args(tiny_run_config, out, "fedsvd"), "--tune-lr", "--lrs", "0.5",
            "--validation-fraction", "0.2", "--lr-file", str(lr_file)]
    assert sweep.main(args) == 0
    assert sweep_lr.learning_rates_for(lr_file, ["fedsvd"]) == {"fedsvd": 0.5}
    rows = list(csv.DictReader((out / "lr-tuning" / "fedsvd-eps6-a0.5-seed0-lr0.5" /
                                "metrics.csv").open()))
    cfg = AppConfig.from_run_config({**tiny_run_config, "data.validation-fraction": 0.2})
    validation = load_corpus(cfg.data, cfg.seed).test
    assert int(rows[-1]["eval-examples"]) == len(validation)  # not the test split's size


@pytest.mark.parametrize(("share", "flagged"), [("0.995", True), ("0.62", False), ("", False)])
def test_a_finished_cell_line_flags_a_final_model_with_one_answer(tmp_path, share, flagged):
    # The one-answer WARNING is in the cell's log; the sweep's own line must not hide it
    (tmp_path / "metrics.csv").write_text(
        "round,accuracy,balanced-accuracy,most-predicted-share\n"
        f"0,0.2,0.25,0.7\n1,0.861,0.5,{share}\n")
    text = sweep_cells._final_result(tmp_path)
    assert text.startswith(": final accuracy 0.8610 (balanced 0.5000)")
    assert ("ONE ANSWER: the final model gives one class to 99.5% of the examples" in text) \
        == flagged
    (tmp_path / "metrics.csv").write_text("round,accuracy,balanced-accuracy,auc\n"
                                          "1,0.861,0.5,0.987\n")
    assert sweep_cells._final_result(tmp_path) == (": final accuracy 0.8610 "
                                                   "(balanced 0.5000, AUC 0.9870)")
    # Older records have none of these columns
    (tmp_path / "metrics.csv").write_text("round,accuracy\n0,0.2\n1,0.4\n")
    assert sweep_cells._final_result(tmp_path) == ": final accuracy 0.4000"


def _dry_run_rates(capsys, *extra: str) -> dict[str, str]:
    argv = ["--methods", "fedsvd,fedavg,ffa", "--epsilons", "3", "--seeds", "0", "--dry-run",
            "--out", "/nonexistent/sweep", *extra]
    assert sweep.main(argv, runner=lambda *a, **k: 0) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "  lr " in line]
    return {line[0].split("-")[0]: line[2] for line in lines}


def test_without_an_lr_file_each_method_gets_its_run_configs_rate(capsys):
    """The baselines' tuned rates live once, in their run configs; FedSVD's in pyproject."""
    assert _dry_run_rates(capsys) == {"fedsvd": "(run", "fedavg": "0.5", "ffa": "2"}
    everyone = _dry_run_rates(capsys, "--run-config", "train.learning-rate=0.3")
    assert set(everyone.values()) == {"(run"}  # a rate in the run config is for every method
    assert sweep_lr.method_conf_rates(["fedsvd", "flora"]) == {"flora": 0.25}


def test_tuning_needs_a_file_to_write_its_rates_to(capsys):
    argv = ["--tune-lr", "--methods", "fedsvd", "--dry-run", "--out", "/nonexistent/sweep"]
    assert sweep.main(argv, runner=lambda *a, **k: 0) == 2
    assert "--tune-lr writes the chosen rates: name the file with --lr-file" in (
        capsys.readouterr().err)
