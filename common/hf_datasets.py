"""Read a Hugging Face dataset into a :class:`common.data_files.Table`, as a CSV file is read.

The sources (:mod:`common.data_sources`): a ``.parquet`` file or glob, a folder written by
``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or a hub name
``"hf:<owner>/<name>[:<subset>]"``, which ``datasets.load_dataset`` downloads into its cache,
or reads from there alone when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set. What
cannot be loaded is refused before any launch, naming the dataset and the cache folder.

A source with named splits (a ``DatasetDict``, a hub dataset) trains on its ``train`` split and
is tested on ``data.test-split``, or by default on its ``test`` split, else its ``validation``
split, else a ``data.test-fraction`` share of ``train``; ``data.test-source`` names another
source instead. Which splits are used is logged.

Every split's rows pass :func:`common.data_files.table_from_records`: the same column and
missing-value checks, and the same messages, as a CSV file (its rows named by index). A label
column of ``ClassLabel`` type (integers with names, as GLUE's) is read as the names, so that
the class-name head sees ``"entailment"``, not ``"0"``; its ``-1`` ("no label") is a missing
label, and a split without any label (GLUE's test splits) is refused as such.

Not through flwr-datasets' ``FederatedDataset``: it cuts the raw split into partitions as it
loads, while the rows here must first be checked, their labels named, selected, grouped and a
validation share carved out (:func:`common.data.load_corpus`). The partitioners are the same
flwr-datasets ones, applied to the checked split by :func:`common.data.load_partition`, as for
a CSV file.
"""

from __future__ import annotations

import functools
from logging import INFO
from pathlib import Path
from typing import NamedTuple

import datasets
from datasets import ClassLabel, Dataset, DatasetDict
from flwr.common.logger import log

from common.config import DataConfig
from common.data_files import (
    DataError,
    Record,
    Table,
    asked_columns,
    check_columns,
    table_from_records,
)
from common.data_sources import Source, parse_source
from common.quiet import quiet_dataset_progress

TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "validation")  # data.test-split = "": the first one present
UNLABELLED = -1  # a ClassLabel's "no label"


class SplitPlan(NamedTuple):
    """Which split of which source trains, and which tests.

    ``train``: the split of ``data.source`` (None: it has no named splits, all its rows).
    ``test``: (key, source, split): the run-config key, its value, the split (None: the whole
    source); None when a ``data.test-fraction`` share of the training rows is held out.
    """

    train: str | None
    test: tuple[str, str, str | None] | None


def plan_splits(cfg: DataConfig) -> SplitPlan:
    """Which splits ``cfg`` trains and tests on (:class:`SplitPlan`), logged at INFO.

    Raise :class:`DataError` for a source with named splits but no ``train``, a
    ``data.test-split`` the test source does not have (or, without named splits, cannot have),
    or a ``data.test-source`` with named splits none of which is a test split.
    """
    train = _named_split(cfg.source, "data.source", TRAIN_SPLIT)
    key, text = ("data.test-source", cfg.test_source) if cfg.test_source else (
        "data.source", cfg.source)
    split = _named_split(text, key, cfg.test_split, test=True, required=bool(cfg.test_source))
    test = (key, text, split) if cfg.test_source or split is not None else None
    if train is not None or split is not None:
        tested = (f"its split {split!r}" if not cfg.test_source and split else
                  f"data.test-source={text!r}" + (f" split {split!r}" if split else "")
                  if cfg.test_source else
                  f"a data.test-fraction={cfg.test_fraction:g} share of its training rows")
        log(INFO, "data.source=%r: training on %s, testing on %s", cfg.source,
            f"its split {train!r}" if train else "all its rows", tested)
    return SplitPlan(train, test)


def _named_split(text: str, key: str, wanted: str, *, test: bool = False,
                 required: bool = True) -> str | None:
    """The split of source ``text`` to read: ``wanted``, or ("" and ``test``) a test split.

    The test split picked is the first of :data:`TEST_SPLITS` present. None for a source
    without named splits (refused when a test split is ``wanted``: it cannot have one), or
    with no test split when not ``required``.
    """
    source = parse_source(text)
    names = split_names(source, key) if source.may_have_splits else ()
    where = f"{key}={text!r}"
    head = f"data.test-split={wanted!r}: {where} has" if test and wanted else f"{where}: has"
    if not names:
        if test and wanted:
            raise DataError([f"{head} no named splits (it is one table); leave "
                             "data.test-split empty"])
        return None
    picked = wanted or next((s for s in TEST_SPLITS if s in names), "")
    if picked in names:
        return picked
    if not wanted and not required:
        return None
    why = f"no split {wanted!r}" if wanted else f"no {' or '.join(map(repr, TEST_SPLITS))} split"
    advice = ("name its test split in data.test-split" if test else
              f"{key} trains on its {TRAIN_SPLIT!r} split")
    raise DataError([f"{head} {why} (splits: {', '.join(names)}); {advice}"])


