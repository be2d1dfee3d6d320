"""Read a user's CSV or JSON Lines file of (text, label) rows, refusing what cannot be trained on.

For causal language modelling (``model.task = "causal-lm"``) the rows are texts without a label,
optionally with a prompt (``data.prompt-column``): the label column is then not read.

Every problem is reported before any training, naming the file, the run-config key and the line
numbers (1-based, as an editor shows them; a CSV's header is line 1). Checked, in order:

- the file exists, is not empty and is UTF-8 text (the line of the first undecodable byte);
- CSV: it parses (``csv`` module errors name their line), no row has more fields than the
  header; JSON Lines: every non-blank line is one JSON object;
- the text and label columns exist (the columns found are listed), and the prompt and
  partition columns when they are asked for (``data.prompt-column``, ``data.partitioner =
  "column"``);
- no row has an empty or missing text, label or partition value (their count and first lines),
  unless ``data.drop-missing`` asks to drop them, which is then logged with the count.

Labels are kept as written: a CSV's ``0`` / ``1`` stay ``"0"`` / ``"1"`` (never ``"0.0"``), and
an integral JSON number ``1`` or ``1.0`` becomes ``"1"``.
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
from typing import Any

from flwr.common.logger import log

TABLE_SUFFIXES = (".csv", ".jsonl", ".json")
SHOWN_LINES = 5  # line numbers quoted per problem


class DataError(ValueError):
    """The data cannot be trained on; one line per problem, each naming its file and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("unusable data:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Table:
    """The usable rows of a file: ``texts[i]`` labelled ``labels[i]``, from line ``lines[i]``.

    ``labels`` is None when no label column was read (causal LM), ``prompts`` None when no
    prompt column was; ``partitions[i]`` is the row's value of the partition column, as text,
    None when no partition column was asked for.
    """

    path: Path
    texts: list[str]
    labels: list[str] | None
    lines: list[int]
    partitions: list[str] | None = None
    prompts: list[str] | None = None


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
    columns = {"text": text_column, "label": label_column, "partition": partition_column,
               "prompt": prompt_column}
    columns = {what: column for what, column in columns.items() if column}
    _check_columns(rows, where, columns)
    return _complete_rows(file, rows, where, columns, drop_missing=drop_missing)


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


def _check_columns(rows: list[Record], where: str, columns: dict[str, str]) -> None:
    """Every asked column exists; ``columns`` maps text/label/partition/prompt to its name."""
    found = list(dict.fromkeys(k for _, row in rows for k in row))
    problems = [f"data.{what}-column={column!r}: no such column in {where.split('=', 1)[1]} "
                f"(columns: {', '.join(map(str, found))})"
                for what, column in columns.items() if column not in found]
    if problems:
        raise DataError(problems)


def _complete_rows(file: Path, rows: list[Record], where: str, columns: dict[str, str], *,
                   drop_missing: bool) -> Table:
    kept: dict[str, list[str]] = {what: [] for what in columns}
    lines: list[int] = []
    missing: dict[str, list[int]] = {what: [] for what in columns}
    for number, row in rows:
        cells = {what: _cell(row.get(column)) for what, column in columns.items()}
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
            f"{where}: {len(numbers)} row(s) with an empty or missing "
            f"{'partition value' if what == 'partition' else what} "
            f"(data.{what}-column={columns[what]!r}), line(s) {_show_lines(numbers)}; fix them, "
            "or set data.drop-missing=true to drop them" for what, numbers in gaps.items()])
    if gaps:
        dropped = len(rows) - len(lines)
        named = [f"{what} value" if what == "partition" else what for what in columns]
        log(WARNING, "%s: dropped %d of %d rows with an empty or missing %s "
            "(data.drop-missing=true), first lines %s", where, dropped, len(rows),
            ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0],
            _show_lines(sorted(set().union(*missing.values()))))
    return Table(file, kept["text"], kept.get("label"), lines, kept.get("partition"),
                 kept.get("prompt"))


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
