"""Read a user's CSV or JSON Lines file of (text, label) rows, refusing what cannot be trained on.

For causal language modelling (``model.task = "causal-lm"``) the rows are texts without a label,
optionally with a prompt (``data.prompt-column``): the label column is then not read.

Every problem is reported before any training, naming the file, the run-config key and the line
numbers (1-based, as an editor shows them; a CSV's header is line 1). Checked, in order:

- the file exists, is not empty and is UTF-8 text (the line of the first undecodable byte);
- CSV: it parses (``csv`` module errors name their line), no row has more fields than the
  header; JSON Lines: every non-blank line is one JSON object;
- the text and label columns exist (the columns found are listed), the second text column of
  a sentence pair (``data.text-column = "premise,hypothesis"``), and the prompt and
  partition columns when they are asked for (``data.prompt-column``, ``data.partitioner =
  "column"``);
- no row has an empty or missing text, label or partition value (their count and first lines),
  unless ``data.drop-missing`` asks to drop them, which is then logged with the count.

Labels are kept as written: a CSV's ``0`` / ``1`` stay ``"0"`` / ``"1"`` (never ``"0.0"``), and
an integral JSON number ``1`` or ``1.0`` becomes ``"1"``.

The column and row checks are :func:`table_from_records`, which :mod:`common.hf_datasets` runs
on the rows of a Hugging Face dataset too (their rows named by index instead of line).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any, NamedTuple

from flwr.common.logger import log

from common.data_sources import text_columns

SHOWN_LINES = 5  # line numbers quoted per problem
# How the rows of a file (its lines) or of a dataset (their indexes) are named in a message
PLURALS = {"line": ("line(s)", "lines"), "index": ("index(es)", "indexes")}


class DataError(ValueError):
    """The data cannot be trained on; one line per problem, each naming its file and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("unusable data:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Table:
    """The usable rows of a source: ``texts[i]`` labelled ``labels[i]``, from line ``lines[i]``.

    ``source`` is the ``data.source`` (or ``data.test-source``) value that named it; a
    dataset's ``lines`` are row indexes. ``labels`` is None when no label column was read
    (causal LM), ``prompts`` None when no prompt column was, ``pairs`` None unless
    ``data.text-column`` names a sentence pair (``pairs[i]`` is the second text of row i);
    ``partitions[i]`` is the row's value of the partition column, as text, None when no
    partition column was asked for.
    """

    source: str
    texts: list[str]
    labels: list[str] | None
    lines: list[int]
    partitions: list[str] | None = None
    prompts: list[str] | None = None
    pairs: list[str] | None = None


class Column(NamedTuple):
    """A column to read: its ``name``, the ``setting`` that asked for it, what its cells are.

    ``setting`` is the run-config key and value (``data.label-column='label'``); ``noun`` names
    a cell in messages (``label``, ``partition value``); ``shown`` is ``name`` quoted where the
    setting names more than one column (a sentence pair), else "".
    """

    name: str
    setting: str
    noun: str
    shown: str = ""


def asked_columns(*, text_column: str, label_column: str, partition_column: str = "",
                  prompt_column: str = "") -> dict[str, Column]:
    """The columns to read by role (text, pair, label, partition, prompt); "" asks for none."""
    texts = text_columns(text_column)
    pair = len(texts) > 1
    text_setting = f"data.text-column={text_column!r}"
    columns = {"text": Column(texts[0], text_setting, "text", f" {texts[0]!r}" if pair else ""),
               "pair": Column(texts[-1], text_setting, "second text", f" {texts[-1]!r}")
               if pair else None}
    for role, name in (("label", label_column), ("partition", partition_column),
                       ("prompt", prompt_column)):
        noun = "partition value" if role == "partition" else role
        columns[role] = Column(name, f"data.{role}-column={name!r}", noun) if name else None
    return {role: column for role, column in columns.items() if column}


def read_table(path: str, *, key: str, text_column: str, label_column: str,
               drop_missing: bool = False, partition_column: str = "",
               prompt_column: str = "") -> Table:
    """Read ``path`` (``.csv``, ``.jsonl`` or ``.json`` lines) into a :class:`Table`.

    ``key`` is the run-config key that named the file (``data.source``, ``data.test-source``);
    every error starts with it. An empty ``label_column`` reads no label (causal LM). With
    ``partition_column`` (``data.partition-column``) or ``prompt_column``
    (``data.prompt-column``) that column is read too, into ``Table.partitions`` or
    ``Table.prompts``, and checked like the label column. Raise :class:`DataError` listing
    every problem found.
    """
    file = Path(path).expanduser()
    where = f"{key}={path!r}"
    if not file.is_file():
        raise DataError([f"{where}: file not found"])
    text = _decode(file, where)
    if not text.strip():
        raise DataError([f"{where}: the file is empty"])
    records = _csv_records(text, where) if file.suffix == ".csv" else _jsonl_records(text, where)
    rows = list(records)
    if not rows:
        raise DataError([f"{where}: the file has a header but no rows"])
    columns = asked_columns(text_column=text_column, label_column=label_column,
                            partition_column=partition_column, prompt_column=prompt_column)
    found = list(dict.fromkeys(k for _, row in rows for k in row))
    return table_from_records(rows, found, source=path, where=where, columns=columns,
                              drop_missing=drop_missing)


def table_from_records(rows: list[Record], found: list[str], *, source: str, where: str,
                       columns: dict[str, Column], drop_missing: bool,
                       unit: str = "line") -> Table:
    """Check that ``columns`` are among ``found`` and fill them in every row of ``rows``.

    ``rows`` are (line or index, column -> value); ``where`` (``data.source='…'``) starts each
    message, ``unit`` (``line``, ``index``) names the rows' numbers in it. Raise
    :class:`DataError` for a missing column, or rows with an empty cell unless
    ``drop_missing`` drops them (logged).
    """
    check_columns(found, where, columns)
    return _complete_rows(source, rows, where, columns, drop_missing=drop_missing, unit=unit)


def _decode(file: Path, where: str) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the header
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError([f"{where}: not UTF-8 text: byte 0x{raw[exc.start]:02x} on line "
                         f"{line} cannot be decoded; save the file as UTF-8"]) from exc


Record = tuple[int, dict[str, Any]]  # (line number, column -> value)


def _csv_records(text: str, where: str) -> Iterator[Record]:
    # One field may be as long as the file: a long document is valid CSV, which the csv
    # module's default limit (128 KiB a field) would refuse. The limit is process-wide; raising
    # it only lets longer valid fields through.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA)
    try:
        header = reader.fieldnames or []
        if len(set(header)) < len(header):
            doubled = sorted({c for c in header if header.count(c) > 1})
            raise DataError([f"{where}: the header repeats column(s) {doubled}"])
        start = reader.line_num + 1
        for row in reader:
            if _EXTRA in row:
                raise DataError([f"{where}: line {start} has {len(header) + len(row[_EXTRA])} "
                                 f"fields, the header {len(header)} (an unquoted comma?)"])
            yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError([f"{where}: line {reader.line_num}: not valid CSV ({exc})"]) from exc


_EXTRA = "\0extra"  # DictReader's key for fields beyond the header


def _jsonl_records(text: str, where: str) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError([f"{where}: line {number} is not valid JSON ({exc.msg}, column "
                             f"{exc.colno}); expected one JSON object per line (JSON Lines)"]
                            ) from exc
        if not isinstance(value, dict):
            raise DataError([f"{where}: line {number} is a JSON {type(value).__name__}, "
                             "expected an object per line (JSON Lines)"])
        yield number, value


def check_columns(found: list[str], where: str, columns: dict[str, Column]) -> None:
    """Raise :class:`DataError` unless every one of ``columns`` is among the ``found`` ones."""
    problems = [f"{column.setting}: no such column{column.shown} in {where.split('=', 1)[1]} "
                f"(columns: {', '.join(map(str, found))})"
                for column in columns.values() if column.name not in found]
    if problems:
        raise DataError(problems)


def _complete_rows(source: str, rows: list[Record], where: str, columns: dict[str, Column], *,
                   drop_missing: bool, unit: str) -> Table:
    kept: dict[str, list[str]] = {what: [] for what in columns}
    lines: list[int] = []
    missing: dict[str, list[int]] = {what: [] for what in columns}
    for number, row in rows:
        cells = {what: _cell(row.get(column.name)) for what, column in columns.items()}
        for what, cell in cells.items():
            if cell is None:
                missing[what].append(number)
        if all(cell is not None for cell in cells.values()):
            for what, cell in cells.items():
                kept[what].append(cell)
            lines.append(number)
    gaps = {what: numbers for what, numbers in missing.items() if numbers}
    if gaps and not drop_missing:
        raise DataError([
            f"{where}: {len(numbers)} row(s) with an empty or missing {columns[what].noun} "
            f"({columns[what].setting}), {PLURALS[unit][0]} {_show_lines(numbers)}; fix them, "
            "or set data.drop-missing=true to drop them" for what, numbers in gaps.items()])
    if gaps:
        dropped = len(rows) - len(lines)
        named = [column.noun for column in columns.values()]
        log(WARNING, "%s: dropped %d of %d rows with an empty or missing %s "
            "(data.drop-missing=true), first %s %s", where, dropped, len(rows),
            ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0],
            PLURALS[unit][1],
            _show_lines(sorted(set().union(*missing.values()))))
    return Table(source, kept["text"], kept.get("label"), lines, kept.get("partition"),
                 kept.get("prompt"), kept.get("pair"))


def _cell(value: Any) -> str | None:
    """A cell as text, or None when it is empty, null or NaN; integral floats lose their '.0'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool):
        value = str(value).lower()
    text = value if isinstance(value, str) else (
        json.dumps(value) if isinstance(value, dict | list) else str(value))
    return text if text.strip() and text.strip().lower() != "nan" else None


def _show_lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:SHOWN_LINES]))
    return shown + (f", ... ({len(numbers) - SHOWN_LINES} more)" if len(numbers) > SHOWN_LINES
                    else "")
