import pytest

from common.config import AppConfig, DataConfig
from common.data import load_corpus, load_partition


def _cfg(tiny_run_config, **overrides) -> DataConfig:
    return AppConfig.from_run_config({**tiny_run_config, **overrides}).data


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_partitions_are_deterministic_disjoint_and_cover_the_train_split(tiny_run_config,
                                                                         partitioner):
    cfg = _cfg(tiny_run_config, **{"data.partitioner": partitioner})
    corpus = load_corpus(cfg, 0)
    parts = [load_partition(cfg, 0, i, 3)[0] for i in range(3)]
    again = [load_partition.__wrapped__(cfg, 0, i, 3)[0] for i in range(3)]
    assert [p["text"] for p in parts] == [p["text"] for p in again]
    texts = sorted(t for p in parts for t in p["text"])
    assert texts == sorted(corpus.train["text"])


def test_csv_labels_are_mapped_to_sorted_integers(tiny_run_config):
    corpus = load_corpus(_cfg(tiny_run_config), 0)
    assert corpus.label_names == ("space", "sport", "tech")
    assert set(corpus.train["label"]) == {0, 1, 2}
    assert 0 < len(corpus.test) < len(corpus.train)


def test_missing_column_is_named(tiny_run_config):
    with pytest.raises(ValueError, match="data.text-column='note'"):
        load_corpus(_cfg(tiny_run_config, **{"data.text-column": "note"}), 0)


def test_partition_id_out_of_range_is_named(tiny_run_config):
    with pytest.raises(ValueError, match="partition-id=3"):
        load_partition(_cfg(tiny_run_config), 0, 3, 3)


def test_label_selection_keeps_renumbers_and_drops_the_rest(tiny_run_config):
    full = load_corpus(_cfg(tiny_run_config), 0)
    kept = load_corpus(_cfg(tiny_run_config, **{"data.labels": "tech,sp*"}), 0)
    assert kept.label_names == ("space", "sport", "tech")  # a prefix and a name: all three
    two = load_corpus(_cfg(tiny_run_config, **{"data.labels": "tech,space"}), 0)
    assert two.label_names == ("space", "tech") and two.num_labels == 2
    for split, original in ((two.train, full.train), (two.test, full.test)):
        want = [(t, {0: 0, 2: 1}[y]) for t, y in zip(original["text"], original["label"],
                                                      strict=True) if y != 1]
        assert list(zip(split["text"], split["label"], strict=True)) == want
    assert len(kept.train) == len(full.train)


@pytest.mark.parametrize(("labels", "message"), [
    ("tech,mars", r"\['mars'\] match no class"), ("tech", "keeps 1 class"),
])
def test_bad_label_selection_is_named(tiny_run_config, labels, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(_cfg(tiny_run_config, **{"data.labels": labels}), 0)
