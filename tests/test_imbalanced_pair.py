"""The imbalanced two-topic file: the minority cut to its share, seeded, nothing else touched."""

import json

import pytest

from tests.helpers import experiment_script

imbalanced_pair = experiment_script("experiments/binary-check/imbalanced_pair.py")
cut_minority = imbalanced_pair.cut_minority


def test_cut_minority_keeps_every_other_row_and_a_seeded_share():
    rows = [(f"a{i}", "comp") for i in range(87)] + [(f"b{i}", "rec") for i in range(60)]
    cut = cut_minority(rows, "rec", 0.13, seed=3)
    kept = [text for text, label in cut if label == "rec"]
    assert len(kept) == round(0.13 * 87 / 0.87) == 13
    assert [row for row in cut if row[1] == "comp"] == rows[:87]  # all kept, in order
    assert set(kept) <= {text for text, _ in rows[87:]}
    assert cut == cut_minority(rows, "rec", 0.13, seed=3)  # the seed decides which
    assert kept != [t for t, label in cut_minority(rows, "rec", 0.13, seed=4) if label == "rec"]
    for share in (0.0, 0.6, -0.1):
        with pytest.raises(ValueError, match="minority-share"):
            cut_minority(rows, "rec", share)
    with pytest.raises(ValueError, match="fewer than the 87"):
        cut_minority(rows, "rec", 0.5)


def test_the_file_has_the_sms_share_of_rec_and_is_not_overwritten(tmp_path):
    out = tmp_path / "comp-rec.jsonl"
    assert imbalanced_pair.main([str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rec = sum(r["label"] == "rec" for r in rows)
    assert {r["label"] for r in rows} == {"comp", "rec"}
    assert rec / len(rows) == pytest.approx(imbalanced_pair.SMS_MINORITY_SHARE, abs=1e-3)
    assert all(r["text"].strip() for r in rows)
    before = out.read_bytes()
    assert imbalanced_pair.main([str(out)]) == 1 and out.read_bytes() == before
