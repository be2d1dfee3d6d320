"""Segment ids (token_type_ids) of a sentence pair reach a BERT-family model; one text is unchanged.

A classifier's tensors carry the tokenizer's segment ids wherever it returns them
(:mod:`common.batching`): 0 on the first text, 1 on the second. The tiny BERT of conftest.py has
two token types with random, distinct embeddings, so a pair read without them gives other logits.
"""

import pytest
import torch
from datasets import Dataset
from torch.utils.data import TensorDataset
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

from client import training as t
from common.adapter import AdapterLayout
from common.batching import split_batch
from common.config import AppConfig
from common.data_sources import TEXT_PAIR
from common.evaluation import batch_logits
from common.model import build_model, load_tokenizer
from common.tasks import TASKS
from tests.helpers import global_arrays, private_sgd
from tests.test_hf_datasets import save_glue_like

CLASSIFICATION = TASKS["classification"]
CPU = torch.device("cpu")


def _segment_embeddings(model) -> torch.nn.Embedding:
    return model.get_base_model().bert.embeddings.token_type_embeddings


def test_a_pair_is_evaluated_as_the_model_reads_the_tokenizers_own_pair(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    model = build_model(cfg.model, cfg.lora, num_labels=3, seed=0).eval()
    tokenizer = load_tokenizer(cfg.model)
    texts = ["a cat sat on the mat", "the rocket left orbit for the moon", "short"]
    pairs = ["an animal sat", "a launch", "a much longer second text than the first"]
    # labels 0, 1, 2 name the examples: evaluation visits them in length order
    data = CLASSIFICATION.encode(Dataset.from_dict({"text": texts, TEXT_PAIR: pairs,
                                                    "label": [0, 1, 2]}), tokenizer, 32)
    reached: list[torch.Tensor] = []
    _segment_embeddings(model).register_forward_hook(lambda _, args, o: reached.append(args[0]))
    with torch.no_grad():
        [(logits, labels)] = batch_logits(model, data)  # one batch, trimmed
        own = tokenizer(texts, pairs, padding=True, return_tensors="pt")
        expected = model(**own).logits
        unsegmented = model(input_ids=own["input_ids"],
                            attention_mask=own["attention_mask"]).logits
    assert own["token_type_ids"].max() == 1
    assert torch.equal(reached[0], own["token_type_ids"][labels])  # the evaluated batch's
    # logits of about 0.02; the segment ids move them by 6e-5 to 2e-4 (10 random tiny BERTs)
    torch.testing.assert_close(logits[labels.argsort()], expected, rtol=0, atol=1e-7)
    assert (unsegmented - expected).abs().max() > 1e-5  # the check can tell them apart


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_dp_sgd_on_pairs_feeds_each_examples_segment_ids_to_the_frozen_embedding(
        tiny_run_config, tmp_path, grad_sample_mode):
    cfg = AppConfig.from_run_config({
        **tiny_run_config, "data.source": str(save_glue_like(tmp_path / "glue")),
        "data.text-column": "premise,hypothesis", "data.label-column": "label",
        "data.test-split": "validation", "data.min-test-examples": 10,
        "privacy.grad-sample-mode": grad_sample_mode})
    data = t.load_local_data(cfg, 0, 2)
    ids, _, segments, _ = data.train.tensors
    model = build_model(cfg.model, cfg.lora, num_labels=data.num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    trainable = layout.set_trainable(model, ("B",), cfg.lora.train_head)
    embedding = _segment_embeddings(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input_ids, segment ids) per forward
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (kwargs["input_ids"], kwargs["token_type_ids"])), with_kwargs=True)
    reached: list[torch.Tensor] = []
    embedding.register_forward_hook(lambda _, args, out: reached.append(args[0]))
    before = layout.tensors(("B",), head=False)
    private = private_sgd(model, trainable, data.train, grad_sample_mode=grad_sample_mode,
                          loader=t.train_loader(data.train, cfg.train.batch_size, CPU))
    torch.manual_seed(0)
    t.run_local_steps(private, 2)
    assert len(seen) == len(reached) == 2
    for (batch_ids, batch_segments), embedded in zip(seen, reached, strict=True):
        assert torch.equal(embedded, batch_segments)  # what the batch carried
        width = batch_ids.shape[1]  # trimmed: each row is an example of data.train, cut
        padded = torch.nn.functional.pad(batch_ids, (0, ids.shape[1] - width))  # [PAD] is 0
        rows = (ids[:, None] == padded[None]).all(-1).int().argmax(0)  # (B,) its index
        assert torch.equal(ids[rows], padded)
        assert torch.equal(batch_segments, segments[rows, :width])
    assert torch.cat([s.flatten() for _, s in seen]).max() == 1  # second texts were read
    assert t.moved_norm(before, layout, ("B",), require_each=True) > 0
    assert not embedding.weight.requires_grad and not hasattr(embedding.weight, "grad_sample")
    if grad_sample_mode == "hooks":  # Opacus' per-example gradients of what trains
        assert all(p.grad_sample.shape == (len(seen[-1][0]), *p.shape) for p in trainable)


def _one_round(cfg: AppConfig, dataset: TensorDataset, num_labels: int, arrays):
    """Logits on ``dataset`` before, then B and the head after two DP-SGD steps on it."""
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=0)
    layout = AdapterLayout.from_model(model)
    layout.load(arrays.to_torch_state_dict())
    inputs, _ = split_batch(dataset.tensors)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    model.train()  # Opacus wraps a model in training mode
    private = private_sgd(model, layout.set_trainable(model, ("B",), cfg.lora.train_head),
                          dataset, loader=t.train_loader(dataset, cfg.train.batch_size, CPU))
    torch.manual_seed(0)
    loss = t.run_local_steps(private, 2)
    return logits, loss, layout.tensors(("B",), head=cfg.lora.train_head)


def test_a_single_texts_zero_segments_change_no_logit_and_no_dp_sgd_step(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    data = t.load_local_data(cfg, 0, 2)
    ids, mask, segments, labels = data.train.tensors
    assert not segments.any()
    arrays = global_arrays(cfg, data.num_labels)  # a non-zero B: LoRA in the logits too
    with_segments = _one_round(cfg, data.train, data.num_labels, arrays)
    before = _one_round(cfg, TensorDataset(ids, mask, labels), data.num_labels, arrays)
    assert torch.equal(with_segments[0], before[0]) and with_segments[1] == before[1]
    assert with_segments[2].keys() == before[2].keys()
    assert all(torch.equal(with_segments[2][k], before[2][k]) for k in before[2])


def test_roberta_takes_no_segment_ids_and_reads_zeros_as_none():
    # Its tokenizer returns none (so none are stored); its one token type makes zeros harmless
    assert "token_type_ids" not in RobertaTokenizer.model_input_names
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, type_vocab_size=1)
    model = RobertaForSequenceClassification(config).eval()
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        zeros = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      token_type_ids=torch.zeros_like(ids)).logits
    assert torch.equal(plain, zeros)
