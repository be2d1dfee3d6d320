"""model.task = "causal-lm": a decoder trained on next-token prediction, B only, under DP-SGD."""

import csv
import json
import math

import pytest
import torch
from datasets import Dataset
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from client import training as t
from client.app import train
from common import contract
from common.adapter import AdapterLayout
from common.config import AppConfig, ConfigError
from common.model import build_model, load_tokenizer
from common.tasks import IGNORED, TASKS, SequenceCrossEntropy
from tests.helpers import global_arrays, private_sgd, train_message
from tests.test_client import NODE

LM = TASKS["causal-lm"]


def test_a_causal_lm_run_refuses_what_it_cannot_have(tiny_lm_run_config):
    with pytest.raises(ConfigError) as info:
        AppConfig.from_run_config({**tiny_lm_run_config, "lora.train-head": True,
                                   "data.partitioner": "dirichlet", "data.label-column": "topic"})
    text = str(info.value)
    for key in ("lora.train-head", "data.partitioner", "data.label-column"):
        assert key in text, key
    with pytest.raises(ConfigError, match="lora.head-init.*'class-names' is the classification "
                       "default"):  # the default head-init names what a causal LM must set
        AppConfig.from_run_config({**tiny_lm_run_config, "lora.head-init": "class-names"})
    with pytest.raises(ConfigError, match="only model.task='causal-lm' reads a prompt"):
        AppConfig.from_run_config({"data.prompt-column": "question"})


