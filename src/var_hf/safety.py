"""Refusing pickled weights: var-hf reads safetensors only and never unpickles."""

from __future__ import annotations

from pathlib import Path

from .checkpoint_reader import FORMAT_SAFETENSORS, UnsafeCheckpointError, detect_format

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickleRefusedError(ValueError):
    """A pickle-format file was found where safetensors weights belong."""


def weight_locations(folder: Path) -> list[Path]:
    """Where loaders read weights: the folder itself and its component sub-folders (those holding a config.json)."""
    return [folder] + sorted(d for d in folder.iterdir() if d.is_dir() and (d / "config.json").is_file())


def check_file_is_not_pickled(path: Path, label: str) -> None:
    """Raise `PickleRefusedError` if weights file `path` is a pickle: by its name, else by its content (never loaded)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{label}: weights in a pickle format are refused (loading a pickle can run arbitrary code). "
            "Convert them to safetensors with `python conversion/convert_original_var.py` or remove the file."
        )
    try:
        kind = detect_format(path)  # by content, never by loading
    except UnsafeCheckpointError as error:
        raise PickleRefusedError(f"{label} is not a safetensors file: {error}") from None
    if kind != FORMAT_SAFETENSORS:
        raise PickleRefusedError(f"{label}: its content is a torch pickle checkpoint, not safetensors; refusing to load it")


def check_folder_has_no_pickles(folder: str | Path) -> None:
    """
    Raise `PickleRefusedError` if a place weights are loaded from (the folder, its component sub-folders) holds a
    pickle-format file, by name or by content. Other sub-folders (e.g. local training checkpoints) are never read.
    """
    folder = Path(folder)
    for location in weight_locations(folder):
        for path in sorted(p for p in location.iterdir() if p.is_file()):
            if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix == ".safetensors":
                check_file_is_not_pickled(path, str(path.relative_to(folder)))


def safetensors_only(pretrained_model_name_or_path, kwargs: dict) -> dict:
    """
    The `from_pretrained` keyword arguments of a var-hf model, made safetensors-only: `use_safetensors=True` (a Hub repo
    then gives safetensors or an error, never a pickle), and local pickled weights (a folder holding them, or a file
    named directly) are refused before anything is read. `use_safetensors=False` is refused.
    """
    if kwargs.get("use_safetensors") is False:
        raise ValueError("var-hf loads safetensors weights only; use_safetensors=False is not supported")
    source = None if pretrained_model_name_or_path is None else Path(pretrained_model_name_or_path)
    if source is not None and source.is_dir():
        check_folder_has_no_pickles(source / (kwargs.get("subfolder") or ""))
    elif source is not None and source.is_file():
        check_file_is_not_pickled(source, source.name)
    return {**kwargs, "use_safetensors": True}
