"""data.label-groups (coarser classes) and data.partitioner = "column" (one client per value)."""

import json
import logging
from collections import Counter

import pytest

from common.config import AppConfig, ConfigError, DataConfig
from common.data import (
    NATURAL_ID,
    NEWSGROUPS_TOPICS,
    check_partitions,
    group_labels,
    label_group_map,
    load_corpus,
    load_partition,
    partition_problem,
    partition_values,
)
from common.data_files import DataError, read_table
from tests.conftest import default_run_config

NEWSGROUPS_NAMES = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
)
# site -> rows; sizes differ so that a partition is recognisable by its size
SITES = {"north": 40, "east": 60, "south": 80, "west": 100}
LABELS = ("a.x", "a.y", "b.x", "c.z", "c.w")


def _data(path, **overrides) -> DataConfig:
    return AppConfig.from_run_config({
        **default_run_config(), "data.source": str(path), "data.min-test-examples": 10,
        "data.partitioner": "iid", **overrides}).data


def _write_csv(tmp_path, sites=SITES, name="sites.csv"):
    lines = ["text,label,site"]
    i = 0
    for site, n in sites.items():
        for _ in range(n):
            lines.append(f"{site} text number {i},{LABELS[i % len(LABELS)]},{site}")
            i += 1
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _by_column(path, **overrides) -> DataConfig:
    return _data(path, **{"data.partitioner": "column", "data.partition-column": "site",
                          **overrides})


# --- data.label-groups -----------------------------------------------------------------------

def test_prefix_maps_every_label_once_to_the_text_before_the_first_dot():
    names = ("a.x", "a.y.deep", "b.x", "plain", ".hidden")
    mapping = label_group_map(names, "prefix")
    assert list(mapping) == list(names)  # every label mapped, exactly once
    assert mapping == {"a.x": "a", "a.y.deep": "a", "b.x": "b", "plain": "plain",
                       ".hidden": ".hidden"}


def test_topics_hold_each_of_the_20_newsgroups_exactly_once():
    counts = Counter(label for labels in NEWSGROUPS_TOPICS.values() for label in labels)
    assert set(counts) == set(NEWSGROUPS_NAMES) and set(counts.values()) == {1}
    mapping = label_group_map(NEWSGROUPS_NAMES, "topics")
    assert list(mapping) == list(NEWSGROUPS_NAMES)
    assert Counter(mapping.values()) == {"comp": 5, "rec": 4, "sci": 4, "politics": 3,
                                         "religion": 3, "misc": 1}
    assert mapping["alt.atheism"] == mapping["talk.religion.misc"] == "religion"
    assert Counter(label_group_map(NEWSGROUPS_NAMES, "prefix").values()) == {
        "alt": 1, "comp": 5, "misc": 1, "rec": 4, "sci": 4, "soc": 1, "talk": 4}


def test_topics_refuse_labels_that_are_not_newsgroups():
    with pytest.raises(DataError) as caught:
        label_group_map(("sci.space", "a.x", "b"), "topics")
    assert caught.value.problems == [
        "data.label-groups='topics': 2 class(es) are not 20 Newsgroups classes ('a.x', 'b'); "
        "'topics' groups the 20 newsgroups only, use 'prefix' to group other dot-separated "
        "labels"]


def test_the_real_20_newsgroups_in_prefix_and_topic_groups():
    corpus = load_corpus(DataConfig(), 0)  # about 10 s
    assert corpus.label_names == NEWSGROUPS_NAMES
    for how, groups in (("prefix", ("alt", "comp", "misc", "rec", "sci", "soc", "talk")),
                        ("topics", ("comp", "misc", "politics", "rec", "religion", "sci"))):
        grouped = group_labels(corpus, how)
        assert grouped.label_names == groups
        group_of = label_group_map(corpus.label_names, how)
        for split, original in ((grouped.train, corpus.train), (grouped.test, corpus.test)):
            assert split["label"] == [groups.index(group_of[corpus.label_names[y]])
                                      for y in original["label"]]
            assert split["text"] == original["text"]


def test_groups_come_after_label_selection_and_are_renumbered(tmp_path, caplog):
    path = _write_csv(tmp_path)
    full = load_corpus(_data(path), 0)
    assert full.label_names == ("a.x", "a.y", "b.x", "c.w", "c.z")
    with caplog.at_level(logging.INFO, logger="flwr"):
        grouped = load_corpus(_data(path, **{"data.labels": "a.*,c.z",
                                             "data.label-groups": "prefix"}), 0)
    assert grouped.label_names == ("a", "c") and grouped.num_labels == 2
    assert "data.label-groups='prefix': 3 classes -> 2 groups: 0 a = a.x, a.y; 1 c = c.z" \
        in caplog.text
    for split, original in ((grouped.train, full.train), (grouped.test, full.test)):
        want = [(t, 0 if full.label_names[y].startswith("a.") else 1)
                for t, y in zip(original["text"], original["label"], strict=True)
                if full.label_names[y] in ("a.x", "a.y", "c.z")]
        assert list(zip(split["text"], split["label"], strict=True)) == want
    every = load_corpus(_data(path, **{"data.label-groups": "prefix"}), 0)
    assert every.label_names == ("a", "b", "c") and len(every.train) == len(full.train)


