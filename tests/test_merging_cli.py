"""python -m merging: merge, add, baselines, errors that name the bad source or output."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_merging import MODULES, product, random_pairs, rel_err, write_adapter

from merging import load_sources
from merging.cli import main


@pytest.fixture()
def adapters(tmp_path):
    rng = np.random.default_rng(10)
    return [write_adapter(tmp_path / f"src{i}", random_pairs(rng, r), r=r, alpha=2 * r)
            for i, r in enumerate((3, 4, 2))]


def loaded(folder):
    (source,) = load_sources([folder])
    return source


def test_merge_then_add_equals_merging_all_at_once(adapters, tmp_path, capsys):
    a, b, c = (str(p) for p in adapters)
    assert main(["--rank", "7", "--out", str(tmp_path / "inc"), a, b]) == 0
    assert main(["add", "--into", str(tmp_path / "inc"), "--rank", "9", "--weight", "0.5",
                 "--force", c]) == 0
    assert main(["--rank", "9", "--weights", "1,1,0.5", "--out", str(tmp_path / "all"),
                 a, b, c]) == 0
    assert "rank-9 LoRA on 4 modules from 3 sources" in capsys.readouterr().out
    inc, scratch = loaded(tmp_path / "inc"), loaded(tmp_path / "all")
    for module in MODULES:
        assert rel_err(product(inc.lora[module]), product(scratch.lora[module])) <= 1e-5
    history = json.loads((tmp_path / "inc" / "merge.json").read_text())
    assert [s["weight"] for s in history["sources"]] == [1.0, 1.0, 0.5]
    assert [s["op"] for s in history["steps"]] == ["merge", "add"]
    config = json.loads((tmp_path / "inc" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (9, 9, None)


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_baselines_from_the_command_line(adapters, tmp_path, method):
    out = tmp_path / method
    assert main(["--method", method, "--rank", "3", "--out", str(out),
                 *map(str, adapters)]) == 0
    assert all(B.shape == (32, 3) for B, _ in loaded(out).lora.values())


def expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert str(fragment) in err, err
    return err


def test_missing_files_are_named(adapters, tmp_path, capsys):
    (adapters[1] / "adapter_model.safetensors").unlink()
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(adapters[1])], adapters[1], "missing adapter_model.safetensors")
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(tmp_path / "nope")], tmp_path / "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(tmp_path / "empty")], tmp_path / "empty", "neither")


def test_mismatched_sources_are_named(adapters, tmp_path, capsys):
    rng = np.random.default_rng(11)
    wide = write_adapter(tmp_path / "wide", random_pairs(rng, 2, m=48), r=2, alpha=2)
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(wide)], wide, "(48, 32)")
    fewer = write_adapter(tmp_path / "fewer", random_pairs(rng, 2, modules=MODULES[:3]), r=2,
                          alpha=2)
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(fewer)], fewer, MODULES[3])
    other = write_adapter(tmp_path / "other", random_pairs(rng, 2), r=2, alpha=2, base="gpt2")
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), str(adapters[0]),
                          str(other)], other, "'gpt2'", "--allow-base-mismatch")
    assert main(["--rank", "2", "--allow-base-mismatch", "--out", str(tmp_path / "o"),
                 str(adapters[0]), str(other)]) == 0
    expect_error(capsys, ["add", "--into", str(tmp_path / "o"), "--force", str(wide)], wide)


def test_bad_arguments_and_sources(adapters, tmp_path, capsys, tiny_model_dir):
    a, b = str(adapters[0]), str(adapters[1])
    expect_error(capsys, ["--rank", "2", "--weights", "1,2,3", "--out", str(tmp_path / "o"),
                          a, b], "3 weights for 2 sources")
    expect_error(capsys, ["--rank", "40", "--out", str(tmp_path / "o"), a, b], "k=40")
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), a, str(tiny_model_dir)],
                 tiny_model_dir, "--base")
    wide = write_adapter(tmp_path / "wide", random_pairs(np.random.default_rng(12), 2, n=48),
                         r=2, alpha=2)
    expect_error(capsys, ["--rank", "2", "--base", str(tiny_model_dir), "--out",
                          str(tmp_path / "o"), str(wide)], wide, "the base model")
    bad = write_adapter(tmp_path / "nan", {m: (torch.full((32, 2), float("nan")),
                                               torch.ones(2, 32)) for m in MODULES}, r=2,
                        alpha=2)
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), a, str(bad)], bad, "NaN")
    save_file({"x": torch.ones(1)}, adapters[1] / "adapter_model.safetensors")
    expect_error(capsys, ["--rank", "2", "--out", str(tmp_path / "o"), a, b], b, "no LoRA")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_out_equal_to_a_source_is_refused_even_with_force(adapters, tmp_path, capsys):
    a, b = adapters[0], adapters[1]
    save_file({"x": torch.ones(2)}, b / "base_delta.safetensors")
    before = snapshot(b)
    for force in ([], ["--force"]):
        err = expect_error(capsys, ["--rank", "2", *force, "--out", str(b), str(a), str(b)],
                           f"--out {b}", "SRC 2", "--force")
        assert "refused even with --force" in err
        # the same folder under another spelling is the same source
        expect_error(capsys, ["--rank", "2", *force, "--out", str(b / ".." / b.name), str(a),
                              str(b)], "SRC 2", "refused even with --force")
    assert snapshot(b) == before  # bytes equal, base_delta.safetensors still there
    assert (b / "base_delta.safetensors").is_file()


def test_an_existing_adapter_needs_force(adapters, tmp_path, capsys):
    a, b, c = (str(p) for p in adapters)
    out = tmp_path / "out"
    assert main(["--rank", "2", "--out", str(out), a, b]) == 0
    before = snapshot(out)
    err = expect_error(capsys, ["--rank", "3", "--out", str(out), a, c], f"--out {out}",
                       "already holds an adapter", "--force")
    assert "adapter_config.json" in err and "merge.json" in err
    assert snapshot(out) == before
    for name in ("adapter_config.json", "merge.json"):  # any one adapter file is enough
        lone = tmp_path / f"lone-{name}"
        lone.mkdir()
        (lone / name).write_text("{}")
        expect_error(capsys, ["--rank", "2", "--out", str(lone), a, b], name, "--force")
    assert main(["--rank", "3", "--force", "--out", str(out), a, c]) == 0
    assert all(B.shape == (32, 3) for B, _ in loaded(out).lora.values())
    history = json.loads((out / "merge.json").read_text())
    assert len(history["sources"]) == 2
    (tmp_path / "empty").mkdir()  # an existing folder without an adapter is fine
    assert main(["--rank", "2", "--out", str(tmp_path / "empty"), a, b]) == 0


def test_add_in_place_needs_force_and_never_writes_the_source(adapters, tmp_path, capsys):
    a, b, c = (str(p) for p in adapters)
    merged = tmp_path / "merged"
    assert main(["--rank", "4", "--out", str(merged), a, b]) == 0
    before = snapshot(merged)
    expect_error(capsys, ["add", "--into", str(merged), c], f"--into {merged}", "in place",
                 "--force", "--out")
    expect_error(capsys, ["add", "--into", str(merged), "--out", str(merged), c],
                 f"--into {merged}", "--force")
    assert snapshot(merged) == before
    source_before = snapshot(c)
    for force in ([], ["--force"]):
        expect_error(capsys, ["add", "--into", str(merged), *force, "--out", c, c],
                     f"--out {c}", "SRC", "refused even with --force")
    assert snapshot(c) == source_before
    assert snapshot(merged) == before
    assert main(["add", "--into", str(merged), "--out", str(tmp_path / "new"), c]) == 0
    assert snapshot(merged) == before  # --out elsewhere leaves --into as it was
    expect_error(capsys, ["add", "--into", str(merged), "--out", str(tmp_path / "new"), c],
                 "already holds an adapter")
    assert main(["add", "--into", str(merged), "--force", c]) == 0
    assert [s["op"] for s in json.loads((merged / "merge.json").read_text())["steps"]] == [
        "merge", "add"]
