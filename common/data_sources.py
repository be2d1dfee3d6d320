"""What a ``data.source`` / ``data.test-source`` value names, and which text columns are read.

The kinds of source, told apart by the text alone (and, for a folder, by the files in it):

- ``"20newsgroups"``: the packaged corpus (``data.source`` only);
- a ``.csv``, ``.jsonl`` or ``.json`` (lines) file: :func:`common.data_files.read_table`;
- a ``.parquet`` file, or a glob of them (``"/data/mnli/train-*.parquet"``);
- a folder written by ``datasets``' ``save_to_disk``: a ``Dataset`` or a ``DatasetDict``;
- ``"hf:<owner>/<name>"`` or ``"hf:<owner>/<name>:<subset>"``: a dataset of the Hugging Face
  hub, its subset (``datasets.load_dataset``'s ``name``) after the colon:
  ``"hf:nyu-mll/glue:sst2"``.

The ``hf:`` prefix keeps a hub name apart from a local folder: without it ``"data/glue"`` could
be either, and a mistyped folder would become a download of someone else's dataset. A colon
cannot occur in a hub id, so it cannot be read as part of one. Nothing here imports ``datasets``
or reaches the network: this module checks the configuration.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

NEWSGROUPS = "20newsgroups"
HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".csv", ".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"
# What save_to_disk writes: a DatasetDict's index of splits, or a Dataset's own two files
DATASET_DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("state.json", "dataset_info.json")
# huggingface_hub's repo ids ("owner/name" or a legacy "name"), then an optional ":subset"
HUB_NAME = re.compile(r"(?P<dataset>[\w.-]+(?:/[\w.-]+)?)(?::(?P<subset>[\w.-]+))?")
# A corpus's column of each example's second text, for data.text-column = "premise,hypothesis"
# (its first text is in the column "text"); common.tasks encodes the two as one sentence pair
TEXT_PAIR = "text_pair"
KINDS = {
    "table": "a .csv / .jsonl file",
    "parquet": "a .parquet file (or a glob of them)",
    "saved": "a folder written by datasets' save_to_disk",
    "hub": "'hf:<owner>/<name>[:<subset>]', a Hugging Face hub dataset ('hf:nyu-mll/glue:sst2')",
}


@dataclass(frozen=True)
class Source:
    """One ``data.source`` value: its ``kind`` (a key of :data:`KINDS` or ``"20newsgroups"``).

    ``text`` is the value as written; a hub source also has its ``dataset`` id and its
    ``subset`` (None: the dataset's default).
    """

    kind: str
    text: str
    dataset: str = ""
    subset: str | None = None

    @property
    def may_have_splits(self) -> bool:
        """Whether it can hold named splits (``data.test-split`` picks one): hub, saved folder."""
        return self.kind in ("hub", "saved")

    def parquet_files(self) -> list[str]:
        """The files a ``.parquet`` path or glob names, sorted; [] when none exists."""
        path = str(Path(self.text).expanduser())
        if any(c in path for c in "*?["):
            return sorted(glob.glob(path))
        return [path] if Path(path).is_file() else []


def parse_source(text: str) -> Source:
    """The :class:`Source` ``text`` names; ValueError saying why when it names none."""
    if text == NEWSGROUPS:
        return Source(NEWSGROUPS, text)
    if text.startswith(HUB_PREFIX):
        match = HUB_NAME.fullmatch(text.removeprefix(HUB_PREFIX))
        if not match or ".." in match["dataset"] or "--" in match["dataset"]:
            raise ValueError(f"expected {KINDS['hub']}")
        return Source("hub", text, match["dataset"], match["subset"])
    path = Path(text).expanduser()
    if path.suffix in TABLE_SUFFIXES:
        return Source("table", text)
    if path.suffix == PARQUET_SUFFIX:
        return Source("parquet", text)
    if path.is_dir():
        if (path / DATASET_DICT_FILE).is_file() or all((path / f).is_file()
                                                       for f in DATASET_FILES):
            return Source("saved", text)
        raise ValueError(f"a folder without {DATASET_DICT_FILE} nor {' and '.join(DATASET_FILES)}"
                         ": not one written by datasets' save_to_disk")
    expected = "expected " + ", ".join(KINDS.values())
    raise ValueError(expected if path.exists() else f"no such file or folder ({expected})")


def source_problems(key: str, text: str) -> list[str]:
    """One line if ``text`` names no source that ``key`` can use, else [].

    ``data.test-source`` cannot be 20 Newsgroups; a file or folder must exist (a hub name is
    looked up when it is loaded, before any launch).
    """
    try:
        source = parse_source(text)
    except ValueError as exc:
        return [f"{key}={text!r}: {exc}"]
    if source.kind == NEWSGROUPS and key != "data.source":
        return [f"{key}={text!r}: '20newsgroups' is a data.source; name a test file here"]
    if source.kind == "table" and not Path(text).expanduser().is_file():
        return [f"{key}={text!r}: no such file"]
    if source.kind == "parquet" and not source.parquet_files():
        return [f"{key}={text!r}: no such file"]
    return []


def text_columns(text_column: str) -> tuple[str, ...]:
    """``data.text-column`` as its columns: one, or two (a sentence pair) comma-separated.

    ``"premise,hypothesis"`` -> ``("premise", "hypothesis")``; a name without a comma is kept
    exactly as written (spaces included), as before pairs existed.
    """
    if "," not in text_column:
        return (text_column,)
    return tuple(name.strip() for name in text_column.split(","))


def text_column_problems(text_column: str) -> list[str]:
    """One line unless ``data.text-column`` names one column, or two distinct ones."""
    names = text_columns(text_column)
    if 1 <= len(names) <= 2 and all(names) and len(set(names)) == len(names):
        return []
    return [f"data.text-column={text_column!r}: one column, or two distinct ones separated by a "
            "comma (a sentence pair, as 'premise,hypothesis')"]
