"""Each task and each set of allowed values is defined once, and every user reads that one.

The tasks: :mod:`common.task_kinds` alone compares a ``model.task`` value; the config, the data
loader and the task implementations (:mod:`common.tasks`) ask its :class:`TaskKind`. The sets:
config validation checks a value against the very object its owner uses.
"""

import ast
from pathlib import Path

import pytest

from common import config, data, devices, methods, precision, task_kinds
from common.config import AppConfig, ConfigError, DataConfig, ModelConfig
from common.task_kinds import CAUSAL_LM, CLASSIFICATION, TASK_KINDS, TASK_NAMES

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("kernels", "common", "privacy", "merging", "strategies", "client", "server",
              "deploy", "simulations", "benchmarks")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_round_trips_through_its_home_the_config_and_its_implementation(name):
    from common.tasks import TASKS

    kind = TASK_KINDS[name]
    assert kind.name == name
    assert ModelConfig(task=name).task_kind is kind
    assert not [line for line in ModelConfig(task=name).problems() if "model.task" in line]
    assert TASKS[name].kind is kind and TASKS[name].name == name
    assert set(TASKS) == set(TASK_NAMES)


def test_the_two_tasks_are_told_apart_by_the_kind_alone():
    assert CLASSIFICATION.is_classification and not CAUSAL_LM.is_classification
    assert ModelConfig().task_kind is CLASSIFICATION  # the default run classifies
    with pytest.raises(ConfigError, match=r"model.task='summary': one of \('classification', "
                       r"'causal-lm'\)"):
        AppConfig.from_run_config({"model.task": "summary"})


def _task_string_uses(path: Path) -> list[str]:
    """Each comparison with, or subscript by, a task name literal in ``path``'s code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            operands = [node.slice]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}" for operand in operands
                  if isinstance(operand, ast.Constant) and operand.value in TASK_NAMES]
    return found


def test_no_module_but_the_task_home_compares_a_task_name():
    homes = {Path(task_kinds.__file__).resolve()}
    found = [use for package in PRODUCTION for path in sorted((ROOT / package).rglob("*.py"))
             if path.resolve() not in homes for use in _task_string_uses(path)]
    assert found == []


def test_data_loading_follows_the_task_not_an_empty_label_column(tiny_run_config):
    cfg = AppConfig.from_run_config(tiny_run_config).data  # data.label-column = "topic"
    texts = data.load_corpus(cfg, 0, CAUSAL_LM)
    assert texts.label_names == () and "label" not in texts.train.column_names
    assert data.load_corpus(cfg, 0, CLASSIFICATION).label_names == ("space", "sport", "tech")
    with pytest.raises(ValueError, match="data.label-column='': model.task='classification'"):
        data.load_corpus(DataConfig(source=cfg.source, label_column=""), 0, CLASSIFICATION)


def test_config_validation_checks_against_the_owners_own_sets():
    from client import step_size
    from kernels import merge as kernel_merge
    from merging import cli as merging_cli
    from privacy import planning
    from strategies import aggregation, base, server_optimizer

    assert config.TASK_NAMES is task_kinds.TASK_NAMES
    assert config.METHOD_NAMES is methods.METHOD_NAMES
    assert precision.COMPUTE_DTYPES is config.COMPUTE_DTYPES
    assert devices.DEVICES is config.DEVICES
    assert data.LABEL_GROUPINGS is config.LABEL_GROUPINGS
    assert planning.ACCOUNTANTS is config.ACCOUNTANTS
    assert aggregation.AGGREGATIONS is config.AGGREGATIONS
    assert base.SHORT_ROUNDS is config.SHORT_ROUNDS
    assert server_optimizer.SERVER_OPTIMIZERS is config.SERVER_OPTIMIZERS
    assert step_size.LEARNING_RATE_SCALES is config.LEARNING_RATE_SCALES
    assert merging_cli.RANK_BY is kernel_merge.RANK_BY
    assert set(config.LABEL_PARTITIONERS) < set(config.PARTITIONERS)


def test_each_label_grouping_is_accepted_and_named_in_the_refusal():
    for how in ("", *config.LABEL_GROUPINGS):
        assert not [p for p in DataConfig(label_groups=how).problems() if "label-groups" in p]
    [problem] = [p for p in DataConfig(label_groups="suffix").problems() if "label-groups" in p]
    assert all(repr(how) in problem for how in config.LABEL_GROUPINGS)
