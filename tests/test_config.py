import math

import pytest

from common.config import AppConfig, ConfigError
from tests.conftest import default_run_config


def test_pyproject_defaults_build_and_validate():
    cfg = AppConfig.from_run_config(default_run_config())
    assert cfg.strategy.name == "fedsvd"
    assert cfg.lora.target_modules == ("query", "value")
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 8.0)
    assert (cfg.privacy.epsilon, cfg.privacy.delta) == (6.0, 1e-5)
    assert cfg.data.partitioner == "dirichlet" and cfg.data.dirichlet_alpha == 0.5


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
