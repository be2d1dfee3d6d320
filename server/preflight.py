"""Everything a run needs, checked before it trains: configuration, data, partitions, folder.

The ServerApp runs :func:`check_run` before round 0; the launchers (``simulations.run``,
``deploy.local``, the sweep and the merge experiment) run :func:`preflight` in their own process
before they start a SuperLink, so that a bad run is refused in seconds, with every problem named,
not after Ray has started. What is refused raises a ``ValueError`` or ``OSError`` subclass whose
message is the whole explanation: :class:`~common.config.ConfigError` (keys and values),
:class:`~common.data_files.DataError` (files, keys, lines, partitions), :class:`OutputExists`
and :class:`~server.checkpoint.CheckpointMismatch` (the results folder), ``FileNotFoundError``.

The data and checkpoint modules (torch, datasets) are imported only once the configuration
itself is valid, so that :func:`refusal` reports a bad key in about a second.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import schema
from common.config import RUN_LEDGER_DIR, AppConfig, ConfigError, OutputConfig
from common.run_config import app_run_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from common.data import Corpus

# What a run writes into its folder; any of them present means the folder holds a result
# ("checkpoint.safetensors" is server.checkpoint.CHECKPOINT_FILE, spelled out here so that a bad
# key is refused without importing torch; tests/test_launcher.py checks that they agree).
RESULT_FILES = (schema.METRICS_FILE, schema.CONFIG_FILE, schema.ENVIRONMENT_FILE,
                schema.GENERATIONS_FILE, schema.ADAPTER_DIR, "checkpoint.safetensors",
                RUN_LEDGER_DIR, schema.CLASS_PRIOR_FILE)
REFUSED = (ValueError, OSError)  # what preflight and check_run raise for input they refuse


class OutputExists(ValueError):
    """The run's folder already holds results, and neither resume nor overwrite was asked."""


def check_output_folder(folder: Path, cfg: AppConfig) -> None:
    """Refuse to write over an earlier run's results unless ``output.overwrite`` says so.

    With ``output.resume`` the folder must hold a checkpoint of the same configuration
    (:func:`server.checkpoint.load_checkpoint` raises otherwise).
    """
    if cfg.output.resume:
        from server.checkpoint import load_checkpoint

        load_checkpoint(folder, cfg)
        return
    existing = [name for name in RESULT_FILES if (folder / name).exists()]
    if existing and not cfg.output.overwrite:
        raise OutputExists(
            f"output: {folder} already holds the results of a run ({', '.join(existing)}); "
            "set output.resume=true to continue it, output.overwrite=true to replace it, or "
            "another output.run-name (or output.dir)")


def clear_results(folder: Path) -> list[str]:
    """Remove what an earlier run wrote into ``folder`` (``output.overwrite``); return names.

    Only the files a run writes (``RESULT_FILES``) are removed; anything else is left.
    """
    return [name for name in RESULT_FILES if remove_path(folder / name)]


def remove_path(path: Path) -> bool:
    """Remove the file or folder ``path``; False if there was nothing there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return False
    return True


def check_run(cfg: AppConfig, *, num_partitions: int | None = None) -> Corpus:
    """Check the device, the model, the data, δ, the budget, the results folder; the corpus.

    ``num_partitions`` (known in simulation: the number of SuperNodes): also refuse any
    partition too small to train, and a budget its smallest partition cannot be calibrated
    for. In a deployment each client checks its own partition and device.
    """
    from common.data import check_partitions, load_corpus
    from common.devices import resolve_device
    from common.model import load_tokenizer
    from common.model_checks import check_model
    from privacy.census import check_census_budget
    from privacy.policy import check_delta
    from privacy.reach import check_reachable

    resolve_device(cfg.model.device)  # model.device='cuda' without a GPU: ValueError
    check_model(cfg.model, cfg.lora)
    folder = cfg.results_folder
    check_output_writable(folder, cfg.output)
    corpus = load_corpus(cfg.data, cfg.seed, cfg.model.task_kind)
    if cfg.lora.head_init == "class-names":  # classification only (AppConfig checks)
        check_class_names(corpus.label_names, load_tokenizer(cfg.model))
    check_class_prior(cfg.data.declared_prior, corpus.label_names)
    if cfg.privacy.is_private:  # each client checks its own partition again
        check_delta(cfg.privacy.delta, len(corpus.train), "the whole training split")
    if cfg.data.class_prior_census:
        check_census_budget(cfg.privacy)
    if num_partitions is None:
        check_reachable(cfg, len(corpus.train), "the whole training split")
    else:
        sizes = check_partitions(cfg.data, cfg.seed, num_partitions, cfg.train.batch_size,
                                 cfg.model.task_kind)
        smallest = min(range(num_partitions), key=sizes.__getitem__)
        check_reachable(cfg, sizes[smallest],
                        f"partition {smallest} of {num_partitions}, the smallest")
    check_output_folder(folder, cfg)
    return corpus


def check_output_writable(folder: Path, output: OutputConfig) -> None:
    """Refuse (ConfigError) an ``output.dir`` under which the run's ``folder`` cannot be made.

    ``folder`` is the run's results folder (``AppConfig.results_folder``, in ``output.dir``).
    It, or else the nearest of its parents that exists, must be a folder in which this
    process can create one (tried: a temporary folder is made there and removed).
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    why = (f"{existing} is a file, not a folder" if not existing.is_dir() else
           _cannot_create_in(existing))
    if why:
        raise ConfigError([f"output.dir={output.dir!r}: the run's folder {folder} cannot "
                           f"be made: {why}; set output.dir to a folder you can write"])


def _cannot_create_in(folder: Path) -> str | None:
    """Why a folder cannot be created in ``folder`` (the OS's reason), or None."""
    try:
        Path(tempfile.mkdtemp(prefix=".fedsvd-check-", dir=folder)).rmdir()
    except OSError as exc:
        return f"no folder can be created in {folder} ({exc.strerror})"
    return None


def check_class_names(label_names: tuple[str, ...], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse class names that would give a class-name head two identical rows."""
    from common.data_files import DataError
    from common.public_head import duplicate_name_texts

    if pairs := duplicate_name_texts(label_names, tokenizer):
        same = "; ".join(f"{a!r} and {b!r}" for a, b in pairs)
        raise DataError([
            f"lora.head-init='class-names': the class names {same} read as the same text, so "
            "the head would score them alike for every example; rename the labels in "
            "data.label-column, or use lora.head-init='random'"])


def check_class_prior(prior: Mapping[str, float], label_names: tuple[str, ...]) -> None:
    """Refuse a declared ``data.class-prior`` that does not name each class of the data once."""
    from common.class_prior import class_prior_problems
    from common.data_files import DataError

    if prior and (problems := class_prior_problems(prior, label_names)):
        raise DataError(problems)


def preflight(run_config: Mapping[str, Any], *, num_partitions: int | None) -> AppConfig:
    """Build the run's configuration from its flat run config and :func:`check_run` it.

    Raises what :func:`check_run` raises (``REFUSED``); returns the configuration.
    """
    cfg = AppConfig.from_run_config(run_config)
    check_run(cfg, num_partitions=num_partitions)
    return cfg


def refusal(app_dir: Path, run_config: Sequence[str], *, num_partitions: int | None
            ) -> str | None:
    """Why the run of ``app_dir`` with ``run_config`` overrides must not start, or None.

    The launchers print it last and exit with status 2 before starting any SuperLink.
    """
    try:
        preflight(app_run_config(app_dir, run_config), num_partitions=num_partitions)
    except REFUSED as exc:
        return f"error: {exc}\nrefused before starting: nothing was run"
    return None
