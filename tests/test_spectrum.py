"""fedsvd-spectrum: intruders, effective rank, A's orthonormality, forgetting, the command."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from common.config import AppConfig, DataConfig
from common.forgetting import encode_texts, forgetting, linear_cka, merged
from common.model import build_model, load_tokenizer
from common.out_of_domain import source_problem, untouched_groups
from common.tasks import TASKS
from kernels.spectrum import (
    count_intruders,
    effective_rank,
    intruder_similarity,
    row_orthonormality_gap,
)
from merging.sources import lora_scale
from simulations import spectrum

REFUSED = "refused before starting: nothing was run"


def orthonormal(rng, rows, cols):
    """A rows × cols matrix with orthonormal columns (rows ≥ cols)."""
    q, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q


def base_weight(rng, m=48, n=32):
    """W0 = U0 diag(s) V0ᵀ (m, n), distinct singular values 10 … 0.1; and U0, s, V0."""
    U0, V0 = orthonormal(rng, m, n), orthonormal(rng, n, n)
    s = np.geomspace(10.0, 0.1, n)
    return (U0 * s) @ V0.T, U0, s, V0


def t(*arrays):
    """numpy matrices as one (L, rows, cols) float64 stack."""
    return torch.tensor(np.stack(arrays))


# --- intruder dimensions ------------------------------------------------------------------


def test_an_update_inside_w0s_top_subspace_has_no_intruders():
    # Prepare: ΔW = U0_k M V0_kᵀ with M = larger top singular values plus a small generic mix
    rng = np.random.default_rng(0)
    W0, U0, s, V0 = base_weight(rng)
    k = 10
    M = np.diag(0.5 * s[:k]) + 0.01 * rng.normal(size=(k, k))
    delta = U0[:, :k] @ M @ V0[:, :k].T
    # Execute
    similarity = intruder_similarity(t(W0), t(W0 + delta), k)
    # Assert
    assert count_intruders(similarity, 0.5).tolist() == [0]
    assert float(similarity.min()) > 0.99


@pytest.mark.parametrize(("sigma", "k", "expected"), [
    (5.0, 10, 1),  # above W0's 10th singular value (2.6): among the top 10, one intruder
    (1.0, 10, 0),  # below it: not among the top 10
    (1.0, 32, 1),  # ... but among the top 32
])
def test_one_planted_orthogonal_direction_is_exactly_one_intruder(sigma, k, expected):
    # Prepare: u ⊥ every left singular vector of W0; ΔW = σ u v_nᵀ on W0's smallest direction,
    # so W0 + ΔW has the left singular vector (s_n u_n + σ u) / √(s_n² + σ²), |cos| with
    # u_n = s_n / √(s_n² + σ²) ≈ 0.02 and 0 with every other u_i; the rest of W0 is unchanged
    rng = np.random.default_rng(1)
    W0, U0, s, V0 = base_weight(rng)
    u = rng.normal(size=W0.shape[0])
    u -= U0 @ (U0.T @ u)
    u /= np.linalg.norm(u)
    delta = sigma * np.outer(u, V0[:, -1])
    # Execute
    similarity = intruder_similarity(t(W0), t(W0 + delta), k)
    # Assert
    assert count_intruders(similarity, 0.5).tolist() == [expected]
    if expected:
        assert float(similarity.min()) == pytest.approx(s[-1] / math.hypot(s[-1], sigma),
                                                        abs=1e-6)


def test_the_threshold_decides_a_rotated_pair():
    # Prepare: in a square W0, replace the bottom two directions by σ y1 v_aᵀ + σ' y2 v_bᵀ with
    # y1, y2 = (u_a ± u_b) / √2: an exact SVD whose new vectors have |cos| = 1/√2 with W0's
    rng = np.random.default_rng(2)
    W0, U0, s, V0 = base_weight(rng, 32, 32)
    y1, y2 = (U0[:, -2] + U0[:, -1]) / 2**0.5, (U0[:, -2] - U0[:, -1]) / 2**0.5
    W = W0 - s[-2] * np.outer(U0[:, -2], V0[:, -2]) - s[-1] * np.outer(U0[:, -1], V0[:, -1])
    W += 20.0 * np.outer(y1, V0[:, -2]) + 15.0 * np.outer(y2, V0[:, -1])
    similarity = intruder_similarity(t(W0), t(W), 10)
    # Execute / Assert: 1/√2 ≈ 0.707 is above 0.5 and below 0.8
    assert count_intruders(similarity, 0.5).tolist() == [0]
    assert count_intruders(similarity, 0.8).tolist() == [2]
    assert similarity[0, :2].tolist() == pytest.approx([2**-0.5] * 2, abs=1e-6)


def test_batched_similarity_matches_a_per_matrix_loop():
    rng = np.random.default_rng(3)
    W0 = rng.normal(size=(3, 12, 8))
    W = W0 + 0.5 * rng.normal(size=(3, 12, 8))
    got = intruder_similarity(torch.tensor(W0), torch.tensor(W), k=5).numpy()
    for layer in range(3):
        u0 = np.linalg.svd(W0[layer], full_matrices=False)[0]
        u = np.linalg.svd(W[layer], full_matrices=False)[0][:, :5]
        np.testing.assert_allclose(got[layer], np.abs(u.T @ u0).max(axis=1), atol=1e-6)


def test_bad_shapes_and_thresholds_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        intruder_similarity(torch.zeros(1, 4, 3), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="stack"):
        intruder_similarity(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        count_intruders(torch.zeros(1, 3), 0.0)


# --- effective rank and A's orthonormality ------------------------------------------------


def test_effective_rank_of_known_spectra():
    p = np.array([0.75, 0.25])
    spectra = torch.tensor([[5.0, 0, 0, 0], [2.0, 2, 2, 0], [1.0, 1, 1, 1], [0.0, 0, 0, 0],
                            [3.0, 1, 0, 0], [30.0, 10, 0, 0]])
    assert effective_rank(spectra).tolist() == pytest.approx(
        [1, 3, 4, 0, math.exp(-(p * np.log(p)).sum()), math.exp(-(p * np.log(p)).sum())])
    # of a matrix: a rank-3 ΔW with equal singular values
    rng = np.random.default_rng(4)
    delta = torch.tensor(orthonormal(rng, 20, 3) @ orthonormal(rng, 16, 3).T)
    assert float(effective_rank(torch.linalg.svdvals(delta)[None])) == pytest.approx(3, abs=1e-5)


def test_a_with_orthonormal_rows_is_at_distance_zero():
    rng = np.random.default_rng(5)
    A = torch.tensor(orthonormal(rng, 24, 4).T[None])  # (1, 4, 24), orthonormal rows
    assert float(row_orthonormality_gap(A)) == pytest.approx(0, abs=1e-6)
    # 2 A: A Aᵀ − I = 3 I, Frobenius 3 √4
    assert float(row_orthonormality_gap(2 * A)) == pytest.approx(6, abs=1e-5)


def test_lora_scale_reads_rslora_and_patterns():
    assert lora_scale(LoraConfig(r=4, lora_alpha=8), "q") == (4, 2.0)
    assert lora_scale(LoraConfig(r=4, lora_alpha=8, use_rslora=True), "q") == (4, 4.0)
    assert lora_scale(LoraConfig(r=4, lora_alpha=8, rank_pattern={"v": 2}), "v") == (2, 4.0)


# --- forgetting -----------------------------------------------------------------------------


def test_linear_cka_is_one_for_the_same_geometry_and_invariant_as_claimed():
    rng = np.random.default_rng(6)
    X = torch.tensor(rng.normal(size=(50, 8)))
    Q = torch.tensor(orthonormal(rng, 8, 8))
    Y = torch.tensor(rng.normal(size=(50, 6)))
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, 3.0 * X @ Q) == pytest.approx(1.0)  # orthogonal + isotropic scaling
    assert linear_cka(3.0 * X @ Q + 1.0, Y) == pytest.approx(linear_cka(X, Y))  # and a shift
    stretched = X * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])  # not isotropic: a change
    assert linear_cka(X, stretched) < 0.9
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(5, 2), X[:5])


def test_merged_adds_delta_and_restores_w0(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config)
    model = TASKS["classification"].load_model(cfg.model.path, num_labels=2)
    name = "bert.encoder.layer.0.attention.self.query"
    w0 = model.get_submodule(name).weight.detach().clone()
    delta = torch.randn_like(w0)
    with merged(model, {name: delta}):
        assert torch.allclose(model.get_submodule(name).weight, w0 + delta)
    assert torch.equal(model.get_submodule(name).weight, w0)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_the_base_model_against_itself_forgot_nothing(task, tiny_run_config,
                                                      tiny_lm_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config if task == "classification"
                                    else tiny_lm_run_config)
    model = TASKS[task].load_model(cfg.model.path, num_labels=2).eval()
    texts = [f"the {w} of a rocket and a team" for w in ("orbit", "game", "chip", "moon")] * 3
    data = encode_texts(TASKS[task], texts, load_tokenizer(cfg.model), 16)
    zero = {name: torch.zeros_like(module.weight) for name, module in model.named_modules()
            if name.endswith(("query", "q_proj"))}
    measured = forgetting(model, zero, data, TASKS[task])
    assert measured.forgetting == pytest.approx(0.0, abs=1e-6)
    assert measured.tuned == pytest.approx(measured.base)


def test_out_of_domain_groups_are_those_no_run_touched():
    graphics = DataConfig(labels=("comp.graphics",))
    assert untouched_groups([graphics]) == ["misc", "politics", "rec", "religion", "sci"]
    assert untouched_groups([graphics, DataConfig(labels=("sci.*", "rec.autos"))]) == [
        "misc", "politics", "religion"]
    assert untouched_groups([DataConfig()]) == []  # all 20 newsgroups
    assert "every topic group" in source_problem("newsgroups", [DataConfig()])
    assert source_problem("sms", [DataConfig()]) is None


# --- the command on saved runs ----------------------------------------------------------------


def saved_run(folder, run_config, num_labels):
    """A run folder as server.results.save_run writes it: config.json and adapter/ (B ≠ 0)."""
    cfg = AppConfig.from_run_config(run_config)
    model = build_model(cfg.model, cfg.lora, num_labels=num_labels, seed=cfg.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 0.5)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    model.save_pretrained(folder / "adapter")
    return model


def test_the_command_measures_a_classifier_and_a_causal_lm_side_by_side(
        tiny_run_config, tiny_lm_run_config, tmp_path, capsys):
    # Prepare: one saved run of each task
    bert = saved_run(tmp_path / "bert-run", tiny_run_config, 3)
    saved_run(tmp_path / "llama-run", tiny_lm_run_config, 0)
    out = tmp_path / "spectrum"
    # Execute
    code = spectrum.main([str(tmp_path / "bert-run"), str(tmp_path / "llama-run"),
                          "--out", str(out), "--forgetting", "sms", "--texts", "20"])
    # Assert: one row per run × layer, in model order; the numbers are peft's own ΔW's
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / spectrum.SPECTRUM_FILE).open()))
    assert [(r["run"], r["layer"].rsplit(".", 1)[-1]) for r in rows] == [
        ("bert-run", "query"), ("bert-run", "value")] * 2 + [
        ("llama-run", "q_proj"), ("llama-run", "v_proj")] * 2
    layer = bert.base_model.model.get_submodule(rows[0]["layer"])
    delta = layer.get_delta_weight("default").detach()
    assert float(rows[0]["sigma_1"]) == pytest.approx(float(torch.linalg.svdvals(delta)[0]),
                                                      rel=1e-5)
    A = layer.lora_A["default"].weight.detach()[None]
    assert float(rows[0]["a_orthonormality_gap"]) == pytest.approx(
        float(row_orthonormality_gap(A)), rel=1e-5)  # peft's Kaiming A: not orthonormal
    assert list(rows[0]) == [*spectrum.COLUMNS, "sigma_1", "sigma_2", "sigma_3", "sigma_4"]
    assert {r["top_k"] for r in rows} == {"10"} and {r["r"] for r in rows} == {"4"}
    forgotten = {r["run"]: r for r in csv.DictReader((out / spectrum.FORGETTING_FILE).open())}
    assert list(forgotten["bert-run"]) == list(spectrum.FORGETTING_COLUMNS)
    assert forgotten["bert-run"]["measure"] == "linear-cka"
    assert forgotten["llama-run"]["measure"] == "log-perplexity"
    assert all(float(r["forgetting"]) == float(r["forgetting"]) for r in forgotten.values())
    assert all((out / name).stat().st_size > 0 for name in spectrum.PLOT_FILES)
    assert "| bert-run | fedsvd |" in capsys.readouterr().out


def test_bad_folders_and_options_are_refused_before_any_model_loads(tiny_run_config, tmp_path,
                                                                    capsys):
    # Prepare: no folder; a folder without adapter; a base model that is not there
    saved_run(tmp_path / "good", tiny_run_config, 3)
    (tmp_path / "no-adapter").mkdir()
    (tmp_path / "no-adapter" / "config.json").write_text(
        (tmp_path / "good" / "config.json").read_text())
    lost = tmp_path / "lost-model"
    saved_run(lost, tiny_run_config, 3)
    config = json.loads((lost / "config.json").read_text())
    (lost / "config.json").write_text(json.dumps({**config, "model.path": "/no/such/model"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / spectrum.SPECTRUM_FILE).write_text("made by a user")
    # Execute
    code = spectrum.main([str(tmp_path / "absent"), str(tmp_path / "no-adapter"), str(lost),
                          "--out", str(tmp_path / "out"), "--threshold", "0"])
    # Assert: every problem named, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == REFUSED
    assert any(f"{tmp_path / 'absent'}: no such run folder" in line for line in err)
    assert any(str(tmp_path / "no-adapter") in line and "adapter" in line for line in err)
    assert any(str(lost) in line and "/no/such/model" in line for line in err)
    assert any("--threshold 0" in line for line in err)
    assert any("--force" in line for line in err)
    assert (tmp_path / "out" / spectrum.SPECTRUM_FILE).read_text() == "made by a user"


def test_a_hub_model_that_is_not_in_the_cache_is_refused_not_downloaded(
        hub, tiny_run_config, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(*args, local_files_only=False, **kwargs):
        assert local_files_only, "fedsvd-spectrum asked the hub"
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, yet nothing is fetched
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    run = tmp_path / "hub-run"
    saved_run(run, tiny_run_config, 3)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model.path": "owner/absent"}))
    code = spectrum.main([str(run), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == REFUSED
    assert "owner/absent" in err and "hf download owner/absent" in err
    assert "downloads nothing" in err and not (tmp_path / "out").exists()


def test_newsgroups_text_comes_from_the_test_posts_of_untouched_groups_only():
    from common.data import NEWSGROUPS_TOPICS, load_corpus
    from common.out_of_domain import out_of_domain_texts
    from common.task_kinds import CAUSAL_LM

    graphics = [DataConfig(labels=("comp.graphics",))]
    held_out = out_of_domain_texts("newsgroups", graphics, 30)
    assert held_out.description == ("20 Newsgroups test posts of "
                                    "misc+politics+rec+religion+sci")
    assert len(held_out.texts) == 30 and all(text.strip() for text in held_out.texts)
    assert out_of_domain_texts("newsgroups", graphics, 30) == held_out  # seeded
    others = load_corpus(DataConfig(labels=tuple(
        n for g in ("misc", "politics", "rec", "religion", "sci") for n in NEWSGROUPS_TOPICS[g])),
        0, CAUSAL_LM)
    assert set(held_out.texts) <= set(others.test["text"])
