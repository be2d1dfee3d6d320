"""Hugging Face datasets as data.source: save_to_disk folders, Parquet files, hub names.

Every dataset is built here in tmp_path; nothing reaches the network (a hub name is looked up
with the hub switched off).
"""

import logging
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from common.config import AppConfig, ConfigError, DataConfig
from common.data import load_corpus
from common.data_files import DataError
from common.data_sources import TEXT_PAIR, parse_source
from simulations import run as sim_run
from tests.conftest import default_run_config
from tests.test_launcher import _tiny_overrides

NLI = ("entailment", "neutral", "contradiction")  # GLUE MNLI's ClassLabel names, in its order
PAIR = "premise,hypothesis"
FEATURES = Features({"premise": Value("string"), "hypothesis": Value("string"),
                     "label": ClassLabel(names=list(NLI)), "idx": Value("int32")})


def nli_split(n: int, *, labelled: bool = True, offset: int = 0) -> Dataset:
    """``n`` GLUE-shaped rows, labels cycling 0, 1, 2 (all -1, GLUE's hidden test labels, if not
    ``labelled``)."""
    return Dataset.from_dict({
        "premise": [f"a cat sat on mat number {offset + i}" for i in range(n)],
        "hypothesis": [f"an animal {('sat', 'ran', 'slept')[i % 3]} {i}" for i in range(n)],
        "label": [i % 3 if labelled else -1 for i in range(n)],
        "idx": list(range(n))}, features=FEATURES)


def save_glue_like(folder: Path) -> Path:
    """A GLUE-shaped DatasetDict saved with save_to_disk: train 60, validation 30, test 30
    (unlabelled)."""
    DatasetDict(train=nli_split(60), validation=nli_split(30, offset=100),
                test=nli_split(30, labelled=False, offset=200)).save_to_disk(str(folder))
    return folder


@pytest.fixture()
def glue_dir(tmp_path) -> Path:
    return save_glue_like(tmp_path / "glue-mnli")


def _data(source, **keys) -> DataConfig:
    """A validated DataConfig of ``source``, small enough for the tiny splits here."""
    flat = {"data.source": str(source), "data.text-column": PAIR, "data.min-test-examples": 10,
            **{f"data.{k.replace('_', '-')}": v for k, v in keys.items()}}
    return AppConfig.from_run_config({**default_run_config(), **flat}).data


