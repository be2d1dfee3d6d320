"""The leave-one-group-out experiment's plan, merges and report, with a fake Flower runner."""

import csv
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from test_merging import MODULES

from common.config import DataConfig
from common.data import load_corpus, select_labels
from common.run_config import override_text
from simulations import merge_experiment as mx
from simulations.experiments.cells import cell_config


class FakeFlower:
    """Writes what a finished ServerApp run writes: config.json, metrics.csv, a peft adapter."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, items, log):
        cfg = cell_config(items)
        self.calls.append(cfg.to_dict())
        folder = mx.Path(cfg.output.dir) / cfg.run_name
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        final = 0.3 + 0.1 * (cfg.strategy.name == "merge-sv") + 0.01 * cfg.seed
        with (folder / "metrics.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "accuracy", "loss", "bytes-up", "bytes-down"])
            for r in range(cfg.strategy.num_rounds + 1):
                writer.writerow([r, final * r / cfg.strategy.num_rounds, 1.0,
                                 "" if r == 0 else 1000, "" if r == 0 else 4000])
        rng = np.random.default_rng(len(self.calls))
        num_labels = len(cfg.data.labels) + 2  # heads differ between groups, as for real
        LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"],
                   base_model_name_or_path=cfg.model.path,
                   modules_to_save=["classifier"]).save_pretrained(folder / "adapter")
        tensors = {"base_model.model.classifier.modules_to_save.default.weight":
                   torch.zeros(num_labels, 32)}
        for module in MODULES:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.tensor(
                rng.normal(size=(4, 32)), dtype=torch.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.tensor(
                rng.normal(size=(32, 4)), dtype=torch.float32)
        save_file(tensors, folder / "adapter" / "adapter_model.safetensors")
        return 0


@pytest.fixture
def overrides(tiny_run_config) -> str:
    """``--run-config`` for every run: the tiny test model, rank and rounds."""
    return override_text({k: tiny_run_config[k] for k in (
        "model.path", "lora.r", "lora.alpha", "strategy.num-rounds")})


def test_groups_cover_the_newsgroups_classes_but_the_single_forsale_one():
    corpus = load_corpus(DataConfig(), 0)
    sizes = {g: select_labels(corpus, pats).num_labels for g, pats in mx.GROUPS.items()}
    assert sizes == {"comp": 5, "rec": 4, "sci": 4, "politics": 3, "religion": 3}
    assert sum(sizes.values()) == corpus.num_labels - 1


def test_sources_merges_targets_and_report(overrides, tmp_path):
    fake = FakeFlower()
    argv = ["--target", "sci", "--epsilons", "inf,3", "--seeds", "0,1", "--out",
            str(tmp_path), "--run-config", overrides]
    # Execute
    code = mx.main(argv, runner=fake)
    # Assert: 4 sources (not sci), every merge written, 2 ε × 2 seeds × (4 merges + scratch)
    assert code == 0
    sources, targets = fake.calls[:4], fake.calls[4:]
    assert [c["data.labels"] for c in sources] == [mx.labels(g) for g in
                                                   ("comp", "rec", "politics", "religion")]
    assert all(c["strategy.name"] == "fedsvd" and c["privacy.epsilon"] == float("inf")
               for c in sources)
    for method in mx.MERGES:
        provenance = json.loads(
            (tmp_path / "merges" / "target-sci" / method / "merge.json").read_text())
        assert len(provenance["sources"]) == 4
    assert len(targets) == 2 * 2 * 5
    assert all(c["data.labels"] == "sci.*" for c in targets)
    merged = {c["strategy.merged-adapter"] for c in targets if c["strategy.name"] == "merge-sv"}
    assert merged == {str((tmp_path / "merges" / "target-sci" / m).resolve()) for m in mx.MERGES}
    text = (tmp_path / "target-sci" / "results.md").read_text()
    assert "| merge-sv-axis | 0.4050 ± 0.0635 | 0.4050 ± 0.0635 |" in text
    assert "| scratch |" in text
    rows = list(csv.DictReader((tmp_path / "target-sci" / "merge.csv").open()))
    assert {r["method"] for r in rows} == {*(f"merge-sv-{m}" for m in mx.MERGES), "scratch"}
    # the method is data the plan wrote, never read back out of a run's name
    methods = json.loads((tmp_path / "target-sci" / "methods.json").read_text())
    assert len(methods) == 20 and methods["merge-sv-ties-eps3-seed1"] == "merge-sv-ties"
    assert methods["scratch-epsinf-seed0"] == "scratch"
    # Resuming runs nothing again
    again = FakeFlower()
    assert mx.main(argv, runner=again) == 0 and again.calls == []


def test_report_lists_every_command_and_fills_the_readme(overrides, tmp_path):
    out = tmp_path / "loo"
    common = ["--target", "sci", "--merges", "axis", "--out", str(out), "--run-config", overrides]
    first, second = [*common, "--epsilons", "3"], [*common, "--epsilons", "6"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- merge-table:target-sci:start -->\nold\n"
                      "<!-- merge-table:target-sci:end -->\nend\n")
    # Execute: two invocations into one target folder, then the report into the README
    assert mx.main(first, runner=FakeFlower()) == 0
    assert mx.main(second, runner=FakeFlower()) == 0
    assert mx.main([*first, "--report-only", "--readme", str(readme)]) == 0
    # Assert: both commands (once each, without the report flags), both ε, plots copied
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    commands = [line for line in text.splitlines() if line.startswith("python -m")]
    assert commands == [f"python -m simulations.merge_experiment {mx.shlex.join(a)}"
                        for a in (first, second)]
    assert "| method | ε = 6 | ε = 3 |" in text and "| merge-sv-axis | 0.4000 | 0.4000 |" in text
    static = tmp_path / "_static" / "merge-loo" / "target-sci"
    assert {"merge.csv", "summary.csv", "accuracy_vs_round_a0.5.png"} <= {
        f.name for f in static.iterdir()}
    assert ("![accuracy_vs_round_a0.5](_static/merge-loo/target-sci/accuracy_vs_round_a0.5.png)"
            in text)


def test_a_report_without_the_methods_of_its_runs_is_refused(overrides, tmp_path, capsys):
    argv = ["--target", "sci", "--merges", "axis", "--epsilons", "3", "--out", str(tmp_path),
            "--run-config", overrides]
    assert mx.main(argv, runner=FakeFlower()) == 0
    (tmp_path / "target-sci" / mx.METHODS_FILE).unlink()  # a folder from before the file
    capsys.readouterr()
    assert mx.main([*argv, "--report-only"]) == 2
    assert "no method for merge-sv-axis-eps3-seed0, scratch-eps3-seed0; run the experiment's " \
        "command again" in capsys.readouterr().err
    assert mx.main(argv, runner=FakeFlower()) == 0  # which writes it back, running nothing


def test_report_into_a_readme_without_markers_changes_nothing(overrides, tmp_path, capsys):
    argv = ["--target", "sci", "--merges", "axis", "--epsilons", "3", "--out", str(tmp_path),
            "--run-config", overrides]
    assert mx.main(argv, runner=FakeFlower()) == 0
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    capsys.readouterr()
    assert mx.main([*argv, "--report-only", "--readme", str(readme)]) == 2
    assert "merge-table:target-sci:start" in capsys.readouterr().err.splitlines()[-2]
    assert readme.read_text() == "no markers here\n"
    assert not (tmp_path / "_static").exists()


def test_unknown_merge_method_is_refused():
    with pytest.raises(SystemExit):
        mx.parse_args(["--target", "sci", "--merges", "axis,mean"])


def test_robustness_variants_merge_damaged_copies(overrides, tmp_path):
    fake = FakeFlower()
    argv = ["--target", "rec", "--epsilons", "3", "--merges", "axis", "--variants",
            "clean,noise,half", "--out", str(tmp_path), "--run-config", overrides]
    assert mx.main(argv, runner=fake) == 0
    targets = [c["output.run-name"] for c in fake.calls[4:]]
    assert targets == ["merge-sv-axis-eps3-seed0", "merge-sv-axis-noise-eps3-seed0",
                       "merge-sv-axis-half-eps3-seed0", "scratch-eps3-seed0"]
    assert [p.name for p in (tmp_path / "sources-noise").iterdir()] == ["source-comp"]
    assert len(list((tmp_path / "sources-half").iterdir())) == 4
    noise = json.loads((tmp_path / "merges" / "target-rec" / "axis-noise" / "merge.json")
                       .read_text())
    paths = [s["path"] for s in noise["sources"]]
    assert "sources-noise" in paths[0] and all("sources-noise" not in p for p in paths[1:])
    merged = {c["strategy.merged-adapter"] for c in fake.calls[4:] if "merged-adapter" in str(c)}
    assert str((tmp_path / "merges" / "target-rec" / "axis-half").resolve()) in merged


def test_random_control_replaces_every_source_by_noise(overrides, tmp_path):
    argv = ["--target", "sci", "--epsilons", "3", "--merges", "axis", "--variants",
            "noise,random", "--out", str(tmp_path), "--run-config", overrides]
    assert mx.main(argv, runner=FakeFlower()) == 0
    merges = tmp_path / "merges" / "target-sci"
    noise, random = (json.loads((merges / m / "merge.json").read_text())["sources"]
                     for m in ("axis-noise", "axis-random"))
    assert all("sources-noise" in s["path"] for s in random)
    assert noise[0]["path"] == random[0]["path"]  # the first source's noise copy is shared
    assert (tmp_path / "target-sci" / "merge-sv-axis-random-eps3-seed0" / "metrics.csv").is_file()


def test_sources_of_another_epsilon_are_not_reused(overrides, tmp_path, capsys):
    argv = ["--target", "sci", "--merges", "axis", "--epsilons", "3", "--out", str(tmp_path),
            "--run-config", overrides]
    assert mx.main(argv, runner=FakeFlower()) == 0
    # Execute: the same folder, sources now asked for at ε = 6
    again = FakeFlower()
    code = mx.main([*argv, "--source-epsilon", "6"], runner=again)
    # Assert: refused before anything runs, naming the run and the key
    assert code == 2 and again.calls == []
    err = capsys.readouterr().err
    assert "sources/source-comp" in err and "privacy.epsilon: inf there, 6.0 now" in err


def test_a_second_target_merges_its_own_sources(overrides, tmp_path, capsys):
    common = ["--merges", "axis", "--epsilons", "3", "--out", str(tmp_path),
              "--run-config", overrides]
    assert mx.main(["--target", "sci", *common], runner=FakeFlower()) == 0
    # Execute: hold out rec in the same folder (sources comp, politics, religion are reused)
    fake = FakeFlower()
    assert mx.main(["--target", "rec", *common], runner=fake) == 0
    # Assert: only the sci source is new, and rec's merge holds no rec source
    assert [c["output.run-name"] for c in fake.calls
            if c["output.run-name"].startswith("source-")] == ["source-sci"]
    provenance = json.loads((tmp_path / "merges" / "target-rec" / "axis" / "merge.json")
                            .read_text())
    names = [mx.Path(s["path"]).parent.name for s in provenance["sources"]]
    assert names == ["source-comp", "source-sci", "source-politics", "source-religion"]
    # A saved merge of other sources is refused, not reused
    sci_merge = tmp_path / "merges" / "target-sci" / "axis"
    (sci_merge / "merge.json").write_text(
        (tmp_path / "merges" / "target-rec" / "axis" / "merge.json").read_text())
    again = FakeFlower()
    assert mx.main(["--target", "sci", *common], runner=again) == 2
    assert again.calls == []
    assert "merged from" in capsys.readouterr().err
