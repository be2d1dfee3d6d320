"""The user docs cannot drift from the code, nor grow into a log.

Reference pages against the code they describe:

- ``docs/configuration.md`` lists every run-config key as ```key` = `default``` with the
  default exactly as ``[tool.flwr.app.config]`` of ``pyproject.toml`` writes it, and those keys
  are exactly the typed config's (``common.config.valid_keys``);
- ``docs/commands.md`` has a section ``## `<command>``` for every ``[project.scripts]`` entry,
  naming its ``python -m`` module, with a table row for every ``--flag`` of its argparse
  parser (a subcommand's flags may be named in a sentence), and names every ``make`` target;
- ``docs/results-schema.md`` names every file and column of ``common/schema.py``.

Form, for ``README.md`` and every page under ``docs/``:

- line budgets: the README at most 200 lines, a docs page at most 400;
- prose lines at most 120 characters. Exempt, because Markdown cannot wrap them: lines inside
  fenced code blocks (commands and literal output are quoted as they are) and table rows; a
  link's target does not count towards its line's length. ``docs/configuration.md`` has no
  exemption for table rows: its keys are read in a terminal too;
- no dates (``2026-12-05``): the docs say what is true now, the records under ``experiments/``
  say when it was measured;
- every relative link resolves to a file, and its ``#anchor`` to a heading of that page (GitHub's
  heading ids);
- every docs page is linked from the README's documentation index.
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from common import schema
from common.config import valid_keys
from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

README_MAX_LINES = 200
PAGE_MAX_LINES = 400
LINE_MAX_CHARS = 120
STRICT_PAGES = {"docs/configuration.md"}  # table rows count too
MODULE_OF_MAIN = {"merging.cli": "merging"}  # python -m merging runs merging/__main__.py
SUBCOMMANDS = {"fedsvd-merge": [["add"]]}  # argv that selects another parser of the same main
DATE = re.compile(r"\b(?:19|20)\d\d-[01]\d-[0-3]\d\b")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose_lines(text: str, *, tables: bool) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks (and tables unless asked)."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or (not tables and line.lstrip().startswith("|")):
            continue
        lines.append((number, line))
    return lines


def _visible_length(line: str) -> int:
    """Characters of ``line``, link targets left out (``[text](target)`` counts as ``[text]()``)."""
    return len(LINK.sub(lambda link: link[0][:link[0].index("](") + 2] + ")", line))


def _without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code spans blanked (links there are not links)."""
    kept = ["" if fenced else line for fenced, line in _fence_flags(text)]
    return re.sub(r"`[^`]*`", "``", "\n".join(kept))


