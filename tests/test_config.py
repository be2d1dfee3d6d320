import math

import pytest

from common.config import AppConfig, ConfigError
from privacy.policy import check_delta
from tests.conftest import default_run_config


def test_pyproject_defaults_build_and_validate():
    cfg = AppConfig.from_run_config(default_run_config())
    assert cfg.strategy.name == "fedsvd"
    assert cfg.lora.target_modules == ("query", "value")
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 8.0)
    assert (cfg.privacy.epsilon, cfg.privacy.delta) == (6.0, 1e-5)
    assert cfg.data.partitioner == "dirichlet" and cfg.data.dirichlet_alpha == 0.5
    assert (cfg.strategy.round_timeout, cfg.strategy.short_round) == (1200.0, "skip")


def test_dataclass_defaults_equal_the_pyproject_defaults():
    assert AppConfig().to_dict() == AppConfig.from_run_config(default_run_config()).to_dict()
    assert set(AppConfig().to_dict()) == set(default_run_config())


def test_infinite_epsilon_means_non_private():
    cfg = AppConfig.from_run_config({**default_run_config(), "privacy.epsilon": math.inf})
    assert not cfg.privacy.is_private


def test_all_problems_are_reported_together_with_key_and_value():
    bad = {**default_run_config(), "lora.r": 0, "privacy.epsilon": -1.0,
           "strategy.fraction-train": 1.5, "strategy.name": "nope", "lora.rank": 3}
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config(bad)
    message = str(err.value)
    for fragment in ("lora.r=0", "privacy.epsilon=-1.0", "strategy.fraction-train=1.5",
                     "strategy.name='nope'", "lora.rank=3: unknown key"):
        assert fragment in message


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="lora.train-head='yes': expected bool"):
        AppConfig.from_run_config({"lora.train-head": "yes"})


@pytest.mark.parametrize("key, value, fragment", [
    ("data.source", "/no/such/notes.csv", "data.source='/no/such/notes.csv': no such file"),
    ("data.test-source", "/no/such/test.jsonl",
     "data.test-source='/no/such/test.jsonl': no such file"),
    ("model.path", "/no/such/model", "model.path='/no/such/model': empty, a local model"),
    ("strategy.fraction-train", 0.0, "strategy.fraction-train=0.0: must be in (0, 1]"),
    ("privacy.delta", 1.0, "privacy.delta=1.0: must be in (0, 1)"),
    ("privacy.epsilon", 0.0, "privacy.epsilon=0.0: must be > 0"),
    ("strategy.round-timeout", 0.0, "strategy.round-timeout=0.0: must be > 0 and finite"),
    ("strategy.round-timeout", "inf", "strategy.round-timeout=inf: must be > 0 and finite"),
    ("strategy.round-timeout", -5, "strategy.round-timeout=-5.0: must be > 0 and finite"),
    ("strategy.short-round", "later", "strategy.short-round='later': one of ('skip', 'fail')"),
    ("strategy.min-valid-replies", 1, "strategy.min-valid-replies=1: unknown key"),
])
def test_each_invalid_key_is_named_with_its_value_and_what_is_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config({**default_run_config(), key: value})
    assert fragment in str(err.value)


def test_existing_local_files_pass(tmp_path):
    data = tmp_path / "notes.csv"
    data.write_text("text,label\nhello,a\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = AppConfig.from_run_config({**default_run_config(), "data.source": str(data),
                                     "model.path": str(model)})
    assert cfg.data.source == str(data)


def test_delta_must_be_below_one_over_n():
    check_delta(1e-5, 1000, "partition 0")
    with pytest.raises(ConfigError, match=r"privacy.delta=0.01: must be < 1/n = 0.005 "
                                          r"\(n = 200 training examples of partition 3\)"):
        check_delta(0.01, 200, "partition 3")


def test_unknown_keys_are_named_with_the_closest_valid_key():
    with pytest.raises(ConfigError) as caught:
        AppConfig.from_run_config({"lora.rr": 4, "privcy.epsilon": 3.0, "sed": 1,
                                   "strategy.aggregator": "median"})
    problems = caught.value.problems
    assert problems[:2] == ["privcy.epsilon=3.0: unknown section 'privcy'; did you mean "
                            "privacy.epsilon?", "sed=1: unknown key; did you mean seed?"]
    assert problems[2].startswith("strategy.aggregator='median': unknown key; did you mean "
                                  "strategy.aggregation?")
    assert problems[3].startswith("lora.rr=4: unknown key; did you mean lora.r?")


def test_default_run_names_differ_between_experiments_and_not_with_output_settings():
    default = AppConfig()
    assert default.run_name == "fedsvd-eps6-seed0"
    lr = AppConfig.from_run_config({"train.learning-rate": 0.5})
    data = AppConfig.from_run_config({"data.dirichlet-alpha": 0.1})
    assert lr.run_name.startswith("fedsvd-eps6-seed0-") and len(lr.run_name) == 26
    assert len({default.run_name, lr.run_name, data.run_name}) == 3
    again = AppConfig.from_run_config({"train.learning-rate": 0.5, "output.dir": "/elsewhere",
                                       "output.resume": True})
    assert again.run_name == lr.run_name  # where it is written is not what it is
    assert AppConfig.from_run_config({"privacy.epsilon": 3.0}).run_name == "fedsvd-eps3-seed0"
    named = AppConfig.from_run_config({"output.run-name": "mine", "train.learning-rate": 0.5})
    assert named.run_name == "mine"


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="output.overwrite=True: cannot be combined"):
        AppConfig.from_run_config({"output.resume": True, "output.overwrite": True})


def test_a_negative_seed_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        AppConfig.from_run_config({"seed": -1})
    assert caught.value.problems == [
        "seed=-1: must be an integer >= 0 (numpy and the partitioners take no negative seed)"]
    with pytest.raises(ConfigError, match=r"seed='3': expected int"):
        AppConfig.from_run_config({"seed": "3"})


def test_control_characters_in_any_string_value_are_refused_naming_each_key():
    with pytest.raises(ConfigError) as caught:
        AppConfig.from_run_config({"output.run-name": "a\nb", "data.labels": "x\ty,\x7f",
                                   "data.source": "20newsgroups"})
    assert caught.value.problems == [
        "data.labels='x\\ty,\\x7f': holds the control character(s) U+0009, U+007F; a "
        "run-config string is plain text",
        "output.run-name='a\\nb': holds the control character(s) U+000A; a run-config string "
        "is plain text"]
