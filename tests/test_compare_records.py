"""Two record folders of the same cells, paired cell by cell."""

import pytest

from simulations import compare_records
from simulations.experiments.record_folder import write_record
from tests.test_sweep import write_run


def _record(tmp_path, name, finals):
    out, rec = tmp_path / f"{name}-runs", tmp_path / name
    for seed, final in enumerate(finals):
        write_record(write_run(out, seed=seed, final=final), rec)
    return rec


def test_pairs_cells_by_name_and_reports_the_paired_interval(tmp_path, capsys):
    first = _record(tmp_path, "after", [0.5, 0.6, 0.7])
    second = _record(tmp_path, "before", [0.4, 0.6, 0.5, 0.9])  # seed 3 has no pair
    pairs = compare_records.paired_rows(first, second)
    assert list(pairs["run"]) == [f"fedsvd-eps6-a0.5-seed{s}" for s in range(3)]
    assert compare_records.main([str(second), str(first)]) == 0
    out = capsys.readouterr().out
    assert "this − first: +0.1000 ±" in out and "n = 3" in out


def test_several_folders_each_paired_with_the_first_in_one_markdown_table(tmp_path, capsys):
    base = _record(tmp_path, "base", [0.4, 0.6, 0.5])
    better = _record(tmp_path, "better", [0.5, 0.7, 0.6])
    single = _record(tmp_path, "single", [0.3])
    assert compare_records.main([str(base), str(better), str(single), "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert rows[0].startswith(f"| `{base}` | 3 | 0.5000 | | (reference) |")
    assert rows[1].startswith(f"| `{better}` | 3 | 0.6000 | 0.5000 | +0.1000 ± 0.0000 |")
    # the first folder's mean over the one paired cell (seed 0: 0.4), not over its three
    assert rows[2].startswith(f"| `{single}` | 1 | 0.3000 | 0.4000 | -0.1000 (n = 1) |")


def test_by_method_pairs_each_methods_cells_alone(tmp_path, capsys):
    def record(name, finals):
        out, rec = tmp_path / f"{name}-runs", tmp_path / name
        for method, values in finals.items():
            for seed, final in enumerate(values):
                write_record(write_run(out, method=method, seed=seed, final=final), rec)
        return rec

    first = record("first", {"fedsvd": [0.5, 0.6], "ffa": [0.4, 0.4]})
    other = record("other", {"fedsvd": [0.6, 0.7], "ffa": [0.1, 0.3]})
    assert compare_records.main([str(first), str(other), "--by-method"]) == 0
    out = capsys.readouterr().out
    assert "this − first: -0.0500 ±" in out and "n = 4" in out  # all four pairs
    assert "fedsvd     this 0.6500, first 0.5500: this − first +0.1000 ± 0.0000 (n = 2)" in out
    assert "ffa        this 0.2000, first 0.4000: this − first -0.2000 ± " in out


def test_no_common_cell_exits_1(tmp_path):
    first = _record(tmp_path, "a", [0.5])
    second = tmp_path / "b"
    (second / "cells").mkdir(parents=True)
    assert compare_records.main([str(first), str(second)]) == 1
    assert compare_records.main([str(first), str(first), str(second)]) == 1
    assert compare_records.main([str(first), str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit):
        compare_records.main(["--help"])


def test_pairs_another_final_metric_and_skips_cells_recorded_without_it(tmp_path, capsys):
    import pandas as pd

    def with_balanced(name, finals, balanced):
        out, rec = tmp_path / f"{name}-runs", tmp_path / name
        for seed, (final, value) in enumerate(zip(finals, balanced, strict=True)):
            run = write_run(out, seed=seed, final=final)
            metrics = pd.read_csv(run / "metrics.csv")
            metrics["balanced-accuracy"] = value
            metrics.to_csv(run / "metrics.csv", index=False)
            write_record(run, rec)
        return rec

    argmax = with_balanced("argmax", [0.87, 0.87, 0.87], [0.5, 0.5, 0.5])
    prior = with_balanced("prior", [0.70, 0.80, 0.75], [0.80, 0.70, 0.75])
    pairs = compare_records.paired_rows(argmax, prior, "balanced_accuracy")
    assert list(pairs["balanced_accuracy_second"]) == [0.80, 0.70, 0.75]
    assert compare_records.main([str(argmax), str(prior), "--metric", "balanced_accuracy",
                                 "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "final balanced_accuracy" in out and "this − first: +0.2500 ±" in out
    assert f"| `{prior}` | 3 | 0.7500 | 0.5000 | +0.2500 ± " in out
    assert compare_records.main([str(argmax), str(prior)]) == 0  # accuracy: 0.87 → 0.75
    assert "this − first: -0.1200 ±" in capsys.readouterr().out
    older = _record(tmp_path, "older", [0.5, 0.6, 0.7])  # written before the column existed
    assert compare_records.main([str(older), str(prior), "--metric", "balanced_accuracy"]) == 1