def split_names(source: Source, key: str) -> tuple[str, ...]:
    """The named splits of ``source`` (a ``DatasetDict`` or hub dataset); () for one table."""
    loaded = load_source(source.text, key)
    return tuple(loaded) if isinstance(loaded, DatasetDict) else ()


def read_split(text: str, *, key: str, split: str | None, text_column: str, label_column: str,
               drop_missing: bool = False, partition_column: str = "",
               prompt_column: str = "") -> Table:
    """The checked rows of ``split`` of source ``text`` (None: all of a source without splits).

    The columns, ``drop_missing`` and :class:`DataError` as
    :func:`common.data_files.read_table`; a ClassLabel label column is read as its names.
    """
    loaded = load_source(text, key)
    dataset = loaded[split] if split is not None else loaded
    where = f"{key}={text!r}" + (f" split {split!r}" if split is not None else "")
    columns = asked_columns(text_column=text_column, label_column=label_column,
                            partition_column=partition_column, prompt_column=prompt_column)
    check_columns(list(dataset.column_names), where, columns)
    if len(dataset) == 0:
        raise DataError([f"{where}: the dataset has no rows"])
    names = {column.name for column in columns.values()}
    values = dataset.select_columns(sorted(names)).to_dict()
    if "label" in columns and isinstance(feature := dataset.features[label_column], ClassLabel):
        values[label_column] = _class_names(values[label_column], feature)
        if all(label is None for label in values[label_column]):
            raise DataError([_unlabelled(where, split, columns["label"].setting, key, loaded)])
    rows: list[Record] = [(i, {name: values[name][i] for name in names})
                          for i in range(len(dataset))]
    return table_from_records(rows, list(dataset.column_names), source=text, where=where,
                              columns=columns, drop_missing=drop_missing, unit="index")


def _class_names(ids: list[int | None], feature: ClassLabel) -> list[str | None]:
    """Each ClassLabel id as its name; None for -1 ("no label") or a missing id."""
    return [feature.names[i] if i is not None and 0 <= i < len(feature.names) else None
            for i in ids]


def _unlabelled(where: str, split: str | None, setting: str, key: str,
                loaded: Dataset | DatasetDict) -> str:
    """Why a split whose every label is ClassLabel's -1 is refused, and which split to use."""
    names = list(loaded) if isinstance(loaded, DatasetDict) else []
    others = [s for s in names if s not in (split, TRAIN_SPLIT)]
    labelled = [s for s in others if s.startswith("validation")] or others
    advice = (f"evaluate on a labelled split: data.test-split={labelled[0]!r} (splits: "
              f"{', '.join(names)})" if labelled and split != TRAIN_SPLIT else
              f"name a labelled source in {key}")
    return (f"{where}: has no labels: every {setting} value is {UNLABELLED}, ClassLabel's 'no "
            "label' (the dataset keeps these labels hidden, as GLUE does for its test splits); "
            f"{advice}")


@functools.lru_cache(maxsize=4)
def load_source(text: str, key: str) -> Dataset | DatasetDict:
    """The dataset ``text`` names, loaded once per process (memory-mapped Arrow).

    A ``.parquet`` file or glob is one ``Dataset`` (its ClassLabel features kept from the
    file's metadata); a save_to_disk folder what was saved; a hub name its ``DatasetDict``.
    """
    source = parse_source(text)
    where = f"{key}={text!r}"
    with quiet_dataset_progress():
        if source.kind == "parquet":
            return _read_parquet(source, where)
        if source.kind == "saved":
            return datasets.load_from_disk(str(Path(source.text).expanduser()))
        if source.kind == "hub":
            return _load_hub(source, where)
    raise ValueError(f"{where}: not a Hugging Face dataset source")


def _read_parquet(source: Source, where: str) -> Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = source.parquet_files()
    if not files:
        raise DataError([f"{where}: no such file"])
    try:
        return Dataset(pa.concat_tables([pq.read_table(file) for file in files]))
    except (pa.ArrowException, OSError) as exc:
        raise DataError([f"{where}: not readable as Parquet ({type(exc).__name__}: {exc})"]
                        ) from exc


def _load_hub(source: Source, where: str) -> DatasetDict:
    """``datasets.load_dataset`` of a hub name, refused with the cache folder where it fails."""
    named = repr(source.dataset) + (f" (subset {source.subset!r})" if source.subset else "")
    cache = datasets.config.HF_DATASETS_CACHE
    try:
        return datasets.load_dataset(source.dataset, source.subset)
    except (OSError, ValueError) as exc:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError([
                f"{where}: the Hugging Face dataset {named} is not in the datasets cache "
                f"{cache}, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid downloading it: load "
                "it once where the hub is reachable, or point HF_DATASETS_CACHE (or HF_HOME) at "
                "a cache that holds it"]) from exc
        raise DataError([f"{where}: cannot load the Hugging Face dataset {named} "
                         f"({type(exc).__name__}: {exc}); datasets cache: {cache}"]) from exc
