"""Two 20 Newsgroups topic groups as a user's JSONL file, the minority cut to a given share.

The check that separates the two properties of the SMS Spam Collection (two classes, and a
13.4 % minority) in which the defaults' 5 rounds did not learn: two topics that the defaults
learn in 5 rounds as 20 Newsgroups has them (by default ``comp`` against ``rec``, 55 / 45 %),
with the second group cut to the SMS file's minority share. The train and test splits of the
two groups are pooled (the run carves its own test split out of the file,
``data.test-fraction``, as from a user's file), every post of the majority group is kept, and
a seeded random subset of the minority group's posts, so that it makes ``--minority-share`` of
the rows:

    python experiments/binary-check/imbalanced_pair.py results/binary-check/comp-rec-13.jsonl

One JSON object per line, ``text`` and ``label`` (the group's name), which ``data.source``
reads as it reads a CSV. Blank posts (a header-only post, once headers are removed) are left
out: a user's file may not have them. An existing file is not overwritten (``--overwrite``).
The script of the record ``experiments/binary-check`` (run by its path: it is not installed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import DataConfig
from common.data import load_corpus

SMS_MINORITY_SHARE = 747 / 5574  # spam in the SMS Spam Collection


def group_rows(majority: str = "comp", minority: str = "rec") -> list[tuple[str, str]]:
    """(text, group) of every non-blank 20 Newsgroups post of the two groups, both splits."""
    cfg = DataConfig(labels=(f"{majority}.*", f"{minority}.*"), label_groups="prefix")
    corpus = load_corpus(cfg, seed=0)  # seed: unused without a validation share
    return [(text, corpus.label_names[label]) for split in (corpus.train, corpus.test)
            for text, label in zip(split["text"], split["label"], strict=True) if text.strip()]


def cut_minority(rows: Sequence[tuple[str, str]], minority: str, share: float,
                 seed: int = 0) -> list[tuple[str, str]]:
    """``rows`` with the ``minority`` label's rows cut to ``share`` of the result, in order.

    Keeps every other row and the first m = round(share · n_other / (1 − share)) of a seeded
    shuffle of the minority rows; ValueError when the share is not in (0, 0.5] or the minority
    has fewer than m rows.
    """
    if not 0 < share <= 0.5:
        raise ValueError(f"--minority-share {share}: must be in (0, 0.5]")
    others = sum(label != minority for _, label in rows)
    wanted = round(share * others / (1 - share))
    mine = [i for i, (_, label) in enumerate(rows) if label == minority]
    if wanted > len(mine):
        raise ValueError(f"{minority!r}: {len(mine)} rows, fewer than the {wanted} that make "
                         f"{share:.3f} of the file")
    kept = set(random.Random(seed).sample(mine, wanted))
    return [row for i, row in enumerate(rows) if row[1] != minority or i in kept]


def write_jsonl(rows: Sequence[tuple[str, str]], out: Path) -> None:
    """``{"text": …, "label": …}`` per line (``out`` replaced if it exists)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": text, "label": label}) + "\n"
                           for text, label in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line: write the file, print its class counts; exit 1 with the reason on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    parser.add_argument("--majority", default="comp", help="20 Newsgroups group kept whole")
    parser.add_argument("--minority", default="rec", help="group cut to --minority-share")
    parser.add_argument("--minority-share", type=float, default=SMS_MINORITY_SHARE,
                        help=f"its share of the rows, in (0, 0.5] (default "
                             f"{SMS_MINORITY_SHARE:.4f}, the SMS file's spam)")
    parser.add_argument("--seed", type=int, default=0, help="which minority posts are kept")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        rows = cut_minority(group_rows(args.majority, args.minority), args.minority,
                            args.minority_share, args.seed)
        write_jsonl(rows, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    minority = sum(label == args.minority for _, label in rows)
    print(f"wrote {args.out}: {len(rows)} posts, {len(rows) - minority} {args.majority}, "
          f"{minority} {args.minority} ({minority / len(rows):.3f}; majority baseline "
          f"{(len(rows) - minority) / len(rows):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
