"""A sweep's report: tidy CSV, summary and paired CSVs, Markdown table, plots, README block.

:func:`write_report` writes it into a sweep folder (``sweep.csv``, ``summary.csv``,
``paired.csv``, ``results.md``, ``plots/``; wall time and commands from
``sweep-attempts.csv``) or a record folder (``table.md`` and ``*.png`` beside the CSVs; its
machine time is the sum of the last round's ``wall-seconds`` of every recorded cell). The runs
are read by :mod:`simulations.reports.records`.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import pandas as pd

from common import schema
from common.methods import method_order
from simulations.launch.console import duration
from simulations.reports.records import (
    ATTEMPTS_FILE,
    COMMANDS_FILE,
    Runs,
    epsilon_label,
    is_record_folder,
    load_runs,
    sweep_commands,
    with_reference,
)
from simulations.reports.statistics import paired_differences, summarize, target_line

README_START, README_END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"


def table_markers(name: str | None = None) -> tuple[str, str]:
    """The markers a page puts around a generated table; ``name`` tells several apart.

    None: ``<!-- sweep-table:start -->`` … ``<!-- sweep-table:end -->``; ``"side-eps"``:
    ``<!-- sweep-table:start side-eps -->`` … ``<!-- sweep-table:end side-eps -->``.
    """
    if name is None:
        return README_START, README_END
    if not name or "--" in name or name != name.strip():
        raise ValueError(f"table name {name!r}: a word such as side-eps (no spaces around it, "
                         "no '--')")
    return f"<!-- sweep-table:start {name} -->", f"<!-- sweep-table:end {name} -->"


def markdown_table(summary: pd.DataFrame, column: str = schema.EPSILON_BUDGET) -> str:
    """Rows: method (and α when there are several); columns: ``column`` (ε: ∞ first, then down).

    A cell is ``mean ± half-width`` with 4 decimals, ``(n = k)`` added when it has fewer runs
    than the largest cell, ``–`` when no run of it is complete.
    """
    by_epsilon = column == schema.EPSILON_BUDGET
    alphas = sorted(summary[schema.ALPHA].unique()) if schema.ALPHA in summary else [None]
    values = sorted(summary[column].unique(), key=lambda v: -v if by_epsilon else v)
    label = (lambda v: f"ε = {epsilon_label(v)}") if by_epsilon else (
        lambda v: f"{column.replace('_', ' ')} {v:g}")
    head = [schema.METHOD, *(["α"] if len(alphas) > 1 else []), *map(label, values)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_max = summary[schema.N_RUNS].max() if len(summary) else 0
    for alpha in alphas:
        for method in method_order(summary[schema.METHOD]):
            cells = [method, *([f"{alpha:g}"] if len(alphas) > 1 else [])]
            for value in values:
                match = summary[(summary[schema.METHOD] == method) & (summary[column] == value)
                                & ((summary[schema.ALPHA] == alpha) if alpha is not None
                                   else True)]
                cells.append(_cell(match.iloc[0], n_max) if len(match) else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: pd.Series, n_max: int) -> str:
    mean, half, n = row[schema.MEAN], row[schema.CI95], row[schema.N_RUNS]
    return f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}") + (
        f" (n = {n})" if n < n_max else "")


def sweep_wall_time(folder: Path, runs: Runs) -> tuple[float, str]:
    """Seconds of every recorded cell run (failed and resumed attempts too), and the source.

    Without an attempts file (runs made elsewhere): the sum of each run's last ``wall-seconds``
    (ServerApp time only, without SuperLink start-up).
    """
    attempts = Path(folder) / ATTEMPTS_FILE
    if attempts.is_file():
        rows = list(csv.DictReader(attempts.open()))
        return sum(float(r["seconds"]) for r in rows), f"{len(rows)} cell runs"
    return _wall_seconds(runs), "sum of the runs' ServerApp wall time"


def machine_time(runs: Runs) -> tuple[float, str]:
    """The sum of the last round's ``wall-seconds`` of every complete run, and the source."""
    return _wall_seconds(runs), (
        f"sum of the last round's wall-seconds of the {len(runs.final)} recorded cells: "
        "ServerApp time, without SuperLink start-up")


def _wall_seconds(runs: Runs) -> float:
    return float(runs.final[schema.tidy_name(schema.WALL_SECONDS)].sum())


def report_block(summary: pd.DataFrame, runs: Runs, *, commands: list[str], wall: float,
                 wall_source: str, images: list[str] = (),
                 wall_label: str = "Total wall time of the sweep",
                 commands_file: str = ATTEMPTS_FILE) -> str:
    """The Markdown that goes between the README markers (and into the folder's table).

    ``wall_label``, ``wall_source``: how ``wall`` is named and where it comes from;
    ``commands_file``: where the commands would have been recorded (named when none were).
    """
    split = "/".join(sorted(runs.final[schema.tidy_name(schema.EVAL_SPLIT)].unique())) or "test"
    seeds = sorted(runs.final[schema.SEED].unique())
    produced = ["Produced by:", "", "```bash", *commands, "```"] if commands else [
        f"(The sweep command was not recorded: no {commands_file} in the folder.)"]
    lines = [
        f"Final {split} accuracy (round {int(runs.final[schema.NUM_ROUNDS].max())}, whole {split} "
        f"split), mean ± 95 % confidence interval (Student t, n − 1 degrees of freedom) over "
        f"seeds {', '.join(map(str, seeds))}; one Flower simulation per cell.", "",
        *produced, "", markdown_table(summary), "",
    ]
    paired = paired_differences(runs.final)
    if not paired.empty:
        lines += ["FedSVD minus each method, paired by seed (same data partition and client "
                  "sampling): mean difference ± 95 % t-interval; positive: FedSVD ahead.", "",
                  markdown_table(paired), "", target_line(paired), ""]
    lines.append(f"{wall_label}: **{duration(wall)}** ({wall_source}).")
    lines.append(precision_line(runs.final))
    if runs.incomplete:
        lines.append(f"Left out, incomplete: {', '.join(runs.incomplete)}.")
    lines += ["", *(f"![{Path(i).stem}]({i})" for i in images)]
    return "\n".join(lines).rstrip() + "\n"