def test_one_group_is_refused_and_topics_refuse_a_foreign_file(tmp_path):
    path = _write_csv(tmp_path)
    with pytest.raises(DataError) as caught:
        load_corpus(_data(path, **{"data.labels": "a.*", "data.label-groups": "prefix"}), 0)
    assert caught.value.problems == [
        "data.label-groups='prefix': puts the 2 class(es) ('a.x', 'a.y') into 1 group ('a'); "
        "a classifier needs at least 2 (check data.labels)"]
    with pytest.raises(DataError, match="data.label-groups='topics': 5 class"):
        load_corpus(_data(path, **{"data.label-groups": "topics"}), 0)


# --- data.partitioner = "column" -------------------------------------------------------------

def test_each_partition_holds_one_value_and_all_its_training_rows(tmp_path, caplog):
    cfg = _by_column(_write_csv(tmp_path))
    corpus = load_corpus(cfg, 0)
    values = partition_values(corpus)
    assert values == ("east", "north", "south", "west")  # sorted: partition i holds values[i]
    with caplog.at_level(logging.INFO, logger="flwr"):
        check_partitions(cfg, 0, 4, 8)
    parts = [load_partition(cfg, 0, i, 4) for i in range(4)]
    for i, (train, _) in enumerate(parts):
        assert set(train[NATURAL_ID]) == {values[i]}
        assert train["text"] == [t for t, v in zip(corpus.train["text"], corpus.train[NATURAL_ID],
                                                   strict=True) if v == values[i]]
        assert all(t.startswith(values[i]) for t in train["text"])
        assert (f"partition {i} of 4: data.partition-column='site' value '{values[i]}' "
                f"({len(train)} training examples)") in caplog.text
    # the test split stays IID: its shares cover it, whatever the sites
    assert sorted(t for _, test in parts for t in test["text"]) == sorted(corpus.test["text"])
    assert NATURAL_ID not in corpus.test.column_names
    # the same partitions on another call with the same seed
    again = [load_partition.__wrapped__(cfg, 0, i, 4)[0]["text"] for i in range(4)]
    assert again == [train["text"] for train, _ in parts]


def test_max_client_examples_still_caps_a_column_partition(tmp_path):
    path = _write_csv(tmp_path)
    full = load_partition(_by_column(path), 0, 3, 4)[0]
    capped = load_partition(_by_column(path, **{"data.max-client-examples": 7}), 0, 3, 4)[0]
    assert len(capped) == 7 and set(capped["text"]) <= set(full["text"])
    assert set(capped[NATURAL_ID]) == {"west"}


def test_a_value_count_other_than_the_partitions_is_refused(tmp_path):
    path = _write_csv(tmp_path)
    cfg = _by_column(path)
    message = (f"data.partition-column='site': the training split of data.source='{path}' "
               "holds 4 distinct value(s) ('east', 'north', 'south', 'west'), but there are 3 "
               "partitions (SuperNodes); data.partitioner='column' makes one partition per "
               "value: run 4 SuperNodes (simulations.run --num-supernodes 4), or use another "
               "column")
    with pytest.raises(DataError) as caught:
        check_partitions(cfg, 0, 3, 8)
    assert caught.value.problems == [message]
    with pytest.raises(DataError) as caught:
        load_partition(cfg, 0, 0, 3)  # a client in a deployment refuses it too
    assert caught.value.problems == [message]
    many = _by_column(_write_csv(tmp_path, {f"s{i}": 12 for i in range(7)}, "many.csv"))
    with pytest.raises(DataError, match=r"holds 7 distinct value\(s\) \('s0', 's1', 's2', 's3', "
                                        r"'s4', \.\.\. \(2 more\)\), but there are 6 partitions"):
        check_partitions(many, 0, 6, 2)


