"""Experiment conf files combine with key=value overrides, read exactly as flwr reads them."""

import math
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from common.config import ConfigError
from common.run_config import run_config_args

CONF = Path(__file__).resolve().parent.parent / "simulations" / "conf"


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


def test_an_unquoted_string_override_is_refused_naming_that_pair_only():
    with pytest.raises(ConfigError) as refused:
        run_config_args(["data.validation-fraction=0.1 lora.head-init=class-names seed=3"])
    assert refused.value.problems == [
        "--run-config 'lora.head-init=class-names': not a k=v pair flwr can read (a string "
        'value needs double quotes: key="text"; numbers and true/false go bare)']


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
