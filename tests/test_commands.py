"""The command names of pyproject.toml: each names a main() that answers --help."""

import importlib
import tomllib

import pytest

from tests.conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_line_tool_has_a_name():
    targets = set(SCRIPTS.values())
    for module in ("simulations.run", "simulations.sweep", "privacy.planning", "merging.cli",
                   "deploy.local"):
        assert f"{module}:main" in targets


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_command_answers_help(name, capsys):
    module, _, function = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
