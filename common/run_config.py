"""Run-config overrides as the launchers take them: "k=v ..." text or .toml files, merged.

``flwr run --run-config`` takes a .toml file only as its sole value and merges several values
by top-level table; :func:`run_config_args` merges the flat keys here and hands Flower one
string. :func:`app_run_config` is the flat config the apps will receive (pyproject's, then the
overrides), for checking a run before it starts.
"""

from __future__ import annotations

import math
import re
import tomllib
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import click
from flwr.common.config import flatten_dict, parse_config_args

from common.config import ConfigError, did_you_mean

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a dotted TOML key flwr reads


def run_config_args(overrides: Sequence[str]) -> list[str]:
    """One ``--run-config`` value for ``flwr run``: every override merged, later ones winning.

    Each item is "k=v ..." text or a .toml file. ``flwr run`` takes a .toml file only as its sole
    ``--run-config``, and when given several it merges them by top-level table, so
    ``output.dir=…`` then ``output.run-name=…`` would lose ``output.dir``. Merging the flat keys
    here and passing one string avoids both.
    """
    merged: dict = {}
    for item in overrides:
        if item.endswith(".toml"):
            with Path(item).expanduser().open("rb") as f:
                merged.update(flatten(tomllib.load(f)))
        elif item:
            merged.update(parse_override_text(item))
    return [override_text(merged)] if merged else []


def parse_override_text(text: str) -> dict:
    """The keys of one "k=v ..." override, as ``flwr run`` reads them.

    Raises :class:`ConfigError` naming each unreadable ``k=v`` pair (for example a string
    without double quotes), where Flower would raise a ``ClickException`` about the whole text.
    """
    try:
        return parse_config_args([text])
    except click.ClickException:
        bad = [pair for pair in text.split() if not _readable(pair)] or [text]
        raise ConfigError([_unreadable(pair) for pair in bad]) from None


def _unreadable(pair: str) -> str:
    """Why flwr cannot read ``pair``: a key TOML does not take bare, or an unquoted value."""
    key = pair.partition("=")[0]
    if not BARE_KEY.fullmatch(key):
        return (f"--run-config {pair!r}: {key!r} is not a run-config key (keys are ASCII "
                f"letters, digits, '-' and '_', joined by '.': lora.r){did_you_mean(key)}")
    return (f"--run-config {pair!r}: not a k=v pair flwr can read (a string value needs "
            'double quotes: key="text"; numbers and true/false go bare)')


def _readable(pair: str) -> bool:
    try:
        parse_config_args([pair])
    except click.ClickException:
        return False
    return True


def flatten(table: dict, prefix: str = "") -> dict:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def toml_value(key: str, value: object) -> str:
    """One TOML scalar as flwr's "k=v" parser reads it (no spaces unless double-quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
    if isinstance(value, str) and '"' not in value and "\\" not in value:
        # escaped, so that flwr reads the value back (AppConfig then refuses it, naming the key)
        return '"' + "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cc" else c
                             for c in value) + '"'
    raise ValueError(f"{key}={value!r}: only bools, numbers and strings without quotes or "
                     "backslashes can be passed as run-config overrides")


def override_text(keys: dict[str, object]) -> str:
    """One "k=v ..." override string of ``keys`` (values through :func:`toml_value`)."""
    return " ".join(f"{key}={toml_value(key, value)}" for key, value in keys.items())


def app_run_config(app_dir: Path, overrides: Sequence[str] | str = ()) -> dict:
    """The flat run config the apps of ``app_dir`` will get: pyproject's, then ``overrides``."""
    pyproject = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    items = [overrides] if isinstance(overrides, str) else overrides
    return {**flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]),
            **parse_config_args(run_config_args(items))}
