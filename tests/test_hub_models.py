"""model.path takes a Hugging Face hub id: resolved from a cache laid out as the hub lays it.

Nothing here reaches the network: huggingface_hub is put offline (``HF_HUB_OFFLINE``) with its
cache in a temporary folder, and where the online path is tested the hub's API is replaced by
one that cannot be reached.
"""

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from common.config import AppConfig, ConfigError, LoraSettings, ModelConfig, is_hub_id
from common.model import build_model, load_tokenizer
from common.model_checks import check_model
from common.model_path import resolve_model_path
from simulations import run as sim_run
from tests.conftest import default_run_config, lay_out_hub_snapshot
from tests.test_launcher import _tiny_overrides

MAIN_COMMIT = "a" * 40
TAGGED_COMMIT = "b" * 40


def _trainable_weights(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    model = build_model(model_cfg, LoraSettings(r=4), num_labels=3, seed=0)
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_a_hub_id_in_the_cache_resolves_to_its_snapshot_and_loads_offline(hub, tiny_model_dir):
    snapshot = lay_out_hub_snapshot(hub, "owner/tiny-bert", MAIN_COMMIT, tiny_model_dir)
    hub_cfg, local_cfg = ModelConfig(path="owner/tiny-bert"), ModelConfig(path=str(tiny_model_dir))
    assert hub_cfg.problems() == []
    assert resolve_model_path(hub_cfg) == snapshot
    assert check_model(hub_cfg, LoraSettings(r=4)) == snapshot
    text = "orbit rocket nasa launch"
    assert load_tokenizer(hub_cfg)(text) == load_tokenizer(local_cfg)(text)
    from_hub, from_folder = _trainable_weights(hub_cfg), _trainable_weights(local_cfg)
    assert from_hub.keys() == from_folder.keys()
    assert all(torch.equal(from_hub[name], from_folder[name]) for name in from_folder)


def test_model_revision_picks_the_snapshot_of_a_tag_or_of_a_commit(hub, tiny_model_dir):
    main = lay_out_hub_snapshot(hub, "owner/tiny-bert", MAIN_COMMIT, tiny_model_dir)
    tagged = lay_out_hub_snapshot(hub, "owner/tiny-bert", TAGGED_COMMIT, tiny_model_dir,
                                  refs=("v1",))
    for revision, expected in [("", main), ("main", main), ("v1", tagged),
                               (TAGGED_COMMIT, tagged), (MAIN_COMMIT, main)]:
        cfg = AppConfig.from_run_config({**default_run_config(), "model.path": "owner/tiny-bert",
                                         "model.revision": revision}).model
        assert resolve_model_path(cfg) == expected, revision
    with pytest.raises(ConfigError) as caught:
        resolve_model_path(ModelConfig(path="owner/tiny-bert", revision="v2"))
    assert caught.value.problems[0].startswith(
        "model.path='owner/tiny-bert' (model.revision='v2'): not a local folder, and not in the "
        f"Hugging Face cache {hub}; HF_HUB_OFFLINE=1 forbids fetching it")


def test_a_hub_id_not_in_the_cache_offline_exits_2_before_any_launch_naming_it_and_the_cache(
        hub, tiny_run_config, tmp_path, capsys):
    overrides = {"model.path": "owner/absent", "model.revision": "v2"}
    argv = ["--results-dir", str(tmp_path / "results"), "--num-supernodes", "3", "--run-config",
            *_tiny_overrides(tiny_run_config, **overrides)]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == (
        f"  model.path='owner/absent' (model.revision='v2'): not a local folder, and not in the "
        f"Hugging Face cache {hub}; HF_HUB_OFFLINE=1 forbids fetching it; fetch it once on a "
        "host that reaches the hub (`hf download owner/absent --revision v2`, into that "
        "cache), or set model.path to a local model folder")
    assert err[-1] == "refused before starting: nothing was run"
    assert not (tmp_path / "results").exists()


def test_model_revision_without_a_hub_id_is_refused_saying_why(tiny_model_dir):
    with pytest.raises(ConfigError) as caught:
        AppConfig.from_run_config({**default_run_config(), "model.path": str(tiny_model_dir),
                                   "model.revision": "main"})
    assert (f"model.revision='main': applies to a hub id only, and "
            f"model.path='{tiny_model_dir}' is a local path: set model.revision='' or model.path "
            "to a hub id 'owner/name'") in caught.value.problems
    assert ModelConfig(revision="main").problems() == [
        "model.revision='main': applies to a hub id only, and model.path='' is empty "
        "(a shipped model): set model.revision='' or model.path to a hub id 'owner/name'"]


def test_a_local_folder_works_as_before_even_where_its_name_reads_as_a_hub_id(
        hub, tiny_model_dir, tmp_path, monkeypatch):
    lay_out_hub_snapshot(hub, "owner/tiny-bert", MAIN_COMMIT, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "owner" / "tiny-bert")
    assert resolve_model_path(ModelConfig(path="owner/tiny-bert")) == Path("owner/tiny-bert")
    assert resolve_model_path(ModelConfig(path=str(tiny_model_dir))) == tiny_model_dir
    assert check_model(ModelConfig(path=str(tiny_model_dir)), LoraSettings(r=4)) == tiny_model_dir
    assert ModelConfig(path="/no/such/model").problems() == [
        "model.path='/no/such/model': empty, a local model folder with a config.json, a Hugging "
        "Face hub id 'owner/name', or (model.task='causal-lm') a .gguf file: not found"]
    assert [is_hub_id(p) for p in ("owner/name", "bert-base-uncased", "a/b/c", "owner/m.gguf",
                                   "~/models", "owner/bad--name")] == [
        True, False, False, False, False, False]


def test_online_with_the_hub_unreachable_the_cache_answers_else_the_reason_is_named(
        hub, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.hf_api import HfApi

    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("no route to the hub")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    monkeypatch.setattr(HfApi, "list_repo_tree", unreachable)
    snapshot = lay_out_hub_snapshot(hub, "owner/tiny-bert", MAIN_COMMIT, tiny_model_dir)
    assert resolve_model_path(ModelConfig(path="owner/tiny-bert")) == snapshot
    # a commit hash: snapshot_download asks the hub for its file list, and the cache answers
    pinned = ModelConfig(path="owner/tiny-bert", revision=MAIN_COMMIT)
    assert resolve_model_path(pinned) == snapshot
    with pytest.raises(ConfigError) as caught:
        resolve_model_path(ModelConfig(path="owner/tiny-bert", revision=TAGGED_COMMIT))
    assert "the hub could not be reached (ConnectError: no route to the hub)" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        resolve_model_path(ModelConfig(path="owner/absent"))
    assert caught.value.problems == [
        f"model.path='owner/absent': not a local folder, and not in the Hugging Face cache {hub}; "
        "the hub could not be reached (ConnectError: no route to the hub); fetch it once on a "
        "host that reaches the hub (`hf download owner/absent`, into that cache), or set "
        "model.path to a local model folder"]


def test_the_commit_a_hub_id_resolved_to_is_recorded_beside_the_run(hub, tiny_model_dir):
    """A branch moves; environment.json keeps the commit the run loaded."""
    from common.environment import run_environment
    from common.model_path import hub_commit

    lay_out_hub_snapshot(hub, "owner/tiny-bert", MAIN_COMMIT, tiny_model_dir)
    cfg = ModelConfig(path="owner/tiny-bert")
    assert hub_commit(cfg) == MAIN_COMMIT
    assert run_environment(torch.float32, "cpu", hub_commit(cfg))["model-commit"] == MAIN_COMMIT
    assert hub_commit(ModelConfig(path=str(tiny_model_dir))) == ""  # a local folder: no commit
    assert "model-commit" not in run_environment(torch.float32, "cpu")