def precision_line(final: pd.DataFrame) -> str:
    """How many cells computed in each precision (``compute_dtype``): a table may mix hosts."""
    counts = final[schema.COMPUTE_DTYPE].value_counts()
    parts = ", ".join(f"{dtype} {count}" for dtype, count in sorted(counts.items()))
    return f"Frozen encoder computed in (cells): {parts or 'none'}."


def replace_between_markers(text: str, block: str,
                            markers: tuple[str, str] = (README_START, README_END)) -> str:
    """``text`` with everything between the two ``markers`` replaced by ``block``.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    start, end = markers
    starts, ends = text.count(start), text.count(end)
    if starts != 1 or ends != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README needs exactly one {start} followed by one {end} (found "
                         f"{starts} and {ends}); add them where the table should go")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: f"{start}\n{block.strip()}\n{end}", text)


def write_report(folder: Path, *, readme: Path | None = None, table: str | None = None,
                 reference: Path | None = None) -> dict[str, Path]:
    """Write the report of a sweep folder or a record folder into it; return the paths.

    A sweep folder gets ``sweep.csv``, ``summary.csv``, ``paired.csv``, ``results.md`` and
    ``plots/``; a record folder (:func:`is_record_folder`) ``sweep.csv``, ``summary.csv``,
    ``paired.csv``, ``table.md`` and its plots beside them. With ``readme`` (a Markdown page,
    e.g. the record's ``README.md``), also the table between its markers (:func:`table_markers`
    of ``table``; checked first, so a page without them changes nothing), linking the plots:
    those of a record folder (tracked in git) where they are, by a relative path
    (``../experiments/...``), the others copied, with the two CSVs, into ``_static/sweep/``
    beside the page. With ``reference`` (a folder holding FedSVD's runs at the same settings),
    its FedSVD runs at this folder's ε, α and seeds join the table, so that the other methods
    are paired with them (:func:`simulations.reports.records.with_reference`); its commands are
    listed too.
    """
    from simulations.reports import plots  # matplotlib only when plotting

    folder = Path(folder)
    records = is_record_folder(folder)
    runs = load_runs(folder, records=records)
    if runs.final.empty:
        raise ValueError(f"no complete run in {folder} (incomplete: {list(runs.incomplete)})")
    commands = sweep_commands(folder)
    if reference is not None:
        if not records:
            raise ValueError(f"a reference record pairs with a record folder; {folder} is a "
                             "sweep folder (give --record)")
        runs = with_reference(runs, reference)
        commands += [c for c in sweep_commands(reference) if c not in commands]
    splits = sorted(runs.final[schema.tidy_name(schema.EVAL_SPLIT)].unique())
    if len(splits) > 1:
        raise ValueError(f"{folder} mixes {' and '.join(splits)} runs (learning-rate tuning "
                         "evaluates on validation data): give each its own folder")
    markers = table_markers(table)
    if readme:
        replace_between_markers(readme.read_text(), "", markers)  # none: fail before writing
    written = {"tidy": folder / "sweep.csv", "summary": folder / "summary.csv",
               "table": folder / ("table.md" if records else "results.md")}
    runs.tidy.to_csv(written["tidy"], index=False)
    summary = summarize(runs.final)
    summary.to_csv(written["summary"], index=False)
    paired = paired_differences(runs.final)
    if not paired.empty:
        written["paired"] = folder / "paired.csv"
        paired.to_csv(written["paired"], index=False)
    images = plots.write_all(runs.tidy, summary, folder if records else folder / "plots")
    if records:
        wall, source = machine_time(runs)
        block = dict(commands=commands, wall=wall, wall_source=source,
                     wall_label="Total machine time", commands_file=COMMANDS_FILE)
    else:
        wall, source = sweep_wall_time(folder, runs)
        block = dict(commands=commands, wall=wall, wall_source=source)
    written["table"].write_text(report_block(
        summary, runs, images=[p.relative_to(folder).as_posix() for p in images], **block))
    if readme:
        readme_dir = readme.parent.resolve()
        if records:
            links = [Path(os.path.relpath(p.resolve(), readme_dir)).as_posix() for p in images]
        else:
            static = readme.parent / "_static" / "sweep"
            static.mkdir(parents=True, exist_ok=True)
            for file in [*images, written["tidy"], written["summary"]]:
                (static / file.name).write_bytes(file.read_bytes())
            links = [f"_static/sweep/{p.name}" for p in images]
        readme.write_text(replace_between_markers(
            readme.read_text(), report_block(summary, runs, images=links, **block), markers))
        written["readme"] = readme
    return written
