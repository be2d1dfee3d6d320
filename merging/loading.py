"""Load N merge sources and check them against each other and the base model.

All sources must target the same modules with the same (d_out, d_in). Adapters give the module
list; a merge of full models only takes it from ``target_modules`` (peft's rule: a module
matches a name if it equals it or ends with ``"." + name``) applied to the base's 2-D weights.
Every error is a :class:`~merging.sources.SourceError` that starts with the offending folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from merging.sources import (
    ADAPTER_CONFIG,
    Source,
    SourceError,
    Weights,
    load_adapter,
    load_full,
)


def load_sources(paths: Sequence[str | Path], *, base: str | Path | None = None,
                 target_modules: Sequence[str] | None = None,
                 check_base_name: bool = True) -> list[Source]:
    """Read every source (adapter or full model), in the given order, and check them.

    Parameters
    ----------
    paths : sequence of path
        peft adapter folders and/or full fine-tuned model folders.
    base : path, optional
        The base model folder. Required for full-model sources (their delta is W_ft − W_0);
        with adapters only, it is used to check every module's shape.
    target_modules : sequence of str, optional
        Module names (peft-style suffixes) for a merge of full models only; with adapters, it
        must select the adapters' modules.
    check_base_name : bool
        Require the adapters' ``base_model_name_or_path`` to agree (same resolved path or
        string); turn off for the same model stored at different paths.

    Raises
    ------
    SourceError
        Naming the first source that is missing, unreadable or does not match the others.
    """
    folders = [Path(p) for p in paths]
    if not folders:
        raise ValueError("no sources given")
    for folder in folders:
        if not folder.is_dir():
            raise SourceError(folder, "no such folder")
        if not (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            raise SourceError(folder, f"neither a peft adapter ({ADAPTER_CONFIG}) nor a model "
                              "folder (config.json)")
    adapters = {f: load_adapter(f) for f in folders if (f / ADAPTER_CONFIG).is_file()}
    base_dir = _base_dir(base, next((f for f in folders if f not in adapters), None))
    reference = next(iter(adapters.values()), None)
    if reference is None:  # full models only: name modules as the first one stores them
        first = Weights.of_model(folders[0])
        modules = [(first.resolve(f"{m}.weight") or f"{m}.weight").removesuffix(".weight")
                   for m in _select(base_dir, target_modules)]
    else:
        modules = list(reference.shapes)
        stray = [m for m in modules if target_modules and not _matches(m, target_modules)]
        if stray:
            raise SourceError(reference.name, f"targets {stray[0]!r}, which target_modules "
                              f"{list(target_modules)} does not select (leave it out with "
                              "adapters: they name their modules)")
    fan_in_fan_out = bool(reference is not None and reference.config.fan_in_fan_out)
    sources = [adapters[f] if f in adapters else load_full(f, base_dir, modules, fan_in_fan_out)
               for f in folders]
    for source in sources:
        _check_like(source, sources[0])
        if check_base_name and source.kind == "adapter" and reference is not None:
            _check_base_name(source, reference)
    if base_dir is not None:
        _check_base_shapes(sources[0], base_dir, fan_in_fan_out)
    return sources


def _base_dir(base: str | Path | None, first_full: Path | None) -> Path | None:
    if base is None:
        if first_full is not None:
            raise SourceError(first_full, "is a full model: its delta W_ft − W_0 needs the base "
                              "model (pass --base DIR / base=...)")
        return None
    base = Path(base)
    if not (base / "config.json").is_file():
        raise SourceError(base, "the base model folder has no config.json")
    return base


def _matches(module: str, target_modules: Sequence[str]) -> bool:
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def _select(base: Path, target_modules: Sequence[str] | None) -> list[str]:
    """Names of the base's 2-D ``.weight`` tensors whose module matches ``target_modules``."""
    if not target_modules:
        raise SourceError(base, "a merge of full models needs target_modules (e.g. "
                          "--target-modules query,value): there is no adapter to take them from")
    weights = Weights.of_model(base)
    modules = [key.removesuffix(".weight") for key in weights.files if key.endswith(".weight")]
    modules = [m for m in modules if _matches(m, target_modules)
               and len(weights.shape(f"{m}.weight")) == 2]
    if not modules:
        raise SourceError(base, f"no 2-D weight matches target modules {list(target_modules)}")
    return modules


def _check_like(source: Source, reference: Source) -> None:
    """Same modules with the same (d_out, d_in) as the first source."""
    missing = [m for m in reference.shapes if m not in source.shapes]
    extra = [m for m in source.shapes if m not in reference.shapes]
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has the extra {extra[0]!r}"
        raise SourceError(source.name, f"targets other modules than {reference.name}: it "
                          f"{which} ({len(missing)} missing, {len(extra)} extra)")
    for module, shape in reference.shapes.items():
        if source.shapes[module] != shape:
            raise SourceError(source.name, f"module {module!r} is {source.shapes[module]} "
                              f"(d_out, d_in), {shape} in {reference.name}: another base model")


def _check_base_name(source: Source, reference: Source) -> None:
    ours, theirs = (s.config.base_model_name_or_path or "" for s in (source, reference))
    if ours and theirs and _canonical(ours) != _canonical(theirs):
        raise SourceError(source.name, f"was trained on base {ours!r}, {reference.name} on "
                          f"{theirs!r} (if this is the same model at another path, turn the "
                          "check off: --allow-base-mismatch)")


def _canonical(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _check_base_shapes(source: Source, base: Path, fan_in_fan_out: bool) -> None:
    weights = Weights.of_model(base)
    for module, shape in source.shapes.items():
        key = f"{module}.weight"
        if weights.resolve(key) is None:
            raise SourceError(source.name, f"module {module!r} is not in the base model {base}")
        found = weights.shape(key)
        if (tuple(reversed(found)) if fan_in_fan_out else found) != shape:
            raise SourceError(source.name, f"module {module!r} is {shape} (d_out, d_in), the "
                              f"base model {base} has {found}")
