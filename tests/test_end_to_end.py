"""The app through Flower end to end: `flwr run` on a private simulation SuperLink."""

import csv
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from common.config import AppConfig
from common.data import encode, load_corpus
from common.evaluation import evaluate
from common.model import load_tokenizer
from simulations.local_superlink import flwr_run
from tests.conftest import ROOT


def _toml_overrides(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def test_two_round_simulation_writes_metrics_and_a_loadable_adapter(tiny_run_config, tmp_path):
    overrides = {k: tiny_run_config[k] for k in (
        "model.path", "model.max-length", "data.source", "data.text-column",
        "data.label-column", "data.max-eval-examples", "data.partitioner", "train.batch-size",
        "train.local-steps", "strategy.num-rounds", "lora.r", "lora.alpha", "output.dir")}
    overrides["output.run-name"] = "e2e"
    code = flwr_run(ROOT, run_config=_toml_overrides(overrides), num_supernodes=3,
                    flwr_home=tmp_path / "flwr-home", timeout=540)
    assert code == 0
    folder = tmp_path / "results" / "e2e"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(0 < float(r["epsilon-max"]) <= 6.0 for r in rows[1:])
    assert all(int(r["bytes-up"]) > 0 and int(r["bytes-down"]) > 0 for r in rows[1:])

    # The saved adapter loads with peft and reproduces the server's final evaluation.
    cfg = AppConfig.from_run_config(tiny_run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.path, num_labels=corpus.num_labels, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, folder / "adapter")
    test = encode(corpus.test, load_tokenizer(cfg.model), cfg.model.max_length)
    loss, accuracy = evaluate(model, test)
    assert accuracy == pytest.approx(float(rows[-1]["accuracy"]), abs=1e-9)
    assert loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    assert torch.isfinite(torch.tensor(loss))
