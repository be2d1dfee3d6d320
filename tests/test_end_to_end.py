"""The app through Flower end to end: `flwr run` on a private simulation SuperLink."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from test_merging import random_pairs, write_adapter
from torch.utils.data import TensorDataset
from transformers import AutoModelForSequenceClassification

from common.batching import split_batch
from common.config import AppConfig
from common.data import load_corpus
from common.evaluation import evaluate
from common.model import load_tokenizer
from common.run_config import override_text
from common.tasks import TASKS
from merging.sources import load_adapter
from simulations.launch.superlink import flwr_run
from tests.conftest import ROOT

# The keys of the tiny run config (conftest.py) that every run of this module takes over
TINY_KEYS = ("model.path", "model.max-length", "data.source", "data.text-column",
             "data.label-column", "data.max-eval-examples", "data.partitioner",
             "train.batch-size", "train.local-steps", "strategy.num-rounds", "lora.r", "lora.alpha")


def _run_tiny(tiny_run_config: dict, tmp_path, name: str, **extra) -> tuple[Path, list[dict]]:
    """`flwr run` of the tiny config (3 nodes) into ``name``; its folder and metrics rows."""
    overrides = {k: tiny_run_config[k] for k in (*TINY_KEYS, "output.dir")}
    overrides |= {**extra, "output.run-name": name}
    code = flwr_run(ROOT, run_config=override_text(overrides), num_supernodes=3,
                    flwr_home=tmp_path / "flwr-home", timeout=540)
    assert code == 0
    folder = tmp_path / "results" / name
    return folder, _metrics(folder)


def _metrics(folder: Path) -> list[dict]:
    """The rows of a 2-round run's metrics.csv, checked for rounds 0-2 and ε within budget."""
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(0 < float(r["epsilon-max"]) <= 6.0 for r in rows[1:])
    return rows


def _peft_model_and_test(run_config: dict, adapter: Path) -> tuple[PeftModel, TensorDataset]:
    """The adapter loaded by peft alone onto the base model, and the encoded test split."""
    cfg = AppConfig.from_run_config(run_config)
    corpus = load_corpus(cfg.data, cfg.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.path, num_labels=corpus.num_labels, ignore_mismatched_sizes=True)
    return PeftModel.from_pretrained(base, adapter), TASKS["classification"].encode(
        corpus.test, load_tokenizer(cfg.model), cfg.model.max_length)


def _peft_evaluation(run_config: dict, adapter: Path) -> tuple[float, float]:
    """(loss, accuracy) on the test split of the adapter loaded by peft alone."""
    return evaluate(*_peft_model_and_test(run_config, adapter))


@torch.no_grad()
def _peft_accuracy_bounds(model: PeftModel, test: TensorDataset, relative_tolerance: float
                          ) -> tuple[float, float]:
    """The accuracy any evaluation within ``relative_tolerance`` of ``model``'s logits must score.

    ``model``'s logits in float64 are the reference. An example whose top-two margin is below
    ``relative_tolerance`` × its largest |logit| is a near tie that another correct float32
    computation order may decide either way; every other example has one right answer. Returns
    (correct decided examples, correct decided + near ties) / n: exact where rounding cannot
    decide the prediction, and equal bounds when there is no near tie.
    """
    inputs, labels = split_batch(test.tensors)
    logits = model.double().eval()(**inputs).logits
    top2 = logits.topk(2, dim=1).values
    tied = (top2[:, 0] - top2[:, 1]) < relative_tolerance * logits.abs().amax(dim=1)
    decided_right = ((logits.argmax(dim=1) == labels) & ~tied).sum().item()
    assert tied.sum().item() <= 2, "too many near ties for the check to mean anything"
    return decided_right / len(labels), (decided_right + tied.sum().item()) / len(labels)


