"""Sentence-pair tasks (MNLI, QNLI, RTE, MRPC, QQP): data.text-column names two columns.

A pair is encoded as the tokenizer's own sentence pair, through the same ``Task.encode`` that
training (client.training), server evaluation (server.app) and federated evaluation use; one
text column encodes exactly as before pairs existed.
"""

import pytest
import torch
from datasets import Dataset

from client.training import load_local_data
from common.config import AppConfig, ConfigError, ModelConfig
from common.data import load_corpus, load_partition
from common.data_files import DataError, read_table
from common.data_sources import TEXT_PAIR
from common.model import load_tokenizer
from common.tasks import TASKS
from tests.test_hf_datasets import save_glue_like

CLASSIFICATION = TASKS["classification"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(path=str(tiny_model_dir)))


def test_a_pair_encodes_as_the_tokenizers_own_pair_call(tokenizer):
    texts = ["a cat sat on the mat", "a long premise " * 20, "short"]
    pairs = ["an animal sat", "a hypothesis that is long as well " * 5, "x"]
    data = Dataset.from_dict({"text": texts, TEXT_PAIR: pairs, "label": [0, 1, 2]})
    ids, mask, segments, labels = CLASSIFICATION.encode(data, tokenizer, 32).tensors
    own = tokenizer(texts, pairs, truncation=True, max_length=32, padding="max_length",
                    return_tensors="pt")
    assert torch.equal(ids, own["input_ids"]) and torch.equal(mask, own["attention_mask"])
    assert torch.equal(segments, own["token_type_ids"]) and segments.max() == 1
    assert labels.tolist() == [0, 1, 2]
    # both texts are there, separated, and cut to fit together
    sep = tokenizer.sep_token_id
    assert (ids[0] == sep).sum() == 2 and mask[1].sum() == 32


def test_a_single_text_csv_encodes_exactly_as_before(tiny_run_config, tokenizer):
    cfg = AppConfig.from_run_config(tiny_run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    assert TEXT_PAIR not in corpus.train.column_names
    ids, mask, segments, _ = CLASSIFICATION.encode(corpus.train, tokenizer, 16).tensors
    before = tokenizer(list(corpus.train["text"]), truncation=True, max_length=16,
                       padding="max_length", return_tensors="pt")  # the call before pairs
    assert torch.equal(ids, before["input_ids"]) and torch.equal(mask, before["attention_mask"])
    assert not segments.any()  # one segment: BERT's default (tests/test_segment_ids.py)


def test_a_clients_training_data_is_the_pair_encoded(tiny_run_config, tmp_path, tokenizer):
    folder = save_glue_like(tmp_path / "glue")
    cfg = AppConfig.from_run_config({
        **tiny_run_config, "data.source": str(folder), "data.text-column": "premise,hypothesis",
        "data.label-column": "label", "data.test-split": "validation",
        "data.min-test-examples": 10})
    local = load_local_data(cfg, 0, 2)
    train, test = load_partition(cfg.data, cfg.seed, 0, 2)
    own = tokenizer(list(train["text"]), list(train[TEXT_PAIR]), truncation=True,
                    max_length=cfg.model.max_length, padding="max_length", return_tensors="pt")
    assert torch.equal(local.train.tensors[0], own["input_ids"])
    assert torch.equal(local.train.tensors[2], own["token_type_ids"])
    assert local.num_labels == 3 and TEXT_PAIR in test.column_names


def test_a_pair_from_a_csv_names_a_row_missing_its_second_text(tmp_path):
    path = tmp_path / "qqp.csv"
    path.write_text("question1,question2,is_duplicate\nhow?,why?,1\nwhat?,,0\nwho?,whom?,0\n")
    with pytest.raises(DataError) as caught:
        read_table(str(path), key="data.source", text_column="question1, question2",
                   label_column="is_duplicate")
    assert caught.value.problems == [
        f"data.source='{path}': 1 row(s) with an empty or missing second text "
        "(data.text-column='question1, question2'), line(s) 3; fix them, or set "
        "data.drop-missing=true to drop them"]
    table = read_table(str(path), key="data.source", text_column="question1,question2",
                       label_column="is_duplicate", drop_missing=True)
    assert table.pairs == ["why?", "whom?"] and table.texts == ["how?", "who?"]


@pytest.mark.parametrize(("column", "message"), [
    ("a,b,c", "data.text-column='a,b,c': one column, or two distinct ones separated by a comma"),
    ("a,a", "data.text-column='a,a': one column, or two distinct ones"),
    ("a,", "data.text-column='a,': one column, or two distinct ones"),
])
def test_a_text_column_of_other_than_one_or_two_names_is_refused(tiny_run_config, column,
                                                                 message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.from_run_config({**tiny_run_config, "data.text-column": column})


def test_a_causal_lm_refuses_a_pair(tiny_lm_run_config):
    with pytest.raises(ConfigError, match=r"data.text-column='a,b': one column with "
                                          r"model.task='causal-lm' \(a sentence pair is for "
                                          r"model.task='classification'\)"):
        AppConfig.from_run_config({**tiny_lm_run_config, "data.text-column": "a,b"})
