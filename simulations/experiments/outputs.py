"""The files that the experiment scripts write for a user: never replaced without a flag."""

from __future__ import annotations

from pathlib import Path


def refuse_existing(out: Path, *, overwrite: bool) -> None:
    """FileExistsError for an existing ``out`` unless ``overwrite``: checked before any work."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
