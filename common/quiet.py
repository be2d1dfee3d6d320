"""Silence, for one block only, what libraries print that a run expects and cannot act on.

Nothing here changes global state for longer than the block: each context manager restores the
library's setting, or the warning filters, as it found them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import datasets
from transformers.utils import logging as hf_logging

# Expected when building the model: peft asks transformers whether gradient checkpointing is on
# through a deprecated property (once per model built, so once per client round).
MODEL_BUILDING_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Expected model-loading output off for the block, as it was after it.

    transformers' load report ("classifier MISSING": the head is new), its weight-loading
    progress bar and the deprecation warnings of :data:`MODEL_BUILDING_WARNINGS`.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for message in MODEL_BUILDING_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_dataset_progress() -> Iterator[None]:
    """The ``datasets`` progress bars off for the block, as they were after it.

    "Flattening the indices", once per partition cut: every client round of a fresh process.
    """
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