def test_a_saved_dataset_dict_trains_on_train_tests_on_the_split_named_and_says_so(
        glue_dir, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        corpus = load_corpus(_data(glue_dir, test_split="validation"), 0)
    assert corpus.label_names == ("contradiction", "entailment", "neutral")  # the names, sorted
    train = nli_split(60)
    assert corpus.train["text"] == train["premise"]
    assert corpus.train[TEXT_PAIR] == train["hypothesis"]
    assert [corpus.label_names[y] for y in corpus.train["label"]] == [
        NLI[y] for y in train["label"]]
    assert corpus.test["text"] == nli_split(30, offset=100)["premise"]
    assert (f"data.source='{glue_dir}': training on its split 'train', testing on its split "
            "'validation'") in caplog.text


def test_an_unlabelled_test_split_is_refused_naming_it_and_suggesting_validation(glue_dir):
    with pytest.raises(DataError) as caught:
        load_corpus(_data(glue_dir), 0)  # data.test-split empty: "test" comes first
    assert caught.value.problems == [
        f"data.source='{glue_dir}' split 'test': has no labels: every data.label-column='label' "
        "value is -1, ClassLabel's 'no label' (the dataset keeps these labels hidden, as GLUE "
        "does for its test splits); evaluate on a labelled split: "
        "data.test-split='validation' (splits: train, validation, test)"]


def test_a_missing_column_of_a_pair_is_named_with_the_columns_found(glue_dir):
    with pytest.raises(DataError) as caught:
        load_corpus(_data(glue_dir, text_column="premise,hypo", test_split="validation"), 0)
    assert caught.value.problems == [
        f"data.text-column='premise,hypo': no such column 'hypo' in '{glue_dir}' split 'train' "
        "(columns: premise, hypothesis, label, idx)"]


def test_a_split_that_is_not_there_is_refused_with_the_splits_found(glue_dir):
    with pytest.raises(DataError, match=r"data.test-split='validation_matched': data.source="
                                        r".* has no split 'validation_matched' \(splits: "
                                        r"train, validation, test\)"):
        load_corpus(_data(glue_dir, test_split="validation_matched"), 0)


def test_unlabelled_rows_are_missing_labels_named_by_index_or_dropped(tmp_path, caplog):
    rows = nli_split(60).to_dict()
    rows["label"][3] = rows["label"][7] = -1  # SNLI's rows without a gold label
    folder = tmp_path / "snli-like"
    Dataset.from_dict(rows, features=FEATURES).save_to_disk(str(folder))
    with pytest.raises(DataError) as caught:
        load_corpus(_data(folder), 0)
    assert caught.value.problems == [
        f"data.source='{folder}': 2 row(s) with an empty or missing label "
        "(data.label-column='label'), index(es) 3, 7; fix them, or set data.drop-missing=true "
        "to drop them"]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        corpus = load_corpus(_data(folder, drop_missing=True), 0)
    assert len(corpus.train) + len(corpus.test) == 58
    assert "dropped 2 of 60 rows" in caplog.text and "first indexes 3, 7" in caplog.text


def test_parquet_files_keep_their_class_names_as_source_and_test_source(glue_dir, tmp_path):
    train, test = tmp_path / "train.parquet", tmp_path / "validation.parquet"
    nli_split(60).to_parquet(str(train))
    nli_split(30, offset=100).to_parquet(str(test))
    corpus = load_corpus(_data(train, test_source=str(test)), 0)
    assert corpus.label_names == ("contradiction", "entailment", "neutral")
    assert len(corpus.train) == 60 and corpus.test[TEXT_PAIR] == nli_split(30)["hypothesis"]
    # a parquet test file beside a saved DatasetDict: the file, not the dict's own splits
    mixed = load_corpus(_data(glue_dir, test_source=str(test)), 0)
    assert mixed.test["text"] == corpus.test["text"]
    carved = load_corpus(_data(tmp_path / "*.parquet", test_fraction=0.25), 0)  # a glob: 90
    assert len(carved.train) + len(carved.test) == 90


def test_a_hub_dataset_offline_and_not_in_the_cache_is_refused_naming_the_cache(
        tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets-cache"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    with pytest.raises(DataError) as caught:
        load_corpus(_data("hf:nyu-mll/glue:mnli", test_split="validation_matched"), 0)
    assert caught.value.problems == [
        "data.source='hf:nyu-mll/glue:mnli': the Hugging Face dataset 'nyu-mll/glue' (subset "
        f"'mnli') is not in the datasets cache {cache}, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
        "forbid downloading it: load it once where the hub is reachable, or point "
        "HF_DATASETS_CACHE (or HF_HOME) at a cache that holds it"]


def test_the_source_syntax_is_unambiguous_against_local_paths(tmp_path):
    glue = parse_source("hf:nyu-mll/glue:sst2")
    assert (glue.kind, glue.dataset, glue.subset) == ("hub", "nyu-mll/glue", "sst2")
    assert parse_source("hf:stanfordnlp/snli").subset is None
    assert parse_source("glue/sst2.parquet").kind == "parquet"
    plain = tmp_path / "notes"
    plain.mkdir()
    bad = {"hf:nyu-mll/glue/sst2": "data.source='hf:nyu-mll/glue/sst2': expected "
                                   "'hf:<owner>/<name>[:<subset>]'",
           "glue/sst2": "data.source='glue/sst2': no such file or folder",
           str(plain): f"data.source='{plain}': a folder without dataset_dict.json",
           "/no/such/train.parquet": "data.source='/no/such/train.parquet': no such file"}
    for source, message in bad.items():
        with pytest.raises(ConfigError) as caught:
            _data(source)
        assert caught.value.problems[0].startswith(message), caught.value.problems


def test_a_test_split_without_a_source_with_splits_is_refused(tiny_csv):
    with pytest.raises(ConfigError) as caught:
        _data(tiny_csv, text_column="body", label_column="topic", test_split="validation")
    assert caught.value.problems == [
        "data.test-split='validation': names a split of a save_to_disk folder or a hub dataset "
        f"('hf:…'), and data.source='{tiny_csv}' has none: leave it empty"]


def test_a_bad_column_of_a_saved_dataset_is_refused_before_any_launch(tiny_run_config,
                                                                      glue_dir, tmp_path, capsys):
    keys = {"data.source": str(glue_dir), "data.text-column": "premise,claim",
            "data.label-column": "label", "data.test-split": "validation"}
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **keys)]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == (f"  data.text-column='premise,claim': no such column 'claim' in "
                       f"'{glue_dir}' split 'train' (columns: premise, hypothesis, label, idx)")
    assert err[-1] == "refused before starting: nothing was run"
    assert not (tmp_path / "results").exists()