def test_prompt_tokens_and_padding_are_out_of_the_loss(tiny_lm_run_config):
    cfg = AppConfig.from_run_config(tiny_lm_run_config)
    tokenizer = load_tokenizer(cfg.model)
    data = Dataset.from_dict({"prompt": ["orbit rocket nasa", "game team"],
                              "text": ["launch shuttle", "score season player"]})
    ids, mask, labels = LM.encode(data, tokenizer, 16).tensors
    for i in range(2):
        n_prompt = len(tokenizer(data["prompt"][i])["input_ids"])
        response = tokenizer(data["text"][i], add_special_tokens=False)["input_ids"]
        n = int(mask[i].sum())
        assert n == n_prompt + len(response) + (tokenizer.eos_token_id is not None)
        assert (labels[i, :n_prompt] == IGNORED).all() and (labels[i, n:] == IGNORED).all()
        assert labels[i, n_prompt:n_prompt + len(response)].tolist() == response
    # The loss of a sequence is the mean over its response tokens alone
    logits = torch.randn(2, 16, 30522)
    per_example = []
    for i in range(2):
        counted = labels[i, 1:] != IGNORED
        ce = torch.nn.functional.cross_entropy(logits[i, :-1][counted], labels[i, 1:][counted])
        per_example.append(ce)
    assert SequenceCrossEntropy()(logits, labels) == pytest.approx(
        float(torch.stack(per_example).mean()), rel=1e-6)
    changed = logits.clone()
    changed[:, 0] += 5.0  # the logits at the first prompt position predict a prompt token
    assert SequenceCrossEntropy()(changed, labels) == pytest.approx(
        float(SequenceCrossEntropy()(logits, labels)), rel=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_local_training_changes_b_only_and_reports_the_accountants_epsilon(tiny_lm_run_config,
                                                                          mode):
    run_config = {**tiny_lm_run_config, "strategy.num-rounds": 3, "privacy.epsilon": 4.0,
                  "privacy.grad-sample-mode": mode}
    cfg = AppConfig.from_run_config(run_config)
    data = t.load_local_data(cfg, 0, 2)
    assert data.train.tensors[2].ndim == 2  # token labels
    arrays = global_arrays(cfg, data.num_labels)
    assert not any(contract.is_head_key(k) for k in arrays.keys())  # no head travels
    context = Context(run_id=1, node_id=1, node_config=NODE, state=RecordDict(),
                      run_config=run_config)
    q = 1 / math.ceil(len(data.train) / cfg.train.batch_size)
    independent = RDPAccountant()
    for _ in range(3):
        reply = train(train_message(arrays), context)
        metrics = reply.content[contract.METRICS]
        assert metrics[contract.B_DELTA_NORM] > 0 and math.isfinite(metrics[contract.TRAIN_LOSS])
        for _ in range(cfg.train.local_steps):
            independent.step(noise_multiplier=metrics[contract.NOISE_MULTIPLIER], sample_rate=q)
        assert metrics[contract.EPSILON] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
        sent = set(reply.content[contract.ARRAYS].keys())
        assert sent and all(k.endswith(".lora_B") for k in sent)
    # Only B can change: the optimizer holds exactly the B tensors
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    trainable = layout.set_trainable(model, ("B",), train_head=False)
    assert {id(p) for p in trainable} == {id(pair.B) for pair in layout.pairs}
    assert {m.split(".")[-1] for m in layout.modules} == {"q_proj", "v_proj"}


def test_two_rounds_of_fedsvd_through_flower_and_the_saved_adapter_reproduces_the_loss(
        tiny_lm_run_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.data import load_corpus
    from common.evaluation import evaluate
    from common.run_config import override_text
    from simulations import run as sim_run
    from tests.test_end_to_end import TINY_KEYS

    keys = (*TINY_KEYS, "model.task", "lora.target-modules", "lora.train-head",
            "lora.head-init", "data.label-column")
    overrides = {k: tiny_lm_run_config[k] for k in keys}
    overrides |= {"output.run-name": "lm", "model.compute-dtype": "float32"}
    code = sim_run.main(["--run-config", override_text(overrides), "--num-supernodes", "3",
                         "--results-dir", str(tmp_path / "results")])
    assert code == 0
    folder = tmp_path / "results" / "lm"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(float(r["perplexity"]) == pytest.approx(math.exp(float(r["loss"])), rel=1e-9)
               for r in rows)
    assert 0 < float(rows[-1]["epsilon-max"]) <= 6.0
    samples = json.loads((folder / "generations.json").read_text())
    assert len(samples) == 3 and all(s["prompt"] and s["completion"] for s in samples)
    # The adapter loads with peft alone and reproduces the server's final loss
    cfg = AppConfig.from_run_config(tiny_lm_run_config)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    model = PeftModel.from_pretrained(base, folder / "adapter")
    corpus = load_corpus(cfg.data, cfg.seed, cfg.model.task_kind)
    test = LM.encode(corpus.test, load_tokenizer(cfg.model), cfg.model.max_length)
    loss, accuracy = evaluate(model, test, task=LM)
    assert loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    assert accuracy == pytest.approx(float(rows[-1]["accuracy"]), abs=1e-9)


def test_two_causal_lm_adapters_merge_like_classification_ones(tiny_lm_run_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merging import load_sources
    from merging.cli import main as merge_main

    cfg = AppConfig.from_run_config(tiny_lm_run_config)
    folders, deltas = [], []
    for seed in (1, 2):  # two peft CAUSAL_LM adapters with a non-zero B
        model = build_model(cfg.model, cfg.lora, num_labels=0, seed=seed)
        layout = AdapterLayout.from_model(model)
        with torch.no_grad():
            for pair in layout.pairs:
                pair.B.normal_(0, 0.1)
        deltas.append({p.module: layout.scale * p.B.detach() @ p.A.detach() for p in layout.pairs})
        folders.append(tmp_path / f"lm{seed}")
        model.save_pretrained(folders[-1])
    rank = 2 * cfg.lora.r  # lossless: the merge holds both sources' components
    assert merge_main(["--rank", str(rank), "--out", str(tmp_path / "merged"),
                       *map(str, folders)]) == 0
    (merged,) = load_sources([tmp_path / "merged"])
    for module, (B, A) in merged.lora.items():
        target = deltas[0][module] + deltas[1][module]
        assert torch.allclose(B.double() @ A.double(), target.double(), atol=1e-5)
    # The merge is a peft adapter of the decoder
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    PeftModel.from_pretrained(base, tmp_path / "merged")


def test_the_default_causal_lm_is_smollm2_dequantized_once_into_the_model_cache(
        tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.config import ModelConfig
    from common.model_path import CACHE_VARIABLE, default_lm_file, resolve_model_path

    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    folder = resolve_model_path(ModelConfig(task="causal-lm"))
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert resolve_model_path(ModelConfig(task="causal-lm")) == folder  # converted once
    gguf = default_lm_file()
    tokenizer = load_tokenizer(ModelConfig(task="causal-lm"))
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The shuttle launch was delayed by a day."
    assert tokenizer(text)["input_ids"] == from_gguf(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_steps_without_running_the_model(tiny_lm_run_config, mode):
    # Llama's attention cannot run on 0 sequences (a reshape with -1): with an expected batch of
    # 8 about 1 step in 3,000 draws an empty batch, so a run of the causal-LM conf failed by chance
    cfg = AppConfig.from_run_config(tiny_lm_run_config)
    data = t.load_local_data(cfg, 0, 2)
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    private = private_sgd(model, layout.set_trainable(model, ("B",), train_head=False),
                          data.train, grad_sample_mode=mode, criterion=SequenceCrossEntropy())
    private.data_loader = [tuple(x[:0] for x in data.train.tensors)]
    assert math.isnan(t.run_local_steps(private, 1))
    assert len(private.engine.accountant.history) == 1
    assert all(pair.B.detach().abs().sum() > 0 for pair in layout.pairs)  # the noise moved B
