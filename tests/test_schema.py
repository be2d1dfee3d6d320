"""The results schema: one home for every metrics.csv column, enforced where rows are written."""

import csv

import pytest

from common import schema
from server.results import write_metrics


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
