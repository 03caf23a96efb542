"""Refusing pickled weights: var-hf reads safetensors only and never unpickles."""

from __future__ import annotations

import struct
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# First bytes of files that are pickles or pickle containers: zip (torch.save), raw pickle protocol 2-5, tar, 7z, gzip.
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"7z\xbc\xaf", b"\x1f\x8b")


class PickleRefusedError(ValueError):
    """A pickle-format file was found where safetensors weights belong."""


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= header_len <= path.stat().st_size - 8


def weight_locations(folder: Path) -> list[Path]:
    """Where loaders read weights: the folder itself and its component sub-folders (those holding a config.json)."""
    return [folder] + sorted(d for d in folder.iterdir() if d.is_dir() and (d / "config.json").is_file())


def check_folder_has_no_pickles(folder: str | Path) -> None:
    """
    Raise `PickleRefusedError` if a place weights are loaded from (the folder, its component sub-folders) holds a
    pickle-format file, by name or by content. Other sub-folders (e.g. local training checkpoints) are never read.
    """
    folder = Path(folder)
    for location in weight_locations(folder):
        for path in sorted(p for p in location.iterdir() if p.is_file()):
            relative = path.relative_to(folder)
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise PickleRefusedError(
                    f"{relative}: weights in a pickle format are refused (loading a pickle can run arbitrary code). "
                    "Convert them to safetensors with `python conversion/convert_original_var.py` or remove the file."
                )
            if path.suffix == ".safetensors" and not looks_like_safetensors(path):
                with open(path, "rb") as f:
                    head = f.read(4)
                kind = "a pickle" if any(head.startswith(m[:4]) or head[:2] == m[:2] for m in PICKLE_MAGICS) else "not safetensors"
                raise PickleRefusedError(f"{relative} is named .safetensors but its content is {kind}; refusing to load it")
