"""Every shell command quoted in README.md and docs/ still parses: a renamed flag breaks CI.

Commands of this project (``python -m <module>``, the ``fedsvd-*`` names of pyproject.toml, a
record's script ``python experiments/<record>/<name>.py``) are parsed by their own argparse
parser and stopped right after it (nothing runs); ``make`` targets
must exist in the Makefile; for Flower's executables (``flwr <command>``, ``flower-superlink``,
``flower-supernode``) and ``ray start`` every ``--option`` used must appear in their
``--help``. Shell variables become placeholders; lines of other programs (``export``, ``kill``,
loops) are skipped.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import experiment_script

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MODULE_MAINS = {"merging": "merging.cli:main"}  # python -m <package> runs its __main__
FLOWER = ("flwr", "flower-superlink", "flower-supernode")
# Programs the documents quote that are neither this project's nor Flower's: not checked. A
# program in no list fails the test, so a misspelt command name cannot pass unnoticed.
OTHER_PROGRAMS = {"export", "kill", "mkdir", "echo", "cat", "for", "done", "cd", "source",
                  "git", "pip", "pgrep", "ls"}
VARIABLE = re.compile(r"\$\{[^}]*\}|\$\([^)]*\)|\$[A-Za-z_][A-Za-z_0-9]*|\$!")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z_0-9]*=")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every command in a ```bash block, continuations joined."""
    found = []
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            heredoc = None
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if heredoc:
                    heredoc = None if line == heredoc else heredoc
                    continue
                if match := re.search(r"<<\s*'?(\w+)'?", line):
                    heredoc = match[1]
                if line and not line.startswith("#"):
                    found.append((path.relative_to(ROOT).as_posix(), line))
    return found


def _words(line: str) -> list[str]:
    """The words of ``line`` up to a comment, ``;``, ``&&``, ``|`` or ``&``; variables → 0."""
    line = VARIABLE.sub("0", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if word in (";", "&&", "&", "|", "||"):
            break
        words.append(word)
    while words and ENV_ASSIGNMENT.match(words[0]):  # FLWR_HOME=... flwr run
        words.pop(0)
    return [expanded for word in words for expanded in _braces(word)]


def _braces(word: str) -> list[str]:
    """Bash brace expansion of one word: ``a-{x,y}`` → ``a-x``, ``a-y``."""
    match = re.search(r"\{([^{},]*(?:,[^{},]*)+)\}", word)
    if not match:
        return [word]
    return [expanded for choice in match[1].split(",")
            for expanded in _braces(word[:match.start()] + choice + word[match.end():])]


class _Parsed(Exception):
    pass


def _main_of(target: str):
    """The function ``module:function`` names."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _parse_only(main, argv: list[str]) -> None:
    """Run ``main`` up to its argparse parse; raise AssertionError if it refuses."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        main(argv)
    except _Parsed:
        return
    except SystemExit as exc:
        raise AssertionError(f"argparse refused it (exit {exc.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("main() returned without parsing its arguments")


@functools.cache
def _flower_help(*command: str) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:],
                           "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} --help: {done.stderr[-500:]}"
    return done.stdout + done.stderr


def _check(words: list[str]) -> bool:
    """Check one command; False if it is not one this test knows how to check."""
    program, args = words[0], words[1:]
    if program in ("python", "python3", ".venv/bin/python") and args[:1] == ["-m"]:
        module = args[1]
        target = MODULE_MAINS.get(module) or (f"{module}:main" if module.split(".")[0] in (
            "simulations", "privacy", "merging", "deploy", "benchmarks") else None)
        if target is None:
            return False
        _parse_only(_main_of(target), args[2:])
        return True
    if program in ("python", "python3") and args[:1] and args[0].startswith("experiments/"):
        assert (ROOT / args[0]).is_file(), f"{args[0]}: no such script"
        _parse_only(experiment_script(args[0]).main, args[1:])
        return True
    if program.startswith("fedsvd-"):
        assert program in SCRIPTS, f"{program}: no such command in pyproject's [project.scripts]"
        _parse_only(_main_of(SCRIPTS[program]), args)
        return True
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert all(a in targets for a in args if not a.startswith("-") and "=" not in a), \
            f"make targets {args} not all in {targets}"
        return True
    if program in FLOWER:
        groups = ("supernode", "federation")  # flwr <group> <command>; else flwr <command>
        depth = 2 if args[:1] and args[0] in groups else min(len(args), 1)
        command = (program, *args[:depth]) if program == "flwr" else (program,)
        text = _flower_help(*command)
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        missing = sorted(f for f in flags if f not in text)
        assert not missing, f"{' '.join(command)} --help does not know {missing}"
        return True
    if program == "ray" and args[:1] == ["start"]:  # the Ray cluster recipe (docs/deployment.md)
        text = _flower_help("ray", "start")
        missing = sorted(a for a in args if a.startswith("--") and a not in text)
        assert not missing, f"ray start --help does not know {missing}"
        return True
    return False


COMMANDS = [(where, line) for where, line in documented_commands()
            if (_words(line) or ["export"])[0] not in OTHER_PROGRAMS]


def test_the_documents_quote_commands_of_each_kind():
    kinds = {_words(line)[0] for _, line in COMMANDS}
    assert {"make", "flwr"} <= kinds and any(k.startswith("fedsvd-") for k in kinds)
    assert sum(1 for _, line in COMMANDS if "python -m simulations.sweep" in line) >= 5


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{w}:{i}" for i, (w, _)
                                                              in enumerate(COMMANDS)])
def test_documented_command_parses(where, line):
    assert _check(_words(line)), (f"{where}: {line!r}: a program this test does not know; "
                                  "add it to OTHER_PROGRAMS if it is neither ours nor Flower's")
