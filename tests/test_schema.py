"""The results schema: one home for every metrics.csv column, enforced where rows are written."""

import csv

import pytest

from common import schema
from server.results import write_metrics
from simulations import compare_records, summarize
from simulations.reports.records import RECORD_COLUMNS, load_runs
from simulations.reports.tables import write_report
from tests.test_sweep import synthetic_sweep


def test_columns_are_unique_typed_and_explained():
    assert len(set(schema.COLUMN_NAMES)) == len(schema.COLUMNS)
    assert all(c.type in (int, float, str) and c.meaning for c in schema.COLUMNS)
    assert schema.TRAINING_COLUMNS[0] == schema.TRAIN_LOSS
    assert schema.WEIGHTS_CAPPED in schema.TRAINING_COLUMNS
    assert schema.ACCURACY not in schema.TRAINING_COLUMNS


def test_metrics_are_written_in_schema_order_and_unknown_columns_refused(tmp_path):
    rows = [{"round": 0, "accuracy": 0.1, "wall-seconds": 1.0},
            {"round": 1, "bytes-up": 5, "train-loss": 2.0, "wall-seconds": 2.0}]
    write_metrics(tmp_path / "m.csv", rows)
    header = next(csv.reader((tmp_path / "m.csv").open()))
    assert header == ["round", "wall-seconds", "accuracy", "train-loss", "bytes-up"]
    with pytest.raises(ValueError, match=r"\['acuracy'\] are not in the results schema"):
        write_metrics(tmp_path / "bad.csv", [{"round": 0, "acuracy": 0.1}])
    assert not (tmp_path / "bad.csv").exists()


def test_round_training_metrics_by_round_and_only_training_columns():
    board = schema.RoundTrainingMetrics()
    board.record(2, {"clients-trained": 0, "replies-failed": 3})
    assert board.of(2) == {"clients-trained": 0, "replies-failed": 3}
    assert board.of(1) == {}
    board.of(2)["clients-trained"] = 9  # a copy
    assert board.of(2)["clients-trained"] == 0
    with pytest.raises(ValueError, match="accuracy"):
        board.record(3, {"accuracy": 0.5})


def test_the_sweep_tables_columns_are_unique_typed_and_apart_from_the_metrics():
    tidy_metrics = {schema.tidy_name(name) for name in schema.COLUMN_NAMES}
    assert len(set(schema.TABLE_COLUMN_NAMES)) == len(schema.TABLE_COLUMNS)
    assert all(c.type in (int, float, str) and c.meaning for c in schema.TABLE_COLUMNS)
    assert not set(schema.TABLE_COLUMN_NAMES) & tidy_metrics
    assert all(name.isidentifier() for name in tidy_metrics | set(schema.TABLE_COLUMN_NAMES))


def test_every_column_the_reports_write_is_a_schema_name(tmp_path):
    """sweep.csv, summary.csv, paired.csv, a record's and compare_records' columns."""
    names = {*schema.TABLE_COLUMN_NAMES, *map(schema.tidy_name, schema.COLUMN_NAMES)}
    written = write_report(synthetic_sweep(tmp_path / "sweep"))
    headers = {key: next(csv.reader(written[key].open())) for key in ("tidy", "summary", "paired")}
    for key, header in headers.items():
        assert set(header) <= names, f"{key}: {set(header) - names} not in common.schema"
    (tmp_path / "empty").mkdir()
    assert list(load_runs(tmp_path / "empty").tidy.columns) == headers["tidy"]  # no run
    assert set(RECORD_COLUMNS) <= set(schema.TABLE_COLUMN_NAMES)
    assert set(compare_records.METRICS) <= names
    assert {column for column, _, _ in summarize.COLUMNS} <= set(schema.COLUMN_NAMES)
