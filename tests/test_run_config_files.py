"""Experiment conf files combine with key=value overrides, read exactly as flwr reads them."""

import math
import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from common.config import AppConfig, ConfigError
from common.run_config import app_run_config, run_config_args

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "simulations" / "conf"


@pytest.mark.parametrize("conf", sorted(CONF.glob("*.toml")), ids=lambda p: p.stem)
def test_each_conf_file_expands_to_what_flwr_reads_from_the_file(conf):
    want = parse_config_args([str(conf)])  # flwr's own reading of the file alone
    got = parse_config_args(run_config_args([str(conf)]))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == value or (math.isnan(got[key]) and math.isnan(value))


def test_a_conf_file_and_overrides_combine_and_later_wins(tmp_path):
    conf = tmp_path / "exp.toml"
    conf.write_text('privacy.epsilon = inf\noutput.run-name = "a b"\nlora.train-head = false\n')
    args = run_config_args(['output.dir="/tmp/x"', str(conf), "privacy.epsilon=3"])
    assert len(args) == 1  # flwr would drop output.dir if output.run-name came separately
    merged = parse_config_args(args)
    assert merged == {"output.dir": "/tmp/x", "privacy.epsilon": 3, "output.run-name": "a b",
                      "lora.train-head": False}
    broken = tmp_path / "broken.toml"
    broken.write_text("x = ")
    with pytest.raises(tomllib.TOMLDecodeError):
        run_config_args([str(broken)])


def test_values_flwr_cannot_take_are_refused_with_the_key(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('data.source = "say \\"hi\\""\n')
    with pytest.raises(ValueError, match="data.source="):
        run_config_args([str(conf)])


@pytest.mark.parametrize(("text", "problem"), [
    ("data.validation-fraction=0.1 lora.head-init=class-names seed=3",
     "--run-config 'lora.head-init=class-names': not a k=v pair flwr can read (a string value "
     'needs double quotes: key="text"; numbers and true/false go bare)'),
    ("sëed=1 lora.r=4",  # a key TOML cannot read bare is named as a key, not as a value
     "--run-config 'sëed=1': 'sëed' is not a run-config key (keys are ASCII letters, digits, "
     "'-' and '_', joined by '.': lora.r); did you mean seed?"),
], ids=["unquoted-string", "non-ascii-key"])
def test_an_unreadable_pair_is_refused_naming_that_pair_only(text, problem):
    with pytest.raises(ConfigError) as refused:
        run_config_args([text])
    assert refused.value.problems == [problem]


def test_the_sweep_refuses_an_unreadable_override_with_exit_2_and_runs_nothing(capsys):
    from simulations import sweep

    def runner(*_args, **_kwargs):
        raise AssertionError("nothing may run")

    code = sweep.main(["--methods", "fedsvd", "--epsilons", "3", "--seeds", "0", "--lr-file",
                       "none", "--run-config", "lora.head-init=class-names", "--dry-run"],
                      runner=runner)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "'lora.head-init=class-names'" in err[-2] and "nothing was run" in err[-1]


def test_a_control_character_in_a_string_reads_back_and_is_refused_naming_the_key():
    args = run_config_args([r'data.labels="a\x01b" seed=1'])
    assert parse_config_args(args) == {"data.labels": "a\x01b", "seed": 1}  # written back escaped
    with pytest.raises(ConfigError) as refused:
        AppConfig.from_run_config(parse_config_args(args))
    assert refused.value.problems == [
        "data.labels='a\\x01b': holds the control character(s) U+0001; a run-config string is "
        "plain text"]


def _chosen_by_the_record_named_in(text: str, where: str) -> dict:
    """The settings of the record ``text`` names: its defaults.toml, else learning_rates.toml."""
    record = re.search(r"experiments/([\w-]+)", text)
    assert record, f"{where} names no record for its rate"
    folder = ROOT / "experiments" / record[1]
    chosen = folder / "defaults.toml"
    chosen = chosen if chosen.is_file() else folder / "learning_rates.toml"
    return tomllib.loads(chosen.read_text())


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "fedavg", "flora", "fedex", "rolora"])
def test_each_method_runs_as_shipped_with_the_settings_its_record_chose(method):
    """A method run as shipped uses its tuned rate (and server optimizer, where its record chose
    one), not lr 1.0 (FedAvg-LoRA collapses there). FedSVD's are the run defaults in pyproject."""
    if method == "fedsvd":
        where, conf_args = ROOT / "pyproject.toml", []
    else:
        where, conf_args = CONF / f"{method}.toml", [str(CONF / f"{method}.toml")]
    chosen = _chosen_by_the_record_named_in(where.read_text(), where.name)[method]
    run = app_run_config(ROOT, conf_args)  # pyproject's defaults, the conf over them
    assert run["train.learning-rate"] == chosen["learning-rate"]
    # a record that names no server optimizer chose its rate with plain averaging
    assert run["strategy.server-optimizer"] == chosen.get("server-optimizer", "none")
    if "server-learning-rate" in chosen:
        assert run["strategy.server-learning-rate"] == chosen["server-learning-rate"]