def test_the_default_launcher_runs_two_rounds_prints_a_line_per_round_and_saves_the_adapter(
        tiny_run_config, tmp_path, capfd):
    """One Flower run through `fedsvd-run` (what `make run` runs) checks three things at once.

    The console gets the start line, one line per round and the summary, and nothing else;
    ``run.log`` holds the rest without the library noise the apps silence; the metrics and the
    saved adapter are complete (loaded by peft alone, it reproduces the server's final
    evaluation).
    """
    from simulations import run as sim_run

    overrides = {k: tiny_run_config[k] for k in TINY_KEYS}
    results = tmp_path / "results"
    # Plain peft computes in float32; on a host with native bfloat16, "auto" would have the
    # server evaluate in bfloat16, and the two losses would differ by about 1e-4.
    overrides = {**overrides, "output.run-name": "e2e", "model.compute-dtype": "float32"}
    code = sim_run.main(["--run-config", override_text(overrides),
                         "--num-supernodes", "3", "--results-dir", str(results)])
    assert code == 0
    out = [line for line in capfd.readouterr().out.splitlines() if line.strip()]
    # One line to start, one per round, the summary: nothing else reaches the console but
    # the warning of a final model that gives (almost) every example one class (the tiny
    # random encoder's usually does)
    one_answer = float(_metrics(results / "e2e")[-1]["most-predicted-share"]) >= 0.99
    warned = [line for line in out if "the final model predicts class" in line]
    assert len(warned) == one_answer, out
    assert [line.split(" | ")[0] for line in out[1:-1] if line not in warned] == [
        "[run] round 1/2", "[run] round 2/2"], out
    assert out[0].startswith("[run] e2e: fedsvd, ε 6, 2 rounds on 3 SuperNodes")
    assert out[-1].startswith("[run] done in ") and "final test accuracy" in out[-1]
    assert " (balanced 0." in out[-1] or " (balanced 1." in out[-1]
    folder = results / "e2e"
    assert "largest client ε" in out[-1] and str(folder) in out[-1]
    # Everything is in run.log, without the library noise the apps silence
    log = (folder / "run.log").read_text()
    assert "Starting Flower Simulation" in log and "round 2 | test accuracy" in log
    assert "broadcast: the whole state to 2 node(s), the changes to 0" in log  # round 1
    assert "StateMismatch" not in log  # every node rebuilt what it was sent
    for noise in ("Loading weights", "Flattening the indices", "is_gradient_checkpointing",
                  "Optimal order is the largest alpha", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        assert noise not in log, noise

    rows = _metrics(folder)
    assert all(int(r["bytes-up"]) > 0 and int(r["bytes-down"]) > 0 for r in rows[1:])
    # What computed it: the precision auto resolved to on this host, as the log says
    environment = json.loads((folder / "environment.json").read_text())
    assert f"frozen encoder computes in {environment['compute-dtype']} here" in log
    assert environment["device"] == "cpu"
    # The saved adapter loads with peft and reproduces the server's final evaluation.
    loss, accuracy = _peft_evaluation(tiny_run_config, folder / "adapter")
    assert accuracy == pytest.approx(float(rows[-1]["accuracy"]), abs=1e-9)
    assert loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    assert torch.isfinite(torch.tensor(loss))


def test_merge_sv_simulation_trains_only_sigma_of_the_merged_adapter(tiny_run_config, tmp_path):
    # Prepare: a rank-4 adapter of the tiny BERT as the merge to adapt
    pairs = random_pairs(np.random.default_rng(0), 4)
    merged = write_adapter(tmp_path / "merged", pairs, r=4, alpha=4, head=False)
    # float32 on the server too, as peft computes
    extra = {"strategy.name": "merge-sv", "strategy.merged-adapter": str(merged),
             "strategy.server-optimizer": "none",
             "model.compute-dtype": "float32"}
    # Execute
    folder, rows = _run_tiny(tiny_run_config, tmp_path, "merge-sv", **extra)
    # Assert: clients uploaded σ and the head only (4 layers × r = 4, head (3, 32) + 3)
    per_client = 4 * (4 * 4 + 3 * 32 + 3)
    assert all(int(r["bytes-up"]) <= int(r["clients-trained"]) * (per_client + 4096)
               for r in rows[1:])
    # The saved adapter is plain LoRA with the merge's subspaces: B A = U diag(σ) Vᵀ lies in
    # the column space of the merge's B and the row space of its A
    for module, (B, A) in load_adapter(folder / "adapter").lora.items():
        U = torch.linalg.svd(pairs[module][0].double())[0][:, :4]
        V = torch.linalg.svd(pairs[module][1].double().T)[0][:, :4]
        delta = B.double() @ A.double()
        assert torch.allclose(U @ (U.T @ delta) @ V @ V.T, delta, atol=1e-5)
    # The server computes s·(A x ⊙ σ) and peft s·B diag(σ) A x: the same map in a different
    # float32 order. On this tiny random model float32 itself is off by about 2e-4 relative
    # (one run: peft 8.39128 in float32, 8.38982 in float64, server 8.39082), enough to flip a
    # near-tied prediction (one run: 0.362 against 0.345, one of 58). So the accuracy is checked
    # exactly on every example rounding cannot decide, and a near tie may go either way.
    model, test = _peft_model_and_test({**tiny_run_config, **extra}, folder / "adapter")
    loss, _ = evaluate(model, test)  # float32, as peft computes
    assert loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-3)
    lowest, highest = _peft_accuracy_bounds(model, test, relative_tolerance=1e-3)
    assert lowest - 1e-9 <= float(rows[-1]["accuracy"]) <= highest + 1e-9


