"""Two record folders of the same cells, paired cell by cell."""

import pytest

from simulations import compare_records
from simulations.experiments.cells import write_record
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
    assert rows[0].startswith(f"| `{base}` | 3 | 0.5000 | (reference) |")
    assert rows[1].startswith(f"| `{better}` | 3 | 0.6000 | +0.1000 ± 0.0000 |")
    assert rows[2].startswith(f"| `{single}` | 1 | 0.3000 | -0.1000 (n = 1) |")


def test_no_common_cell_exits_1(tmp_path):
    first = _record(tmp_path, "a", [0.5])
    second = tmp_path / "b"
    (second / "cells").mkdir(parents=True)
    assert compare_records.main([str(first), str(second)]) == 1
    assert compare_records.main([str(first), str(first), str(second)]) == 1
    assert compare_records.main([str(first), str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit):
        compare_records.main(["--help"])
