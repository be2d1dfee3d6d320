"""The SMS Spam Collection export: the user's-own-file check of the defaults reads it unchanged."""

from pathlib import Path

import pytest

from common.data_files import read_table
from tests.helpers import experiment_script

sms_spam = experiment_script("experiments/sms-check/sms_spam.py")


def _read(path: Path):
    return read_table(str(path), key="data.source", text_column="text", label_column="label",
                      drop_missing=False)


def test_the_exported_csv_is_every_message_with_its_label(tmp_path: Path) -> None:
    out = tmp_path / "sms.csv"
    assert sms_spam.main([str(out)]) == 0
    table = _read(out)
    source = sms_spam.read_sms(sms_spam.packaged_sms_file())
    assert list(zip(table.texts, table.labels, strict=True)) == source
    assert len(source) == 5574 and sum(label == "spam" for _, label in source) == 747


def test_numeric_labels_rename_ham_0_and_spam_1_and_keep_the_order(tmp_path: Path) -> None:
    named, numeric = tmp_path / "named.csv", tmp_path / "numeric.csv"
    assert sms_spam.main([str(named)]) == 0
    assert sms_spam.main([str(numeric), "--numeric-labels"]) == 0
    a, b = _read(named), _read(numeric)
    assert a.texts == b.texts
    assert [{"ham": "0", "spam": "1"}[label] for label in a.labels] == b.labels


def test_an_existing_file_is_kept_without_overwrite(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.csv"
    out.write_text("text,label\nmy own,row\n")
    assert sms_spam.main([str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "text,label\nmy own,row\n"
    assert sms_spam.main([str(out), "--overwrite"]) == 0
    assert len(_read(out).texts) == 5574


def test_a_malformed_line_is_refused_with_its_number(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tfine\nnot a label line\n")
    with pytest.raises(ValueError, match="line 2"):
        sms_spam.read_sms(bad)
