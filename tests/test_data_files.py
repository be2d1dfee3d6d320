"""Bad data is refused before training, each problem naming the file, the key and the lines."""

import json
import logging

import pytest

from common.config import AppConfig
from common.data import check_partitions, label_order, load_corpus, load_partition
from common.data_files import DataError, read_table


def _cfg(tiny_run_config, path, **overrides) -> AppConfig:
    return AppConfig.from_run_config({**tiny_run_config, "data.source": str(path),
                                      "data.text-column": "text", "data.label-column": "label",
                                      **overrides})


def _csv(tmp_path, text: str | bytes, name: str = "data.csv"):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _rows(n: int, labels=("a", "b")) -> str:
    return "".join(f"text number {i},{labels[i % len(labels)]}\n" for i in range(n))


def _read(path, **kwargs):
    return read_table(str(path), key="data.source", text_column="text", label_column="label",
                      **kwargs)


@pytest.mark.parametrize(("content", "message"), [
    ("", "the file is empty"),
    ("  \n\n", "the file is empty"),
    ("text,label\n", "the file has a header but no rows"),
    (b"text,label\nfine,a\n\xff\xfe bad,b\n",
     "not UTF-8 text: byte 0xff on line 3 cannot be decoded; save the file as UTF-8"),
    ("text,label\nok,a\ntoo,many,fields\n",
     "line 3 has 3 fields, the header 2 (an unquoted comma?)"),
    ("text,text,label\na,b,c\n", "the header repeats column(s) ['text']"),
])
def test_unreadable_csv_is_refused_with_its_line(tmp_path, content, message):
    path = _csv(tmp_path, content)
    with pytest.raises(DataError) as caught:
        _read(path)
    assert str(caught.value) == f"unusable data:\n  data.source='{path}': {message}"


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read_whole(tmp_path):
    """A 200,000-character post (20 Newsgroups has some) is one valid field, not an error."""
    long_text = "word " * 40_000
    path = _csv(tmp_path, f'text,label\n"{long_text}",a\nshort,b\n')
    table = _read(path)
    assert table.texts == [long_text, "short"] and table.labels == ["a", "b"]


@pytest.mark.parametrize(("lines", "message"), [
    (['{"text": "a", "label": 1}', '{"text": "b", "label": 2'],
     "line 2 is not valid JSON (Expecting ',' delimiter, column 25); expected one JSON object "
     "per line (JSON Lines)"),
    (['{"text": "a", "label": 1}', '', '[1, 2]'],
     "line 3 is a JSON list, expected an object per line (JSON Lines)"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = _csv(tmp_path, "\n".join(lines) + "\n", "data.jsonl")
    with pytest.raises(DataError, match="line") as caught:
        _read(path)
    assert caught.value.problems == [f"data.source='{path}': {message}"]


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    path = _csv(tmp_path, "body,topic\nx,a\n")
    with pytest.raises(DataError) as caught:
        _read(path)
    assert caught.value.problems == [
        f"data.text-column='text': no such column in '{path}' (columns: body, topic)",
        f"data.label-column='label': no such column in '{path}' (columns: body, topic)"]


def test_missing_labels_are_counted_with_their_lines_or_dropped_when_asked(tmp_path, caplog):
    rows = ["text,label", "one,a", "two,", "three,b", ",b", "five,nan", "six,a"]
    path = _csv(tmp_path, "\n".join(rows) + "\n")
    with pytest.raises(DataError) as caught:
        _read(path)
    assert caught.value.problems == [
        f"data.source='{path}': 1 row(s) with an empty or missing text (data.text-column="
        "'text'), line(s) 5; fix them, or set data.drop-missing=true to drop them",
        f"data.source='{path}': 2 row(s) with an empty or missing label (data.label-column="
        "'label'), line(s) 3, 6; fix them, or set data.drop-missing=true to drop them"]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        table = _read(path, drop_missing=True)
    assert table.texts == ["one", "three", "six"] and table.lines == [2, 4, 7]
    assert "dropped 3 of 6 rows" in caplog.text and "first lines 3, 5, 6" in caplog.text


def test_integer_labels_stay_integers_and_sort_numerically(tmp_path):
    csv_path = _csv(tmp_path, "text,label\n" + _rows(4, labels=("10", "2")))
    assert sorted(set(_read(csv_path).labels)) == ["10", "2"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n"
                             for i, v in enumerate([1, 1.0, 0, None, 10])))
    assert _read(jsonl, drop_missing=True).labels == ["1", "1", "0", "10"]
    assert label_order({"10", "2", "0"}) == ("0", "2", "10")
    assert label_order({"b", "a", "10"}) == ("10", "a", "b")


def test_one_class_and_a_tiny_test_split_are_refused(tiny_run_config, tmp_path):
    one_class = _csv(tmp_path, "text,label\n" + _rows(200, labels=("only",)), "one.csv")
    with pytest.raises(DataError, match="the training split holds 1 class \\('only'\\)"):
        load_corpus(_cfg(tiny_run_config, one_class).data, 0)
    three = _csv(tmp_path, "text,label\nhello world,0\nfoo bar,1\nbaz,0\n", "three.csv")
    with pytest.raises(DataError, match="fewer than data.min-test-examples=20"):
        load_corpus(_cfg(tiny_run_config, three).data, 0)


def test_a_partition_too_small_to_train_is_named(tiny_run_config, tmp_path):
    path = _csv(tmp_path, "text,label\n" + _rows(240))
    cfg = _cfg(tiny_run_config, path, **{"train.batch-size": 32})
    check_partitions(cfg.data, cfg.seed, 3, cfg.train.batch_size)  # about 64 each: fine
    with pytest.raises(DataError) as caught:
        check_partitions(cfg.data, cfg.seed, 8, cfg.train.batch_size)
    sizes = [len(load_partition(cfg.data, cfg.seed, i, 8)[0]) for i in range(8)]
    assert len(caught.value.problems) == sum(n < 32 for n in sizes) > 0
    assert caught.value.problems[0].startswith(
        f"partition 0 of 8 (iid split of data.source='{path}') got {sizes[0]} training "
        "example(s), fewer than one batch (train.batch-size=32): use fewer clients, "
        "data.partitioner='iid', or a smaller train.batch-size")


def test_the_client_refuses_its_own_partition_when_too_small(tiny_run_config, tmp_path):
    from client import training as t

    cfg = _cfg(tiny_run_config, _csv(tmp_path, "text,label\n" + _rows(240)),
               **{"train.batch-size": 32})
    with pytest.raises(DataError, match="partition 5 of 8"):
        t.load_local_data(cfg, 5, 8)


def test_a_class_with_a_single_example_is_refused_naming_it_and_the_file(tiny_run_config,
                                                                        tmp_path):
    once = _csv(tmp_path, "text,label\n" + _rows(200) + "the only one,solo\n", "once.csv")
    with pytest.raises(DataError) as caught:
        load_corpus(_cfg(tiny_run_config, once, **{"data.test-source": str(once)}).data, 0)
    assert caught.value.problems == [
        f"data.source='{once}': the class 'solo' (data.label-column) has 1 example(s) in the "
        "training split and 1 in the test split; a class needs at least 2 training examples: "
        "add examples of it, drop it (data.labels), or merge it into another class "
        "(data.label-groups)"]
    kept = _cfg(tiny_run_config, once, **{"data.labels": "a,b"})  # dropping it is the fix
    assert load_corpus(kept.data, 0).label_names == ("a", "b")