@pytest.mark.parametrize("strength", [1.0, 0.0])
def test_a_declared_class_prior_decides_the_server_evaluation_as_the_saved_adapter_does(
        tiny_run_config, tmp_path, strength):
    """data.class-prior through Flower: the final row's accuracy is argmax(z − τ log π)'s.

    The saved adapter holds the model's own logits; with the prior and strength τ of the run's
    config.json (:func:`common.class_prior.decision_offsets`, :func:`adjusted_decisions`)
    peft alone reproduces the server's decisions: all moved at τ = 1, none at τ = 0.
    """
    from common.class_prior import adjusted_decisions, decision_offsets

    # A prior far from any real one: log(1e-300) = −691 puts every decision on 'space' whatever
    # the logits, while the tiny model's class-name head (kept near its start by the small
    # rate) gives its own argmax to 'sport' by margins of about 10
    prior = "space=1e-300,sport=1,tech=1"
    extra = {"data.class-prior": prior, "data.class-prior-strength": strength,
             "model.compute-dtype": "float32", "train.learning-rate": 0.01}
    folder, rows = _run_tiny(tiny_run_config, tmp_path, "prior", **extra)
    cfg = AppConfig.from_run_config({**tiny_run_config, **extra})
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["data.class-prior"], saved["data.class-prior-strength"]) == (prior, strength)
    names = load_corpus(cfg.data, cfg.seed).label_names
    model, test = _peft_model_and_test({**tiny_run_config, **extra}, folder / "adapter")
    loss, _ = evaluate(model, test)
    assert loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)  # the model's own loss
    inputs, labels = split_batch(test.tensors)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    offsets = decision_offsets(cfg.data.declared_prior, names, saved["data.class-prior-strength"])
    decided = adjusted_decisions(logits, offsets)
    assert (logits.argmax(-1) != 0).any()
    if strength:
        assert (decided == 0).all()  # the prior moved them
    else:
        assert torch.equal(decided, logits.argmax(-1))  # τ = 0: plain argmax
    accuracy = (decided == labels).double().mean().item()
    assert accuracy == pytest.approx(float(rows[-1]["accuracy"]), abs=1e-9)
    if strength:
        assert float(rows[-1]["most-predicted-share"]) == 1.0


def test_a_census_prior_is_counted_under_dp_by_every_node_before_it_trains(tiny_run_config,
                                                                           tmp_path):
    """data.class-prior = "census" through Flower: each node's ledger starts with its census.

    The server writes the shares it decided by (class-prior.json, every class > 0, summing to
    1, from all 3 partitions); each node's ledger holds (σ_c, 1, 1) first, then its DP-SGD
    steps at a σ calibrated after it, and the ε the rows report covers both within the budget.
    """
    from privacy.accounting import PrivacyLedger
    from privacy.census import census_entry

    folder, rows = _run_tiny(tiny_run_config, tmp_path, "census",
                             **{"data.class-prior": "census"})
    prior = json.loads((folder / "class-prior.json").read_text())
    assert sorted(prior["shares"]) == ["space", "sport", "tech"]
    assert all(s > 0 for s in prior["shares"].values())
    assert sum(prior["shares"].values()) == pytest.approx(1.0)
    assert prior["partitions"] == [0, 1, 2] and prior["noise-multiplier"] == 10.0
    epsilons = []
    for partition in range(3):
        ledger, sigma = PrivacyLedger.load(folder / "privacy" / f"partition-{partition}.json",
                                           "rdp")
        assert ledger.history[0] == census_entry(10.0)
        if len(ledger.history) > 1:  # sampled at least once
            assert sigma is not None and ledger.history[1][0] == sigma
        epsilons.append(ledger.epsilon(1e-5))
    assert max(float(r["epsilon-max"]) for r in rows[1:]) <= max(epsilons) <= 6.0