def _fence_flags(text: str) -> list[tuple[bool, str]]:
    flags, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            flags.append((True, line))
        else:
            flags.append((fenced, line))
    return flags


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of the headings of a Markdown page (``## A b`` → ``a-b``; repeats → ``-1``)."""
    ids: set[str] = set()
    for fenced, line in _fence_flags(text):
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", match[1])  # a link reads as its text
        base = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        slug, n = base, 0
        while slug in ids:
            n += 1
            slug = f"{base}-{n}"
        ids.add(slug)
    ids.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return ids


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` that points at no file, or at no heading of its file."""
    problems = []
    for _, target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in heading_ids(path.read_text()):
            problems.append(f"{target}: {path.name} has no heading #{anchor}")
    return problems


def _pyproject_defaults() -> dict[str, str]:
    """Each run-config key → its default as written in pyproject.toml (``"fedsvd"``, ``1e-5``)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[tool.flwr.app.config]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r"^([\w.-]+)\s*=\s*(.+?)\s*$", table, re.M))


def _parsers(target: str, argv: list[str]) -> list[argparse.ArgumentParser]:
    """The parser(s) ``target``'s main parses ``argv`` with (stopped there: nothing runs)."""
    module, _, function = target.partition(":")
    main = getattr(importlib.import_module(module), function)
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
        pass

    def record(self, args=None, namespace=None):
        seen.append(self)
        raise Parsed

    argparse.ArgumentParser.parse_args = record
    try:
        main(argv)
    except Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    assert seen, f"{target}: main({argv}) parsed no arguments"
    return seen


def _section(text: str, heading: str) -> str:
    """The part of ``text`` from ``heading`` to the next heading of the same level."""
    start = text.index(heading)
    level = heading.split(" ", 1)[0]
    rest = text[start + len(heading):]
    end = re.search(rf"^{level} ", rest, re.M)
    return rest[:end.start()] if end else rest


# --- the reference against the code ------------------------------------------------------


def test_every_config_key_is_documented_with_its_default():
    page = (DOCS / "configuration.md").read_text()
    defaults = _pyproject_defaults()
    assert set(defaults) == set(valid_keys()), "pyproject's run config and AppConfig differ"
    missing = [f"- `{key}` = `{value}`" for key, value in defaults.items()
               if f"- `{key}` = `{value}`" not in page]
    assert not missing, "docs/configuration.md lacks (or has another default for):\n" + \
        "\n".join(missing)


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_and_flag_is_documented(command):
    page = (DOCS / "commands.md").read_text()
    heading = f"## `{command}`"
    assert heading in page, f"docs/commands.md has no section {heading!r}"
    section = _section(page, heading)
    module = SCRIPTS[command].partition(":")[0]
    python_m = f"python -m {MODULE_OF_MAIN.get(module, module)}"
    assert f"`{command}` | `{python_m}`" in page, f"the table does not name {python_m!r}"
    for argv in [[], *SUBCOMMANDS.get(command, [])]:
        # the command's own flags each head a row of its table; a subcommand's may be named in
        # a sentence ("takes --rank, --out ... as above")
        where = r"`" if argv else r"^\| `"
        for parser in _parsers(SCRIPTS[command], argv):
            flags = [option for action in parser._actions for option in action.option_strings
                     if option.startswith("--") and option != "--help"]
            missing = [flag for flag in flags
                       if not re.search(where + re.escape(flag) + r"[ `]", section, re.M)]
            assert not missing, f"{command} {' '.join(argv)}: {missing} not in its section"
        assert all(f"`{command} {word}" in section for word in argv)


def test_every_make_target_is_documented():
    page = (DOCS / "commands.md").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M)[1].split()
    missing = [target for target in phony if f"`make {target}`" not in page]
    assert phony and not missing, f"docs/commands.md does not name make {missing}"


def test_every_results_file_and_column_is_documented():
    page = (DOCS / "results-schema.md").read_text()
    files = [value for name, value in vars(schema).items()
             if (name.endswith("_FILE") or name in ("ADAPTER_DIR", "RUN_LOG"))
             and isinstance(value, str)]
    names = [*files, *schema.COLUMN_NAMES,
             *(column.name for column in getattr(schema, "TABLE_COLUMNS", ()))]
    missing = [name for name in names if f"`{name}" not in page]
    assert not missing, f"docs/results-schema.md does not name {missing} (common/schema.py)"


# --- the form of every page --------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_within_its_line_budget(page):
    budget = README_MAX_LINES if page == README else PAGE_MAX_LINES
    lines = len(page.read_text().splitlines())
    assert lines <= budget, f"{_name(page)}: {lines} lines, over its budget of {budget}: split it"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_prose_lines_wrapped(page):
    tables = _name(page) in STRICT_PAGES
    long = [f"line {n}: {_visible_length(line)} characters"
            for n, line in _prose_lines(page.read_text(), tables=tables)
            if _visible_length(line) > LINE_MAX_CHARS]
    assert not long, f"{_name(page)}: wrap at {LINE_MAX_CHARS}: " + "; ".join(long)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_dated_narrative(page):
    dated = [f"line {n}: {line.strip()[:80]}"
             for n, line in enumerate(page.read_text().splitlines(), start=1)
             if DATE.search(line)]
    assert not dated, (f"{_name(page)}: dates belong in the experiment records, not the user "
                       "docs:\n" + "\n".join(dated))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


def test_every_docs_page_is_in_the_readme_index():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for _, target in LINK.findall(_without_code(README.read_text()))}
    assert not [_name(p) for p in DOCS.rglob("*.md") if p.resolve() not in linked]


def test_heading_ids_follow_github():
    text = ("# Two commands\n## A causal LM's DP-SGD step\n"
            "### One machine: `python -m deploy.local`\n"
            "## [Link](x.md) title\n## Two commands\n```\n# not a heading\n```\n")
    assert heading_ids(text) == {"two-commands", "a-causal-lms-dp-sgd-step", "link-title",
                                 "one-machine-python--m-deploylocal", "two-commands-1"}
