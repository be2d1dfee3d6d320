"""simulations/conf/paper/: the FedSVD paper's Table 2 settings, as valid runs."""

import json
import math
from pathlib import Path

import pytest

from common.config import AppConfig
from common.run_config import app_run_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "simulations" / "conf" / "paper"
TASKS = ("snli", "mnli-m", "mnli-mm", "sst2", "qqp", "qnli")  # the six of the paper's average
HEADS = ("head-random", "head-class-names")


def paper_config(task: str, head: str, *more: str) -> AppConfig:
    files = [str(PAPER / f"{name}.toml") for name in ("base", task, head)]
    return AppConfig.from_run_config(app_run_config(ROOT, [*files, *more]))


def test_the_folder_holds_the_base_the_six_tasks_and_the_two_heads():
    assert {p.stem for p in PAPER.glob("*.toml")} == {"base", *TASKS, *HEADS}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("task", TASKS)
def test_each_task_and_head_is_a_valid_run_of_the_papers_setting(task, head):
    cfg = paper_config(task, head, "privacy.epsilon=3")
    assert (cfg.model.path, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (
        "FacebookAI/roberta-large", 8, 8.0, 0.05)
    assert cfg.lora.target_modules == ("query", "value")
    assert (cfg.strategy.num_rounds, cfg.train.local_steps, cfg.train.batch_size) == (100, 10, 128)
    assert (cfg.strategy.fraction_train, cfg.data.dirichlet_alpha) == (0.5, 0.5)
    assert (cfg.train.learning_rate, cfg.privacy.max_grad_norm) == (0.5, 2.0)
    assert cfg.privacy.delta == 1e-5
    assert cfg.privacy.accountant == "prv" and not cfg.lora.train_head
    assert math.isinf(cfg.strategy.max_weight_ratio) and not cfg.strategy.bound_updates
    assert cfg.data.source.startswith("hf:") and cfg.data.test_split
    assert cfg.lora.head_init == ("random" if head == "head-random" else "class-names")


def test_one_round_of_the_paper_config_runs_on_a_tiny_roberta_and_a_saved_glue_pair_task(
        hub, tmp_path, capfd):
    """The paper's MNLI config, its frozen random head, through Flower for one round.

    Its hub id FacebookAI/roberta-large is resolved offline from a Hugging Face cache (``hub``)
    that holds a tiny random RoBERTa under that id; only what must change to run here is
    overridden: a GLUE-shaped pair dataset saved with save_to_disk for nyu-mll/glue, and the
    schedule scaled to 60 training pairs.
    """
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from common.run_config import override_text
    from simulations import run as sim_run
    from tests.conftest import _with_minilm_tokenizer, lay_out_hub_snapshot
    from tests.test_hf_datasets import save_glue_like

    config = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=66, num_labels=3)
    roberta = _with_minilm_tokenizer(RobertaForSequenceClassification(config), tmp_path / "rb")
    lay_out_hub_snapshot(hub, "FacebookAI/roberta-large", "c" * 40, roberta)
    here = {"model.max-length": 32, "model.compute-dtype": "float32",
            "data.source": str(save_glue_like(tmp_path / "glue-mnli")),
            "data.test-split": "validation", "data.min-test-examples": 10,
            "data.dirichlet-alpha": 1000.0, "strategy.num-rounds": 1, "train.local-steps": 2,
            "train.batch-size": 4, "output.run-name": "paper-smoke", "privacy.epsilon": 6.0}
    files = [str(PAPER / f"{name}.toml") for name in ("base", "mnli-m", "head-random")]
    results = tmp_path / "results"
    flags = [arg for item in [*files, override_text(here)] for arg in ("--run-config", item)]
    code = sim_run.main([*flags,
                         "--num-supernodes", "6", "--results-dir", str(results)])
    assert code == 0, capfd.readouterr()
    saved = json.loads((results / "paper-smoke" / "config.json").read_text())
    assert saved["model.path"] == "FacebookAI/roberta-large"
    environment = json.loads((results / "paper-smoke" / "environment.json").read_text())
    assert environment["model-commit"] == "c" * 40  # the snapshot the hub id resolved to
    assert saved["data.text-column"] == "premise,hypothesis"
    assert saved["privacy.accountant"] == "prv" and saved["lora.head-init"] == "random"
    assert "final test accuracy" in capfd.readouterr().out
