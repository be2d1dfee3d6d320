"""Shared fixtures: a tiny randomly initialised BERT and a tiny CSV text-classification task."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common.config import flatten_dict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parent.parent
TOPICS = {
    "space": "orbit rocket nasa launch shuttle moon planet satellite",
    "sport": "game team score season player coach league goal",
    "tech": "computer software chip memory disk driver windows program",
}


def default_run_config() -> dict:
    """The flat run config of pyproject.toml, as Flower hands it to the apps."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with the MiniLM tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return _with_minilm_tokenizer(BertForSequenceClassification(config),
                                  tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama (a decoder) with the MiniLM tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0)
    return _with_minilm_tokenizer(LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny-llama"))


def _with_minilm_tokenizer(model, folder: Path) -> Path:
    """``model`` saved into ``folder`` beside the MiniLM tokenizer (vocabulary 30,522)."""
    from common.config import ModelConfig
    from common.model_path import resolve_model_path

    model.save_pretrained(folder)
    minilm = resolve_model_path(ModelConfig())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder


@pytest.fixture()
def tiny_lm_run_config(tiny_run_config, tiny_llama_dir) -> dict:
    """The tiny run config as a causal-LM run: the tiny Llama on the texts of the tiny CSV."""
    return {**tiny_run_config, "model.task": "causal-lm", "model.path": str(tiny_llama_dir),
            "lora.target-modules": "q_proj,v_proj", "lora.train-head": False,
            "lora.head-init": "random", "data.label-column": ""}


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """300 short texts over 3 topics, with topic words plus shared filler words."""
    rng = np.random.default_rng(0)
    filler = "the a of and to in is it that for on with".split()
    rows = []
    for i in range(300):
        topic = list(TOPICS)[i % 3]
        words = list(rng.choice(TOPICS[topic].split(), 4)) + list(rng.choice(filler, 4))
        rng.shuffle(words)
        rows.append({"body": " ".join(words), "topic": topic})
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture()
def tiny_run_config(tiny_model_dir, tiny_csv, tmp_path) -> dict:
    """Default run config pointed at the tiny model and data, scaled down to run in seconds."""
    cfg = default_run_config()
    cfg.update({
        "model.path": str(tiny_model_dir), "model.max-length": 16,
        "data.source": str(tiny_csv), "data.text-column": "body", "data.label-column": "topic",
        "data.max-eval-examples": 40, "data.partitioner": "iid", "data.min-test-examples": 20,
        "train.batch-size": 8, "train.local-steps": 2, "strategy.num-rounds": 2,
        "lora.r": 4, "lora.alpha": 4, "output.dir": str(tmp_path / "results"),
        # A trained head, the path with the most to check (a head clipped, sent up and
        # averaged); the default frozen class-name head is run end to end by test_end_to_end
        # (which takes only TINY_KEYS from here) and tested in test_paired_seeds.
        "lora.train-head": True, "lora.head-init": "random",
    })
    return cfg


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's per-process task identity, which building any Message needs."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture()
def supernode(monkeypatch, tmp_path):
    """This process as a SuperNode's ClientApp process: ``flwr-clientapp``, its own FLWR_HOME."""
    home = tmp_path / "flwr-home"
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "flwr-clientapp"), "--insecure"])
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def lay_out_hub_snapshot(cache: Path, repo_id: str, commit: str, source: Path,
                         refs=("main",)) -> Path:
    """``source``'s files as the snapshot ``commit`` of ``repo_id``: blobs, links and refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # the hub writes the hash, no newline
    return snapshot.resolve()


@pytest.fixture()
def hub(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache under ``tmp_path``, with huggingface_hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for any process started from here
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set it here too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
