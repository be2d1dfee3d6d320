"""A model folder or a LoRA the model cannot take is refused before any launch, naming both."""

import json
import shutil

import pytest

from common.config import ConfigError, LoraSettings, ModelConfig
from common.model_checks import check_model
from simulations import run as sim_run
from tests.test_launcher import _tiny_overrides


def _copy_with_config(folder, tmp_path, config: dict):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_rank_above_the_smallest_side_of_a_target_module_is_refused(tiny_model_dir,
                                                                       tiny_llama_dir):
    model = ModelConfig(path=str(tiny_model_dir))
    check_model(model, LoraSettings(r=32))  # the tiny BERT is 32 wide: r = 32 fits
    with pytest.raises(ConfigError) as caught:
        check_model(model, LoraSettings(r=33))
    assert caught.value.problems == [
        "lora.r=33: above 32, the smaller side of the weight (32 × 32) of the target module "
        f"'bert.encoder.layer.0.attention.self.query' of model.path='{tiny_model_dir}' "
        f"({tiny_model_dir / 'config.json'}); ΔW = B A of that weight has rank at most 32: "
        "set lora.r <= 32"]
    # the tiny Llama's v_proj maps 64 to 2 key-value heads of 16: its side is 32, q_proj's 64
    llama = ModelConfig(task="causal-lm", path=str(tiny_llama_dir))
    with pytest.raises(ConfigError, match=r"lora.r=33: above 32, .* \(32 × 64\) of the target "
                                          r"module 'model.layers.0.self_attn.v_proj'"):
        check_model(llama, LoraSettings(r=33, target_modules=("q_proj", "v_proj")))
    check_model(llama, LoraSettings(r=64, target_modules=("q_proj",)))


def test_target_modules_the_model_does_not_have_are_refused_with_those_it_has(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"lora.target-modules='q_proj': no module with a "
                                          r"weight matrix in the model of model.path=.* is named "
                                          r"so \(its modules with one: classifier, dense, key"):
        check_model(ModelConfig(path=str(tiny_model_dir)), LoraSettings(target_modules=("q_proj",)))


def test_a_config_json_of_wrong_field_types_is_refused_naming_the_file_and_field(
        tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    folder = _copy_with_config(tiny_model_dir, tmp_path, {**config, "hidden_size": "abc"})
    with pytest.raises(ConfigError) as caught:
        check_model(ModelConfig(path=str(folder)), LoraSettings(r=4))
    assert caught.value.problems == [
        f"model.path='{folder}' ({folder / 'config.json'}): not a config transformers can build "
        "a model from (StrictDataclassFieldValidationError: Validation error for field "
        "'hidden_size': TypeError: Field 'hidden_size' expected int, got str (value: 'abc')); "
        "fix the file, or set model.path to another model folder"]


def test_an_empty_config_json_is_refused_naming_model_path_before_any_launch(
        tiny_run_config, tiny_model_dir, tmp_path, capsys):
    folder = _copy_with_config(tiny_model_dir, tmp_path, {})
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **{"model.path": str(folder)})]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == (
        f"  model.path='{folder}' ({folder / 'config.json'}): not a config transformers can build "
        f"a model from (ValueError: Unrecognized model in {folder}. Should have a `model_type` "
        "key in its config.json.); fix the file, or set model.path to another model folder")
    assert err[-1] == "refused before starting: nothing was run"
    assert not (tmp_path / "results").exists()


def test_a_rank_too_large_for_the_model_exits_2_before_any_launch(tiny_run_config, tmp_path,
                                                                  capsys):
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config), "--run-config", "lora.r=100000"]
    assert sim_run.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-2].startswith(
        "  lora.r=100000: above 32, the smaller side of the weight (32 × 32)")
    assert not (tmp_path / "results").exists()


def test_a_billion_rounds_exit_2_before_any_launch_with_the_sigma_they_need(tiny_run_config,
                                                                            tmp_path, capsys):
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config), "--run-config", "strategy.num-rounds=1000000000"]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err
    assert "strategy.num-rounds=1000000000 × train.local-steps=" in err
    assert "above privacy.max-noise-multiplier=50.0" in err
    assert not (tmp_path / "results").exists()