def test_a_too_small_partition_names_its_value(tmp_path):
    path = _write_csv(tmp_path)
    cfg = _by_column(path)
    with pytest.raises(DataError) as caught:
        check_partitions(cfg, 0, 4, 40)
    sizes = [len(load_partition(cfg, 0, i, 4)[0]) for i in range(4)]
    north = sizes[1]
    assert north < 40 <= sizes[3]
    assert (f"partition 1 of 4 (data.partition-column='site' value 'north' of data.source="
            f"'{path}') got {north} training example(s), fewer than one batch (train.batch-size"
            "=40): give this value more rows (or merge it into another value), or use a smaller "
            f"train.batch-size (`python -m privacy.planning --recommend --epsilon E --examples "
            f"{north}` fits the batch and steps to it)") in caught.value.problems
    assert partition_problem(cfg, 3, 1, 4, 8).startswith(
        "partition 1 of 4 (data.partition-column='site' of data.source=")  # no value given


def test_a_missing_partition_column_is_named_with_its_file(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                            for i in range(40)))
    with pytest.raises(DataError) as caught:
        read_table(str(path), key="data.source", text_column="text", label_column="label",
                   partition_column="site")
    assert caught.value.problems == [
        f"data.partition-column='site': no such column in '{path}' (columns: text, label)"]
    with pytest.raises(DataError, match="data.partition-column='site': no such column"):
        load_corpus(_by_column(path), 0)
    # read only when asked: the same file loads under another partitioner
    table = read_table(str(path), key="data.source", text_column="text", label_column="label")
    assert table.partitions is None


def test_empty_partition_values_are_refused_or_dropped(tmp_path, caplog):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label,site\none,a,s1\ntwo,b,\nthree,a,s2\nfour,,\nfive,b,nan\n")

    def read(**kwargs):
        return read_table(str(path), key="data.source", text_column="text",
                          label_column="label", partition_column="site", **kwargs)

    with pytest.raises(DataError) as caught:
        read()
    assert caught.value.problems == [
        f"data.source='{path}': 1 row(s) with an empty or missing label (data.label-column="
        "'label'), line(s) 5; fix them, or set data.drop-missing=true to drop them",
        f"data.source='{path}': 3 row(s) with an empty or missing partition value "
        "(data.partition-column='site'), line(s) 3, 5, 6; fix them, or set "
        "data.drop-missing=true to drop them"]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        table = read(drop_missing=True)
    assert (table.texts, table.partitions, table.lines) == (["one", "three"], ["s1", "s2"],
                                                            [2, 4])
    assert "dropped 3 of 5 rows with an empty or missing text, label or partition value" \
        in caplog.text


NO_COLUMN = ("data.partition-column='': required with data.partitioner='column' (the column "
             "whose values name the clients), empty with any other partitioner")
NOT_20NG = ("data.partitioner='column': data.source='20newsgroups' has no column to partition "
            "by; use a .csv / .jsonl data.source with a data.partition-column, or 'dirichlet' / "
            "'iid'")


@pytest.mark.parametrize(("overrides", "problems"), [
    ({"data.partitioner": "column"}, [NO_COLUMN, NOT_20NG]),
    ({"data.partition-column": "site"},
     ["data.partition-column='site': required with data.partitioner='column' (the column "
      "whose values name the clients), empty with any other partitioner"]),
    ({"data.partitioner": "column", "data.partition-column": "site"}, [NOT_20NG]),
    ({"data.label-groups": "suffix"},
     ["data.label-groups='suffix': '' (off), 'prefix' (the text before the first '.') or "
      "'topics' (the six 20 Newsgroups topic groups)"]),
    ({"data.partitioner": "natural"},
     ["data.partitioner='natural': one of ('dirichlet', 'iid', 'column')"]),
])
def test_invalid_settings_are_refused_by_key(overrides, problems):
    with pytest.raises(ConfigError) as caught:
        AppConfig.from_run_config({**default_run_config(), **overrides})
    assert caught.value.problems == problems


def test_a_column_partitioned_file_passes_validation(tmp_path):
    cfg = _by_column(_write_csv(tmp_path))
    assert (cfg.partitioner, cfg.partition_column) == ("column", "site")


def test_both_keys_default_to_off():
    cfg = AppConfig.from_run_config(default_run_config())
    assert (cfg.data.label_groups, cfg.data.partition_column) == ("", "")
    assert cfg.run_name == AppConfig().run_name


def test_a_client_refusing_its_too_small_partition_names_its_value(tmp_path, tiny_model_dir):
    from client.training import load_local_data

    path = _write_csv(tmp_path)
    cfg = AppConfig.from_run_config({
        **default_run_config(), "data.source": str(path), "data.min-test-examples": 10,
        "data.partitioner": "column", "data.partition-column": "site",
        "model.path": str(tiny_model_dir), "train.batch-size": 40})
    with pytest.raises(DataError, match="data.partition-column='site' value 'north'"):
        load_local_data(cfg, 1, 4)
