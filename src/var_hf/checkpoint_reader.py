"""Non-executing reader for PyTorch ``torch.save`` checkpoints (zip format).

Policy (see ``checkpoint_security.md``): a checkpoint is *data*, never code.  This module
therefore never calls ``torch.load``, never uses :mod:`pickle` to unpickle, never imports
or looks up a name found in a checkpoint, and never evaluates strings.  Instead it

1. detects the container by magic bytes (:func:`detect_format`),
2. parses the zip strictly (end-of-central-directory, central directory via :mod:`zipfile`,
   every local header, data descriptors, CRC-32, exact layout without gaps or overlaps),
3. runs a small, explicit pickle interpreter (:class:`_PickleMachine`) that understands only
   the opcodes that ``torch.save`` / the default pickler emit for state dicts, and maps an
   *exact* allow-list of global names to our own inert Python functions, and
4. builds tensors itself with :func:`torch.frombuffer` / :func:`torch.as_strided` from
   copies of the zip member bytes, after bounds-checking every storage offset, size and
   stride.

Every refusal raises :class:`UnsafeCheckpointError` (or a subclass) whose message names
the file, the pickle member and the byte offset of the offending opcode where relevant.
"""

from __future__ import annotations

import collections
import os
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, NoReturn

import torch

__all__ = [
    "DisallowedGlobalError",
    "MalformedCheckpointError",
    "ResourceLimitError",
    "UnknownObject",
    "UnknownObjectWarning",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "detect_format",
    "load_torch_checkpoint",
]

# ---------------------------------------------------------------------------------------
# Errors and placeholders
# ---------------------------------------------------------------------------------------


class UnsafeCheckpointError(ValueError):
    """Base class of every refusal raised by this module."""


class UnsupportedFormatError(UnsafeCheckpointError):
    """The file is not a PyTorch zip checkpoint (legacy pickle, tar, TorchScript, ...)."""


class MalformedCheckpointError(UnsafeCheckpointError):
    """The container or the pickle stream is corrupt, ambiguous or not what torch writes."""


class DisallowedGlobalError(UnsafeCheckpointError):
    """The pickle references a global that is not on the exact allow-list."""


class ResourceLimitError(UnsafeCheckpointError):
    """A size, count or depth limit was exceeded (checked before allocating)."""


class UnknownObjectWarning(UserWarning):
    """Emitted when ``ignore_unknown_objects=True`` replaces an object by a placeholder."""


@dataclass(frozen=True)
class UnknownObject:
    """Inert stand-in for an object built from a global that is not on the allow-list.

    Only produced with ``ignore_unknown_objects=True``.  The global is never imported,
    looked up or called; its arguments and state are parsed under the same rules and then
    dropped.  ``offset`` is the byte offset in the pickle of the opcode that produced it.
    """

    qualname: str
    offset: int


# ---------------------------------------------------------------------------------------
# Limits (module constants so tests and callers can see them; all checked before allocating)
# ---------------------------------------------------------------------------------------

DEFAULT_MAX_TOTAL_BYTES = 64 * 2**30
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl size
MAX_SMALL_RECORD_BYTES = 128  # version, byteorder, serialization id, ...
MAX_ZIP_ENTRIES = 1_000_016
MAX_OPCODES = 16_000_000
MAX_STACK_ITEMS = 4_000_000
MAX_MARK_DEPTH = 256
MAX_MEMO_ENTRIES = 4_000_000
MAX_GLOBAL_NAME_BYTES = 512
MAX_TENSORS = 1_000_000
MAX_TENSOR_RANK = 32
MAX_NESTING_DEPTH = 64  # containers in the returned object graph
MAX_EXPANDED_NODES = 10_000_000  # graph size counted as a tree (memo-sharing "billion laughs")
MAX_DICT_KEY_DEPTH = 4  # nesting of tuple dict keys
MAX_LOGICAL_EXPANSION = 4  # sum of all tensors' logical bytes <= this * max_total_bytes
INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------

FORMAT_SAFETENSORS = "safetensors"
FORMAT_TORCH_ZIP = "torch_zip"

_SNIFF_BYTES = 512
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP_EMPTY_MAGIC = b"PK\x05\x06"
_TAR_MAGIC_OFFSET = 257
_TAR_MAGIC = b"ustar"
# A legacy (< 1.6) torch file starts with a pickle of this magic number (LONG1, 10 bytes).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_PICKLE_PROTO_OPCODE = 0x80
# Opcodes a protocol 0/1 pickle can start with (used with "last byte is STOP").
_PROTOCOL0_FIRST_BYTES = frozenset(b"(}]).cNILSVFKXJMGUTip")
_SAFETENSORS_MAX_HEADER = 100_000_000
_SAFETENSORS_LEN_BYTES = 8
_WRAPPER_MAGICS = (
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"\x1f\x8b", "gzip stream"),
    (b"BZh", "bzip2 stream"),
    (b"\xfd7zXZ\x00", "xz stream"),
    (b"\x28\xb5\x2f\xfd", "zstd stream"),
    (b"Rar!\x1a\x07", "rar archive"),
)
_RESAVE_HINT = (
    "re-save it with a current torch in a trusted environment "
    "(torch.save(obj, path) writes the zip format) or obtain a safetensors file"
)


def detect_format(path: str | os.PathLike) -> str:
    """Return ``"safetensors"`` or ``"torch_zip"`` from the file's magic bytes.

    The extension is ignored.  Every other container -- legacy raw/stacked pickles, tar
    (including torch's pre-1.6 tar format), TorchScript zips, 7z/gzip/bz2/xz/zstd wrappers,
    empty zips, unknown data -- raises :class:`UnsupportedFormatError`.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
        handle.seek(max(size - 1, 0))
        last = handle.read(1)

    if head.startswith(_ZIP_LOCAL_MAGIC):
        _refuse_torchscript(path)
        return FORMAT_TORCH_ZIP
    if head.startswith(_ZIP_EMPTY_MAGIC):
        raise UnsupportedFormatError(f"{path}: empty zip archive, not a torch checkpoint")
    if _looks_like_safetensors(head, size):
        return FORMAT_SAFETENSORS
    for magic, what in _WRAPPER_MAGICS:
        if head.startswith(magic):
            raise UnsupportedFormatError(
                f"{path}: {what}; compressed/wrapped checkpoints are refused, unpack it "
                "yourself and pass the torch zip file"
            )
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + len(_TAR_MAGIC)] == _TAR_MAGIC:
        raise UnsupportedFormatError(
            f"{path}: tar archive (this includes torch's legacy tar checkpoint format); "
            f"refused, {_RESAVE_HINT}"
        )
    if head.startswith(_LEGACY_TORCH_MAGIC):
        raise UnsupportedFormatError(
            f"{path}: legacy torch serialization (stacked raw pickles, torch < 1.6 or "
            f"_use_new_zipfile_serialization=False); refused, {_RESAVE_HINT}"
        )
    if head[:1] == bytes([_PICKLE_PROTO_OPCODE]):
        raise UnsupportedFormatError(f"{path}: raw pickle file; refused, {_RESAVE_HINT}")
    if head[:1] and head[0] in _PROTOCOL0_FIRST_BYTES and last == b".":
        raise UnsupportedFormatError(
            f"{path}: looks like a raw protocol 0/1 pickle; refused, {_RESAVE_HINT}"
        )
    raise UnsupportedFormatError(f"{path}: unrecognised file format (first bytes {head[:8]!r})")


def _looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """8-byte little-endian header length within limits and file, then a JSON object."""
    if len(head) <= _SAFETENSORS_LEN_BYTES:
        return False
    (header_len,) = struct.unpack("<Q", head[:_SAFETENSORS_LEN_BYTES])
    return (
        2 <= header_len <= _SAFETENSORS_MAX_HEADER
        and _SAFETENSORS_LEN_BYTES + header_len <= file_size
        and head[_SAFETENSORS_LEN_BYTES : _SAFETENSORS_LEN_BYTES + 1] == b"{"
    )


# What zipfile raises for corrupt central directories (NotImplementedError: "zip file version").
_ZIPFILE_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError)


def _refuse_torchscript(path: str) -> None:
    """Refuse TorchScript archives (``code/``, ``constants.pkl``) and unreadable zips."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except _ZIPFILE_ERRORS as exc:
        raise MalformedCheckpointError(f"{path}: corrupt zip archive: {exc}") from None
    for name in names:
        rel = name.split("/", 1)[1] if "/" in name else name
        if _is_torchscript_member(rel):
            raise UnsupportedFormatError(
                f"{path}: TorchScript archive (member {name!r}); TorchScript contains code "
                "and is refused"
            )


_TORCHSCRIPT_FILES = frozenset({"constants.pkl", "attributes.pkl", ".data/version"})
_TORCHSCRIPT_DIRS = ("code/", "constants/", "extra/", ".data/ts_code/")


def _is_torchscript_member(rel: str) -> bool:
    return rel in _TORCHSCRIPT_FILES or rel.startswith(_TORCHSCRIPT_DIRS)

# ---------------------------------------------------------------------------------------
# Strict zip layer
# ---------------------------------------------------------------------------------------

_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_EOCD_BODY_SIZE = _ZIP64_EOCD.size - 12  # "size of zip64 EOCD record" field value
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_SIG = b"PK\x03\x04"
_DATA_DESCRIPTOR_SIG = b"PK\x07\x08"
_MAX_DATA_DESCRIPTOR_BYTES = 24  # signature + CRC + two 64-bit sizes
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF

_FLAG_ENCRYPTED = 0x0001
_FLAG_DATA_DESCRIPTOR = 0x0008
_FLAG_UTF8 = 0x0800
_ALLOWED_ZIP_FLAGS = _FLAG_DATA_DESCRIPTOR | _FLAG_UTF8

_PICKLE_RECORD = "data.pkl"
_VERSION_RECORD = "version"
_BYTEORDER_RECORD = "byteorder"
_REQUIRED_RECORDS = (_PICKLE_RECORD, _VERSION_RECORD)
# Fixed member names (relative to the top-level folder) and their size caps.
_FIXED_RECORD_CAPS = {
    _PICKLE_RECORD: MAX_PICKLE_BYTES,
    _VERSION_RECORD: MAX_SMALL_RECORD_BYTES,
    _BYTEORDER_RECORD: MAX_SMALL_RECORD_BYTES,
    ".data/serialization_id": MAX_SMALL_RECORD_BYTES,
    ".format_version": MAX_SMALL_RECORD_BYTES,
    ".storage_alignment": MAX_SMALL_RECORD_BYTES,
}
_STORAGE_KEY_RE = re.compile(r"[0-9]{1,20}\Z")
_STORAGE_MEMBER_PREFIX = "data/"
_SMALL_INT_RECORD_RE = re.compile(rb"[0-9]{1,8}\n?\Z")
_SERIALIZATION_ID_RE = re.compile(rb"[0-9A-Za-z_-]{0,128}\Z")
_VALID_BYTEORDERS = (b"little", b"big")


@dataclass(frozen=True)
class _ZipMember:
    """A validated STORED zip entry: where its bytes are and what their CRC must be."""

    name: str
    rel: str
    data_offset: int
    size: int
    crc: int


class _TorchZip:
    """A strictly validated torch zip archive; members are read by our own code."""

    def __init__(self, path: str, handle: BinaryIO, prefix: str, members: dict[str, _ZipMember]):
        self.path = path
        self.prefix = prefix
        self.members = members
        self._handle = handle

    @classmethod
    def open(cls, path: str, max_total_bytes: int) -> "_TorchZip":
        handle = open(path, "rb")
        try:
            prefix, members = _validate_zip(path, handle, max_total_bytes)
        except BaseException:
            handle.close()
            raise
        return cls(path, handle, prefix, members)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "_TorchZip":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def storage_keys(self) -> set[str]:
        return {rel[len(_STORAGE_MEMBER_PREFIX) :] for rel in self.members if _is_storage_rel(rel)}

    def read(self, rel: str) -> bytearray:
        """Return a private, CRC-verified copy of member ``rel``."""
        member = self.members[rel]
        buf = bytearray(member.size)
        self._handle.seek(member.data_offset)
        if self._handle.readinto(buf) != member.size:
            raise MalformedCheckpointError(f"{self.path}: {member.name}: truncated member data")
        if zlib.crc32(buf) != member.crc:
            hint = " (saved with torch's compute_crc32=False?)" if member.crc == 0 else ""
            raise MalformedCheckpointError(f"{self.path}: {member.name}: CRC-32 mismatch{hint}")
        return buf


def _is_storage_rel(rel: str) -> bool:
    return rel.startswith(_STORAGE_MEMBER_PREFIX) and bool(
        _STORAGE_KEY_RE.match(rel[len(_STORAGE_MEMBER_PREFIX) :])
    )


def _validate_zip(path: str, handle: BinaryIO, max_total_bytes: int) -> tuple[str, dict[str, _ZipMember]]:
    """Check the whole archive; return the top-level folder and the members by relative name."""
    file_size = os.fstat(handle.fileno()).st_size
    cd_offset, entry_count = _read_end_of_central_directory(path, handle, file_size)
    if entry_count > MAX_ZIP_ENTRIES:
        raise ResourceLimitError(f"{path}: {entry_count} zip entries exceed {MAX_ZIP_ENTRIES}")
    try:
        handle.seek(0)
        infos = zipfile.ZipFile(handle).infolist()
    except _ZIPFILE_ERRORS as exc:
        raise MalformedCheckpointError(f"{path}: corrupt zip archive: {exc}") from None
    if len(infos) != entry_count:
        raise MalformedCheckpointError(
            f"{path}: central directory lists {len(infos)} entries, end record says {entry_count}"
        )
    prefix, rel_names = _validate_central_entries(path, infos, max_total_bytes)
    offsets = _validate_local_layout(path, handle, infos, cd_offset)
    members = {
        rel: _ZipMember(info.orig_filename, rel, offsets[id(info)], info.file_size, info.CRC)
        for rel, info in zip(rel_names, infos)
    }
    return prefix, members


def _read_end_of_central_directory(path: str, handle: BinaryIO, file_size: int) -> tuple[int, int]:
    """Parse the EOCD (and zip64 EOCD) that must end the file; return (cd offset, entries).

    No archive comment and no trailing bytes are allowed, and the central directory must end
    exactly where the (zip64) end record starts, so nothing can be prepended or hidden.
    """
    if file_size < _EOCD.size:
        raise MalformedCheckpointError(f"{path}: too small to be a zip archive")
    eocd_pos = file_size - _EOCD.size
    handle.seek(eocd_pos)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = _EOCD.unpack(
        handle.read(_EOCD.size)
    )
    if sig != _EOCD_SIG or comment_len:
        raise MalformedCheckpointError(
            f"{path}: the file does not end with a comment-less end-of-central-directory "
            "record (trailing data, comment or truncation)"
        )
    if disk or cd_disk or n_disk != n_total:
        raise MalformedCheckpointError(f"{path}: multi-disk zip archives are refused")
    cd_end = eocd_pos
    zip64 = _read_zip64_end(path, handle, eocd_pos)
    if zip64 is not None:
        z64_pos, z64_total, z64_cd_size, z64_cd_offset = zip64
        for narrow, wide, sentinel in (
            (n_total, z64_total, _U16_MAX),
            (cd_size, z64_cd_size, _U32_MAX),
            (cd_offset, z64_cd_offset, _U32_MAX),
        ):
            if narrow not in (wide, sentinel):
                raise MalformedCheckpointError(f"{path}: zip64 and classic end records disagree")
        n_total, cd_size, cd_offset, cd_end = z64_total, z64_cd_size, z64_cd_offset, z64_pos
    elif _U32_MAX in (cd_size, cd_offset) or n_total == _U16_MAX:
        raise MalformedCheckpointError(f"{path}: zip64 values without a zip64 end record")
    if cd_offset + cd_size != cd_end:
        raise MalformedCheckpointError(
            f"{path}: central directory [{cd_offset}, {cd_offset + cd_size}) does not end at "
            f"the end record ({cd_end}); prepended, appended or overlapping data"
        )
    return cd_offset, n_total


def _read_zip64_end(path: str, handle: BinaryIO, eocd_pos: int) -> tuple[int, int, int, int] | None:
    """Return (record position, entries, cd size, cd offset) of a zip64 end record, if any."""
    locator_pos = eocd_pos - _ZIP64_LOCATOR.size
    if locator_pos < 0:
        return None
    handle.seek(locator_pos)
    sig, z64_disk, z64_pos, disks = _ZIP64_LOCATOR.unpack(handle.read(_ZIP64_LOCATOR.size))
    if sig != _ZIP64_LOCATOR_SIG:
        return None
    if z64_disk != 0 or disks != 1 or z64_pos + _ZIP64_EOCD.size != locator_pos:
        raise MalformedCheckpointError(f"{path}: malformed zip64 end-of-central-directory locator")
    handle.seek(z64_pos)
    fields = _ZIP64_EOCD.unpack(handle.read(_ZIP64_EOCD.size))
    sig, body_size, _made_by, _needed, disk, cd_disk, n_disk, n_total, cd_size, cd_offset = fields
    if sig != _ZIP64_EOCD_SIG or body_size != _ZIP64_EOCD_BODY_SIZE:
        raise MalformedCheckpointError(f"{path}: malformed zip64 end-of-central-directory record")
    if disk or cd_disk or n_disk != n_total:
        raise MalformedCheckpointError(f"{path}: multi-disk zip archives are refused")
    return z64_pos, n_total, cd_size, cd_offset


def _validate_central_entries(
    path: str, infos: list[zipfile.ZipInfo], max_total_bytes: int
) -> tuple[str, list[str]]:
    """Names, flags, methods and sizes of every central-directory entry."""
    prefix: str | None = None
    seen: set[str] = set()
    rel_names: list[str] = []
    storage_bytes = 0
    for info in infos:
        name = info.orig_filename
        top, rel = _split_member_name(path, name)
        if prefix is None:
            prefix = top
        elif top != prefix:
            raise MalformedCheckpointError(
                f"{path}: more than one top-level folder ({prefix!r}, {top!r})"
            )
        if rel in seen:
            raise MalformedCheckpointError(f"{path}: duplicate member name {name!r}")
        seen.add(rel)
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise MalformedCheckpointError(f"{path}: {name}: encrypted zip member")
        if info.flag_bits & ~_ALLOWED_ZIP_FLAGS:
            raise MalformedCheckpointError(
                f"{path}: {name}: unexpected zip flag bits {info.flag_bits:#06x}"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise MalformedCheckpointError(
                f"{path}: {name}: compressed member (method {info.compress_type}); torch "
                "writes STORED members only"
            )
        if info.compress_size != info.file_size or info.volume != 0:
            raise MalformedCheckpointError(f"{path}: {name}: inconsistent sizes or disk number")
        cap = _member_size_cap(path, name, rel, max_total_bytes)
        if info.file_size > cap:
            raise ResourceLimitError(
                f"{path}: {name}: declared size {info.file_size} exceeds the limit {cap}"
            )
        if _is_storage_rel(rel):
            storage_bytes += info.file_size
            if storage_bytes > max_total_bytes:
                raise ResourceLimitError(
                    f"{path}: total storage bytes exceed max_total_bytes={max_total_bytes}"
                )
        rel_names.append(rel)
    missing = [rel for rel in _REQUIRED_RECORDS if rel not in seen]
    if prefix is None or missing:
        raise MalformedCheckpointError(f"{path}: not a torch checkpoint, missing {missing}")
    return prefix, rel_names


def _split_member_name(path: str, name: str) -> tuple[str, str]:
    """Split ``<top>/<rel>``; refuse absolute, ``..``, backslash, empty or odd names."""
    bad_char = any(ord(c) < 0x20 or c in "\\:\x7f" for c in name)
    parts = name.split("/")
    if bad_char or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        raise MalformedCheckpointError(
            f"{path}: unsafe or unexpected member name {name!r} (absolute, '..', backslash, "
            "control characters, or not inside one top-level folder)"
        )
    return parts[0], "/".join(parts[1:])


def _member_size_cap(path: str, name: str, rel: str, max_total_bytes: int) -> int:
    if rel in _FIXED_RECORD_CAPS:
        return _FIXED_RECORD_CAPS[rel]
    if _is_storage_rel(rel):
        return max_total_bytes
    if _is_torchscript_member(rel):
        raise UnsupportedFormatError(f"{path}: TorchScript member {name!r}; refused")
    raise MalformedCheckpointError(f"{path}: unexpected member {name!r}")


def _validate_local_layout(
    path: str, handle: BinaryIO, infos: list[zipfile.ZipInfo], cd_offset: int
) -> dict[int, int]:
    """Check every local header and that entries tile [0, cd_offset) exactly.

    Returns ``id(info) -> offset of the member's data``.
    """
    ordered = sorted(infos, key=lambda info: info.header_offset)
    data_offsets: dict[int, int] = {}
    expected = 0
    for index, info in enumerate(ordered):
        if info.header_offset != expected:
            raise MalformedCheckpointError(
                f"{path}: {info.orig_filename}: local header at {info.header_offset}, expected "
                f"{expected} (gap, overlap or prepended data)"
            )
        next_offset = ordered[index + 1].header_offset if index + 1 < len(ordered) else cd_offset
        data_offsets[id(info)] = _check_local_header(path, handle, info, next_offset)
        expected = next_offset
    if expected != cd_offset:
        raise MalformedCheckpointError(f"{path}: data does not end at the central directory")
    return data_offsets


def _check_local_header(path: str, handle: BinaryIO, info: zipfile.ZipInfo, next_offset: int) -> int:
    """Validate one local header + data (+ descriptor) spanning [header_offset, next_offset)."""
    name = info.orig_filename
    handle.seek(info.header_offset)
    raw = handle.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise MalformedCheckpointError(f"{path}: {name}: truncated local header")
    sig, _ver, flags, method, _t, _d, crc, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if sig != _LOCAL_HEADER_SIG:
        raise MalformedCheckpointError(f"{path}: {name}: bad local header signature")
    if flags != info.flag_bits or method != info.compress_type:
        raise MalformedCheckpointError(f"{path}: {name}: local and central headers disagree")
    raw_name = handle.read(name_len)
    encoding = "utf-8" if flags & _FLAG_UTF8 else "cp437"
    try:
        local_name = raw_name.decode(encoding)
    except UnicodeDecodeError:
        local_name = None
    if local_name != name:
        raise MalformedCheckpointError(
            f"{path}: local file name {raw_name!r} differs from central name {name!r}"
        )
    data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    data_end = data_offset + info.file_size
    if data_end > next_offset:
        raise MalformedCheckpointError(f"{path}: {name}: member data overlaps the next record")
    if flags & _FLAG_DATA_DESCRIPTOR:
        if (crc, csize, usize) != (0, 0, 0) and not _local_values_match(info, crc, csize, usize):
            raise MalformedCheckpointError(f"{path}: {name}: local header sizes/CRC disagree")
        if next_offset - data_end > _MAX_DATA_DESCRIPTOR_BYTES:
            raise MalformedCheckpointError(f"{path}: {name}: unexpected bytes after member data")
        handle.seek(data_end)
        descriptor = handle.read(next_offset - data_end)
        if descriptor not in _valid_descriptors(info):
            raise MalformedCheckpointError(f"{path}: {name}: bad or lying data descriptor")
    else:
        if not _local_values_match(info, crc, csize, usize):
            raise MalformedCheckpointError(f"{path}: {name}: local header sizes/CRC disagree")
        if data_end != next_offset:
            raise MalformedCheckpointError(f"{path}: {name}: unexpected bytes after member data")
    return data_offset


def _local_values_match(info: zipfile.ZipInfo, crc: int, csize: int, usize: int) -> bool:
    """Local CRC/sizes equal the central ones (sizes may be the zip64 sentinel for members
    large enough that a writer switches to zip64 extra fields)."""
    zip64_ok = info.file_size >= zipfile.ZIP64_LIMIT
    sizes_ok = all(v == info.file_size or (v == _U32_MAX and zip64_ok) for v in (csize, usize))
    return crc == info.CRC and sizes_ok


def _valid_descriptors(info: zipfile.ZipInfo) -> set[bytes]:
    """All encodings of the data descriptor allowed for this member (with/without
    signature, 32- or 64-bit sizes)."""
    crc, size = info.CRC, info.file_size
    bodies = [struct.pack("<IQQ", crc, size, size)]
    if size < _U32_MAX:
        bodies.append(struct.pack("<III", crc, size, size))
    return {prefix + body for body in bodies for prefix in (b"", _DATA_DESCRIPTOR_SIG)}


# ---------------------------------------------------------------------------------------
# Allow-listed globals: names mapped to our own inert markers, never looked up
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """Marker for an allowed storage class named in a persistent id."""

    qualname: str
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class _AllowedCallable:
    """Marker for an allowed callable; REDUCE dispatches on ``qualname`` to our own code."""

    qualname: str


_ORDERED_DICT = "collections.OrderedDict"
_REBUILD_TENSOR_V2 = "torch._utils._rebuild_tensor_v2"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
_REBUILD_PARAMETER_WITH_STATE = "torch._utils._rebuild_parameter_with_state"

_LEGACY_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _build_allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {}
    for qualname in (_ORDERED_DICT, _REBUILD_TENSOR_V2, _REBUILD_PARAMETER, _REBUILD_PARAMETER_WITH_STATE):
        module, name = qualname.rsplit(".", 1)
        allowed[(module, name)] = _AllowedCallable(qualname)
    for name, dtype in _LEGACY_STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(f"torch.{name}", dtype)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("torch.storage.UntypedStorage", torch.uint8)
    return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()
_ALLOWED_NAMES_TEXT = ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS))
# Unknown globals from these packages usually carry tensor data: never silently dropped.
_NO_PLACEHOLDER_ROOTS = frozenset({"torch", "numpy"})

# ---------------------------------------------------------------------------------------
# Storages and tensors
# ---------------------------------------------------------------------------------------

_PERSISTENT_ID_ARITY = 5
_STORAGE_TYPENAME = "storage"
_LOCATION_RE = re.compile(r"[a-z]{1,16}(:[0-9]{1,6})?\Z")
_BOOL_VALID_BYTES = b"\x00\x01"


@dataclass
class _Storage:
    """One ``data/<key>`` member materialised as a flat tensor (shared by all views)."""

    key: str
    stype: _StorageType
    numel: int
    base: torch.Tensor


class _TensorFactory:
    """Our own implementations of the allowed callables and of ``persistent_load``."""

    def __init__(self, archive: _TorchZip, byteorder: str, max_total_bytes: int):
        self._archive = archive
        self._byteorder = byteorder
        self._max_total_bytes = max_total_bytes
        self._storages: dict[str, _Storage] = {}
        self._handlers: dict[str, Callable[[tuple, str], object]] = {
            _ORDERED_DICT: self._ordered_dict,
            _REBUILD_TENSOR_V2: self._rebuild_tensor_v2,
            _REBUILD_PARAMETER: self._rebuild_parameter,
            _REBUILD_PARAMETER_WITH_STATE: self._rebuild_parameter_with_state,
        }
        self._tensor_count = 0
        self._logical_bytes = 0

    # -- persistent ids -----------------------------------------------------------------

    def persistent_load(self, pid: object, where: str) -> _Storage:
        """Accept only ``('storage', <storage type>, <key:str>, <location:str>, <numel:int>)``."""
        if type(pid) is not tuple or len(pid) != _PERSISTENT_ID_ARITY:
            raise MalformedCheckpointError(f"{where}: persistent id must be a 5-tuple, got {_describe(pid)}")
        typename, stype, key, location, numel = pid
        if typename != _STORAGE_TYPENAME or type(typename) is not str:
            raise MalformedCheckpointError(f"{where}: persistent id kind {_describe(typename)} is not 'storage'")
        if type(stype) is not _StorageType:
            raise MalformedCheckpointError(f"{where}: persistent id storage type is {_describe(stype)}")
        if type(key) is not str or not _STORAGE_KEY_RE.match(key):
            raise MalformedCheckpointError(f"{where}: bad storage key {_describe(key)}")
        if type(location) is not str or not _LOCATION_RE.match(location):
            raise MalformedCheckpointError(f"{where}: bad storage location {_describe(location)}")
        if type(numel) is not int or not 0 <= numel <= INT64_MAX:
            raise MalformedCheckpointError(f"{where}: bad storage numel {_describe(numel)}")
        known = self._storages.get(key)
        if known is not None:
            if known.stype != stype or known.numel != numel:
                raise MalformedCheckpointError(
                    f"{where}: storage {key!r} referenced with different type or size"
                )
            return known
        storage = self._load_storage(key, stype, numel, where)
        self._storages[key] = storage
        return storage

    def _load_storage(self, key: str, stype: _StorageType, numel: int, where: str) -> _Storage:
        rel = _STORAGE_MEMBER_PREFIX + key
        member = self._archive.members.get(rel)
        if member is None:
            raise MalformedCheckpointError(f"{where}: storage {key!r} has no member {rel!r}")
        itemsize = stype.itemsize
        if numel * itemsize != member.size:
            raise MalformedCheckpointError(
                f"{where}: storage {key!r}: {numel} x {itemsize} bytes != member size {member.size}"
            )
        buf = self._archive.read(rel)
        if stype.dtype == torch.bool and buf.translate(None, _BOOL_VALID_BYTES):
            raise MalformedCheckpointError(f"{where}: bool storage {key!r} holds bytes other than 0/1")
        return _Storage(key, stype, numel, self._bytes_to_flat_tensor(buf, stype.dtype, itemsize))

    def _bytes_to_flat_tensor(self, buf: bytearray, dtype: torch.dtype, itemsize: int) -> torch.Tensor:
        """Wrap our private copy of the bytes; byteswap if the archive is big-endian."""
        if not buf:
            return torch.empty(0, dtype=dtype)
        if self._byteorder == "big" and itemsize > 1:
            as_bytes = torch.frombuffer(buf, dtype=torch.uint8).view(-1, itemsize)
            return as_bytes.flip(1).contiguous().view(dtype).reshape(-1)
        return torch.frombuffer(buf, dtype=dtype)

    def unused_storage_keys(self) -> set[str]:
        return self._archive.storage_keys() - set(self._storages)

    # -- allowed callables ----------------------------------------------------------------

    def call(self, qualname: str, args: tuple, where: str) -> object:
        return self._handlers[qualname](args, where)

    @staticmethod
    def _ordered_dict(args: tuple, where: str) -> collections.OrderedDict:
        if args != ():
            raise MalformedCheckpointError(f"{where}: OrderedDict must be called without arguments")
        return collections.OrderedDict()

    def _rebuild_tensor_v2(self, args: tuple, where: str) -> torch.Tensor:
        """``(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])``."""
        if len(args) not in (6, 7):
            raise MalformedCheckpointError(f"{where}: _rebuild_tensor_v2 takes 6 or 7 arguments")
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        metadata = args[6] if len(args) == 7 else None
        if type(storage) is not _Storage:
            raise MalformedCheckpointError(f"{where}: tensor storage is {_describe(storage)}")
        _check_shape(size, stride, offset, where)
        if type(requires_grad) is not bool:
            raise MalformedCheckpointError(f"{where}: requires_grad must be a bool")
        _check_empty_hooks(hooks, where)
        if not (metadata is None or (type(metadata) is dict and not metadata)):
            raise MalformedCheckpointError(f"{where}: tensor metadata {_describe(metadata)} is refused")
        numel = _product(size)
        _check_bounds(storage, offset, size, stride, numel, where)
        self._account_tensor(numel * storage.stype.itemsize, where)
        return torch.as_strided(storage.base, size, stride, offset)

    def _rebuild_parameter(self, args: tuple, where: str) -> torch.Tensor:
        if len(args) != 3:
            raise MalformedCheckpointError(f"{where}: _rebuild_parameter takes 3 arguments")
        return self._parameter_data(*args, where=where)

    def _rebuild_parameter_with_state(self, args: tuple, where: str) -> torch.Tensor:
        if len(args) != 4:
            raise MalformedCheckpointError(f"{where}: _rebuild_parameter_with_state takes 4 arguments")
        state = args[3]
        if not _is_empty_state(state):
            raise MalformedCheckpointError(f"{where}: Parameter with non-empty state is refused")
        return self._parameter_data(*args[:3], where=where)

    @staticmethod
    def _parameter_data(data: object, requires_grad: object, hooks: object, *, where: str) -> torch.Tensor:
        """A Parameter is returned as its plain data tensor (requires_grad is dropped)."""
        if type(data) is not torch.Tensor:
            raise MalformedCheckpointError(f"{where}: Parameter wraps {_describe(data)}, not a tensor")
        if type(requires_grad) is not bool:
            raise MalformedCheckpointError(f"{where}: requires_grad must be a bool")
        _check_empty_hooks(hooks, where)
        return data

    def _account_tensor(self, logical_bytes: int, where: str) -> None:
        self._tensor_count += 1
        if self._tensor_count > MAX_TENSORS:
            raise ResourceLimitError(f"{where}: more than {MAX_TENSORS} tensors")
        if logical_bytes > self._max_total_bytes:
            raise ResourceLimitError(
                f"{where}: tensor of {logical_bytes} bytes exceeds max_total_bytes={self._max_total_bytes}"
            )
        self._logical_bytes += logical_bytes
        if self._logical_bytes > MAX_LOGICAL_EXPANSION * self._max_total_bytes:
            raise ResourceLimitError(f"{where}: tensors' total logical size is too large")


def _check_shape(size: object, stride: object, offset: object, where: str) -> None:
    """size/stride: tuples of the same rank of non-negative int64 ints; offset likewise."""
    if type(offset) is not int or not 0 <= offset <= INT64_MAX:
        raise MalformedCheckpointError(f"{where}: bad storage offset {_describe(offset)}")
    for label, dims in (("size", size), ("stride", stride)):
        if type(dims) is not tuple or len(dims) > MAX_TENSOR_RANK:
            raise MalformedCheckpointError(f"{where}: bad tensor {label} {_describe(dims)}")
        if not all(type(d) is int and 0 <= d <= INT64_MAX for d in dims):
            raise MalformedCheckpointError(f"{where}: tensor {label} {dims!r} must be non-negative ints")
    if len(size) != len(stride):  # type: ignore[arg-type]
        raise MalformedCheckpointError(f"{where}: size and stride ranks differ")


def _check_bounds(storage: _Storage, offset: int, size: tuple, stride: tuple, numel: int, where: str) -> None:
    """Every addressed element lies in the storage (Python ints: no overflow)."""
    if numel > INT64_MAX:
        raise MalformedCheckpointError(f"{where}: tensor numel overflows int64")
    if numel == 0:
        last_needed = offset  # empty tensors may point one past the end
        if last_needed > storage.numel:
            raise MalformedCheckpointError(f"{where}: offset {offset} beyond storage of {storage.numel}")
        return
    last_index = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last_index >= storage.numel:
        raise MalformedCheckpointError(
            f"{where}: tensor (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last_index} of a storage with {storage.numel} elements"
        )


def _check_empty_hooks(hooks: object, where: str) -> None:
    if type(hooks) not in (dict, collections.OrderedDict) or hooks:
        raise MalformedCheckpointError(f"{where}: backward_hooks must be an empty OrderedDict")


def _is_empty_state(state: object) -> bool:
    if state is None or (type(state) is dict and not state):
        return True
    return type(state) is tuple and all(_is_empty_state(s) and type(s) is not tuple for s in state)


def _product(dims: tuple) -> int:
    result = 1
    for d in dims:
        result *= d
    return result


def _describe(obj: object) -> str:
    text = repr(obj) if type(obj) in (str, int, float, bool, type(None)) else type(obj).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------
# The pickle interpreter
# ---------------------------------------------------------------------------------------

_MIN_PROTOCOL = 2
_MAX_PROTOCOL = 5
_DICT_TYPES = (dict, collections.OrderedDict)
_KEY_SCALAR_TYPES = (str, int, float, bool, type(None), bytes)
# Refused opcodes we can name in messages (anything not in the dispatch table is refused).
_REFUSED_OPCODE_NAMES = {
    b"i": "INST", b"o": "OBJ", b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX", b"\x82": "EXT1",
    b"\x83": "EXT2", b"\x84": "EXT4", b"P": "PERSID", b"2": "DUP", b"\x8b": "LONG4",
    b"g": "GET", b"p": "PUT", b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"S": "STRING",
    b"T": "BINSTRING", b"U": "SHORT_BINSTRING", b"V": "UNICODE", b"d": "DICT", b"l": "LIST",
    b"0": "POP", b"1": "POP_MARK", b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS",
    b"\x91": "FROZENSET", b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
}


class _PickleMachine:
    """A minimal pickle VM for protocols 2-5 that only builds inert, allow-listed data.

    It never imports or looks up anything: GLOBAL/STACK_GLOBAL map exact names to markers
    (:data:`_ALLOWED_GLOBALS`), REDUCE dispatches markers to :class:`_TensorFactory`, and
    BINPERSID resolves storages from the already validated zip members.
    """

    def __init__(self, data: bytes, label: str, factory: _TensorFactory, ignore_unknown_objects: bool):
        if len(data) > MAX_PICKLE_BYTES:
            raise ResourceLimitError(f"{label}: pickle larger than {MAX_PICKLE_BYTES} bytes")
        self._data = data
        self._label = label
        self._factory = factory
        self._ignore_unknown = ignore_unknown_objects
        self._pos = 0
        self._op_offset = 0
        self._frame_end: int | None = None
        self._limit = len(data)
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._warned: set[str] = set()
        self._absorb_budget = MAX_EXPANDED_NODES  # nodes scanned for tensors in placeholder payloads
        self._dispatch: dict[int, Callable[[], None]] = self._build_dispatch()

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> Any:
        self._expect_proto()
        for _ in range(MAX_OPCODES):
            self._begin_opcode()
            code = self._take(1)[0]
            if code == _STOP:
                return self._stop()
            handler = self._dispatch.get(code)
            if handler is None:
                name = _REFUSED_OPCODE_NAMES.get(bytes([code]), "unknown opcode")
                self._fail(MalformedCheckpointError, f"{name} ({bytes([code])!r}) is not allowed")
            handler()
        raise ResourceLimitError(f"{self._where()}: more than {MAX_OPCODES} opcodes")

    def _where(self, offset: int | None = None) -> str:
        return f"{self._label}@{self._op_offset if offset is None else offset}"

    def _fail(self, error: type[UnsafeCheckpointError], message: str) -> NoReturn:
        raise error(f"{self._where()}: {message}")

    def _expect_proto(self) -> None:
        self._begin_opcode()
        if self._data[:1] != bytes([_PICKLE_PROTO_OPCODE]):
            self._fail(MalformedCheckpointError, "pickle must start with PROTO 2-5 (protocol 0/1 refused)")
        self._take(1)
        protocol = self._take(1)[0]
        if not _MIN_PROTOCOL <= protocol <= _MAX_PROTOCOL:
            self._fail(MalformedCheckpointError, f"unsupported pickle protocol {protocol}")

    def _stop(self) -> Any:
        result = self._pop()
        if self._stack or self._metastack:
            self._fail(MalformedCheckpointError, "items left on the stack at STOP")
        if self._pos != len(self._data):
            self._fail(
                MalformedCheckpointError,
                f"{len(self._data) - self._pos} trailing bytes after STOP (stacked pickles refused)",
            )
        return result

    # -- byte access and framing ------------------------------------------------------------

    def _begin_opcode(self) -> None:
        """Close a finished frame; an opcode and its argument must fit inside one frame."""
        if self._frame_end is not None and self._pos == self._frame_end:
            self._frame_end = None
        self._limit = len(self._data) if self._frame_end is None else self._frame_end
        self._op_offset = self._pos

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > self._limit:
            if end <= len(self._data):
                self._fail(MalformedCheckpointError, "opcode straddles a FRAME boundary")
            self._fail(MalformedCheckpointError, f"truncated pickle (needs {n} bytes at {self._pos})")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def _take_struct(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))[0]

    def _op_frame(self) -> None:
        length = self._take_struct("<Q")
        if self._frame_end is not None:
            self._fail(MalformedCheckpointError, "FRAME inside an unfinished frame")
        if length == 0 or self._pos + length > len(self._data):
            self._fail(MalformedCheckpointError, f"FRAME length {length} disagrees with the stream")
        self._frame_end = self._pos + length

    # -- stack helpers ----------------------------------------------------------------------

    def _push(self, value: Any) -> None:
        if len(self._stack) >= MAX_STACK_ITEMS:
            self._fail(ResourceLimitError, f"more than {MAX_STACK_ITEMS} stack items")
        self._stack.append(value)

    def _pop(self) -> Any:
        if not self._stack:
            self._fail(MalformedCheckpointError, "stack underflow")
        return self._stack.pop()

    def _top(self) -> Any:
        if not self._stack:
            self._fail(MalformedCheckpointError, "stack underflow")
        return self._stack[-1]

    def _op_mark(self) -> None:
        if len(self._metastack) >= MAX_MARK_DEPTH:
            self._fail(ResourceLimitError, f"MARK nesting deeper than {MAX_MARK_DEPTH}")
        self._metastack.append(self._stack)
        self._stack = []

    def _pop_mark(self) -> list[Any]:
        if not self._metastack:
            self._fail(MalformedCheckpointError, "no MARK on the stack")
        items = self._stack
        self._stack = self._metastack.pop()
        return items

    # -- scalars ----------------------------------------------------------------------------

    def _op_binint(self) -> None:
        self._push(self._take_struct("<i"))

    def _op_binint1(self) -> None:
        self._push(self._take(1)[0])

    def _op_binint2(self) -> None:
        self._push(self._take_struct("<H"))

    def _op_long1(self) -> None:
        length = self._take(1)[0]
        self._push(int.from_bytes(self._take(length), "little", signed=True))

    def _op_binfloat(self) -> None:
        self._push(self._take_struct(">d"))

    def _push_text(self, length_fmt: str) -> None:
        raw = self._take_sized(length_fmt)
        try:
            self._push(raw.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self._fail(MalformedCheckpointError, "invalid UTF-8 in string")

    def _take_sized(self, length_fmt: str) -> bytes:
        """Read a length prefix, then the payload (``_take`` checks before slicing)."""
        return self._take(self._take_struct(length_fmt))

    def _op_none(self) -> None:
        self._push(None)

    def _op_true(self) -> None:
        self._push(True)

    def _op_false(self) -> None:
        self._push(False)

    # -- containers -------------------------------------------------------------------------

    def _op_empty_dict(self) -> None:
        self._push({})

    def _op_empty_list(self) -> None:
        self._push([])

    def _op_empty_tuple(self) -> None:
        self._push(())

    def _op_tuple(self) -> None:
        self._push(tuple(self._pop_mark()))

    def _make_tuple_n(self, n: int) -> Callable[[], None]:
        def handler() -> None:
            if len(self._stack) < n:
                self._fail(MalformedCheckpointError, "stack underflow")
            items = tuple(self._stack[len(self._stack) - n :])
            del self._stack[len(self._stack) - n :]
            self._push(items)

        return handler

    def _op_append(self) -> None:
        value = self._pop()
        self._extend(self._top(), [value])

    def _op_appends(self) -> None:
        items = self._pop_mark()
        self._extend(self._top(), items)

    def _extend(self, target: Any, items: list[Any]) -> None:
        if type(target) is UnknownObject:
            self._absorb(target, items)
        elif type(target) is list:
            target.extend(items)
        else:
            self._fail(MalformedCheckpointError, f"APPEND to {_describe(target)} is not allowed")

    def _op_setitem(self) -> None:
        value = self._pop()
        key = self._pop()
        self._set_items(self._top(), [key, value])

    def _op_setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self._fail(MalformedCheckpointError, "SETITEMS with an odd number of items")
        self._set_items(self._top(), items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if type(target) is UnknownObject:
            self._absorb(target, items)
            return
        if type(target) not in _DICT_TYPES:
            self._fail(MalformedCheckpointError, f"SETITEM on {_describe(target)} is not allowed")
        for i in range(0, len(items), 2):
            key = items[i]
            if not _is_valid_key(key, MAX_DICT_KEY_DEPTH):
                self._fail(MalformedCheckpointError, f"dict key {_describe(key)} is not allowed")
            if key in target:
                self._fail(MalformedCheckpointError, f"duplicate dict key {key!r}")
            target[key] = items[i + 1]

    # -- memo -------------------------------------------------------------------------------

    def _op_binput(self) -> None:
        self._memo_put(self._take(1)[0])

    def _op_long_binput(self) -> None:
        self._memo_put(self._take_struct("<I"))

    def _op_memoize(self) -> None:
        self._memo_put(len(self._memo))

    def _memo_put(self, index: int) -> None:
        if index in self._memo:
            self._fail(MalformedCheckpointError, f"memo slot {index} written twice")
        if len(self._memo) >= MAX_MEMO_ENTRIES:
            self._fail(ResourceLimitError, f"more than {MAX_MEMO_ENTRIES} memo entries")
        self._memo[index] = self._top()

    def _op_binget(self) -> None:
        self._memo_get(self._take(1)[0])

    def _op_long_binget(self) -> None:
        self._memo_get(self._take_struct("<I"))

    def _memo_get(self, index: int) -> None:
        if index not in self._memo:
            self._fail(MalformedCheckpointError, f"memo slot {index} is empty")
        self._push(self._memo[index])

    # -- globals, calls, persistent ids -----------------------------------------------------

    def _op_global(self) -> None:
        module = self._read_line()
        name = self._read_line()
        self._push(self._resolve_global(module, name))

    def _read_line(self) -> str:
        end = self._data.find(b"\n", self._pos, min(self._limit, self._pos + MAX_GLOBAL_NAME_BYTES + 1))
        if end < 0:
            self._fail(MalformedCheckpointError, "GLOBAL name is unterminated or too long")
        raw = self._take(end - self._pos)
        self._take(1)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(MalformedCheckpointError, "GLOBAL name is not UTF-8")

    def _op_stack_global(self) -> None:
        name = self._pop()
        module = self._pop()
        if type(module) is not str or type(name) is not str:
            self._fail(MalformedCheckpointError, "STACK_GLOBAL operands must be strings")
        if len(module) + len(name) > MAX_GLOBAL_NAME_BYTES:
            self._fail(MalformedCheckpointError, "STACK_GLOBAL name too long")
        self._push(self._resolve_global(module, name))

    def _resolve_global(self, module: str, name: str) -> object:
        """Exact lookup in the allow-list; never an import or attribute access."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        qualname = f"{module}.{name}"
        if self._ignore_unknown and module.split(".", 1)[0] not in _NO_PLACEHOLDER_ROOTS:
            self._warn_placeholder(qualname)
            return UnknownObject(qualname, self._op_offset)
        self._fail(
            DisallowedGlobalError,
            f"global {qualname!r} is not allowed (allowed: {_ALLOWED_NAMES_TEXT}). Refusing to load.",
        )

    def _warn_placeholder(self, qualname: str) -> None:
        if qualname in self._warned:
            return
        self._warned.add(qualname)
        warnings.warn(
            f"{self._where()}: unknown global {qualname!r} replaced by an inert placeholder "
            "(ignore_unknown_objects=True); it was not imported or called",
            UnknownObjectWarning,
            stacklevel=6,  # the caller of load_torch_checkpoint
        )

    def _op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        if type(args) is not tuple:
            self._fail(MalformedCheckpointError, "REDUCE arguments must be a tuple")
        if type(func) is _AllowedCallable:
            self._push(self._factory.call(func.qualname, args, self._where()))
        elif type(func) is UnknownObject:
            self._push(self._placeholder_call(func, args))
        else:
            self._fail(MalformedCheckpointError, f"REDUCE on {_describe(func)} is not allowed")

    def _op_newobj(self) -> None:
        args = self._pop()
        cls = self._pop()
        self._newobj(cls, (args,))

    def _op_newobj_ex(self) -> None:
        kwargs = self._pop()
        args = self._pop()
        cls = self._pop()
        self._newobj(cls, (args, kwargs))

    def _newobj(self, cls: object, payload: tuple) -> None:
        """NEWOBJ(_EX) is only accepted on placeholders (ignore_unknown_objects=True)."""
        if type(cls) is not UnknownObject:
            self._fail(MalformedCheckpointError, f"NEWOBJ on {_describe(cls)} is not allowed")
        self._push(self._placeholder_call(cls, payload))

    def _placeholder_call(self, func: UnknownObject, payload: object) -> UnknownObject:
        self._absorb(func, payload)
        return UnknownObject(func.qualname, self._op_offset)

    def _absorb(self, target: UnknownObject, payload: object) -> None:
        """Items/state given to a placeholder are parsed, checked for tensors, and dropped."""
        holds_tensors, visited = _holds_tensor_data(payload)
        self._absorb_budget -= visited
        if self._absorb_budget < 0:
            self._fail(ResourceLimitError, "too much data given to unknown objects")
        if holds_tensors:
            self._fail(MalformedCheckpointError, f"tensor data given to unknown {target.qualname!r} cannot be ignored")

    def _op_build(self) -> None:
        state = self._pop()
        target = self._top()
        if type(target) is collections.OrderedDict:
            # torch state dicts carry `_metadata` (module versions) as instance state: dropped.
            if type(state) is not dict or set(state) - {"_metadata"} or not all(
                type(v) in _DICT_TYPES for v in state.values()
            ):
                self._fail(MalformedCheckpointError, "BUILD on OrderedDict accepts only {'_metadata': dict}")
        elif type(target) is UnknownObject:
            self._absorb(target, state)
        else:
            self._fail(MalformedCheckpointError, f"BUILD on {_describe(target)} is not allowed")

    def _op_binpersid(self) -> None:
        pid = self._pop()
        self._push(self._factory.persistent_load(pid, self._where()))

    def _op_proto(self) -> None:
        self._fail(MalformedCheckpointError, "PROTO is only allowed at the start")

    # -- dispatch ---------------------------------------------------------------------------

    def _build_dispatch(self) -> dict[int, Callable[[], None]]:
        table: dict[bytes, Callable[[], None]] = {
            b"\x80": self._op_proto,
            b"\x95": self._op_frame,
            b"(": self._op_mark,
            b"J": self._op_binint,
            b"K": self._op_binint1,
            b"M": self._op_binint2,
            b"\x8a": self._op_long1,
            b"G": self._op_binfloat,
            b"X": lambda: self._push_text("<I"),  # BINUNICODE
            b"\x8c": lambda: self._push_text("<B"),  # SHORT_BINUNICODE
            b"\x8d": lambda: self._push_text("<Q"),  # BINUNICODE8
            b"B": lambda: self._push(self._take_sized("<I")),  # BINBYTES
            b"C": lambda: self._push(self._take_sized("<B")),  # SHORT_BINBYTES
            b"\x8e": lambda: self._push(self._take_sized("<Q")),  # BINBYTES8
            b"N": self._op_none,
            b"\x88": self._op_true,
            b"\x89": self._op_false,
            b"}": self._op_empty_dict,
            b"]": self._op_empty_list,
            b")": self._op_empty_tuple,
            b"t": self._op_tuple,
            b"\x85": self._make_tuple_n(1),
            b"\x86": self._make_tuple_n(2),
            b"\x87": self._make_tuple_n(3),
            b"a": self._op_append,
            b"e": self._op_appends,
            b"s": self._op_setitem,
            b"u": self._op_setitems,
            b"q": self._op_binput,
            b"r": self._op_long_binput,
            b"\x94": self._op_memoize,
            b"h": self._op_binget,
            b"j": self._op_long_binget,
            b"c": self._op_global,
            b"\x93": self._op_stack_global,
            b"R": self._op_reduce,
            b"b": self._op_build,
            b"Q": self._op_binpersid,
        }
        if self._ignore_unknown:  # only ever reach placeholders; see _newobj
            table[b"\x81"] = self._op_newobj
            table[b"\x92"] = self._op_newobj_ex
        return {code[0]: handler for code, handler in table.items()}


_STOP = ord(".")


def _is_valid_key(key: object, depth: int) -> bool:
    """Dict keys: scalars or (shallow) tuples of scalars -- hashing can never fail."""
    if type(key) in _KEY_SCALAR_TYPES:
        return True
    return type(key) is tuple and depth > 0 and all(_is_valid_key(k, depth - 1) for k in key)


def _children(obj: object) -> list:
    if type(obj) in _DICT_TYPES:
        return list(obj.values())  # type: ignore[union-attr]
    if type(obj) in (list, tuple):
        return list(obj)  # type: ignore[call-overload]
    return []


def _holds_tensor_data(root: object) -> tuple[bool, int]:
    """Whether a tensor or storage is reachable from ``root``, and how many nodes were
    visited (iterative, each container once)."""
    seen: set[int] = set()
    pending = [root]
    visited = 0
    while pending:
        obj = pending.pop()
        visited += 1
        if type(obj) in (torch.Tensor, _Storage):
            return True, visited
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        pending.extend(_children(obj))
    return False, visited


# ---------------------------------------------------------------------------------------
# Output validation
# ---------------------------------------------------------------------------------------

_LEAF_TYPES = (str, int, float, bool, type(None), bytes, torch.Tensor, UnknownObject)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple)


def _check_output_graph(root: object, label: str) -> None:
    """Only allowed types, no cycles, bounded depth and bounded size when expanded as a tree."""
    if type(root) not in _DICT_TYPES:
        raise MalformedCheckpointError(f"{label}: top-level object is {_describe(root)}, not a dict")
    expanded: dict[int, int] = {}
    active: set[int] = set()

    def visit(obj: object, depth: int) -> int:
        kind = type(obj)
        if kind in _LEAF_TYPES:
            return 1
        if kind not in _CONTAINER_TYPES:
            raise MalformedCheckpointError(f"{label}: {_describe(obj)} is not allowed in the result")
        key = id(obj)
        if key in expanded:
            return expanded[key]
        if key in active:
            raise MalformedCheckpointError(f"{label}: reference cycle in the object graph")
        if depth > MAX_NESTING_DEPTH:
            raise ResourceLimitError(f"{label}: containers nested deeper than {MAX_NESTING_DEPTH}")
        active.add(key)
        total = 1
        for child in _children(obj):
            total += visit(child, depth + 1)
            if total > MAX_EXPANDED_NODES:
                raise ResourceLimitError(
                    f"{label}: object graph expands to more than {MAX_EXPANDED_NODES} nodes"
                )
        active.discard(key)
        expanded[key] = total
        return total

    visit(root, 0)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def load_torch_checkpoint(
    path: str | os.PathLike,
    *,
    ignore_unknown_objects: bool = False,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> dict:
    """Load a ``torch.save`` zip checkpoint without executing anything from it.

    Returns the object graph (dict/OrderedDict/list/tuple/str/int/float/bool/None/bytes and
    plain ``torch.Tensor``; nested dicts preserved).  Tensors are views of private copies of
    the member bytes; tensors sharing a storage in the file share one here.  Parameters are
    returned as plain tensors, ``requires_grad`` is dropped, and a state dict's ``_metadata``
    is discarded.  With ``ignore_unknown_objects=True`` objects built from globals outside
    the allow-list (e.g. ``argparse.Namespace``) become :class:`UnknownObject` placeholders
    and an :class:`UnknownObjectWarning` is emitted; they are still never imported or called,
    and unknown ``torch``/``numpy`` globals are still refused.

    Raises :class:`UnsafeCheckpointError` (or a subclass) for anything else.
    """
    path = os.fspath(path)
    if type(max_total_bytes) is not int or max_total_bytes < 0:
        raise ValueError("max_total_bytes must be a non-negative int")
    kind = detect_format(path)
    if kind != FORMAT_TORCH_ZIP:
        raise UnsupportedFormatError(f"{path}: {kind} file given to the torch checkpoint reader")
    with _TorchZip.open(path, max_total_bytes) as archive:
        label = f"{path}:{archive.prefix}/{_PICKLE_RECORD}"
        byteorder = _read_byteorder(archive)
        _check_small_records(archive)
        factory = _TensorFactory(archive, byteorder, max_total_bytes)
        pickle_bytes = bytes(archive.read(_PICKLE_RECORD))
        root = _PickleMachine(pickle_bytes, label, factory, ignore_unknown_objects).run()
        unused = factory.unused_storage_keys()
        if unused:
            raise MalformedCheckpointError(f"{path}: storage members never referenced: {sorted(unused)}")
    _check_output_graph(root, label)
    return root


def _read_byteorder(archive: _TorchZip) -> str:
    """``little`` (also when absent, as torch assumes) or ``big``; anything else refused."""
    if _BYTEORDER_RECORD not in archive.members:
        return "little"
    value = bytes(archive.read(_BYTEORDER_RECORD))
    if value not in _VALID_BYTEORDERS:
        raise MalformedCheckpointError(f"{archive.path}: unknown byteorder {value!r}")
    return value.decode("ascii")


def _check_small_records(archive: _TorchZip) -> None:
    """``version``, ``.format_version``, ``.storage_alignment``: small decimal integers."""
    for rel in (_VERSION_RECORD, ".format_version", ".storage_alignment"):
        if rel in archive.members and not _SMALL_INT_RECORD_RE.match(bytes(archive.read(rel))):
            raise MalformedCheckpointError(f"{archive.path}: record {rel!r} is not a small integer")
    serialization_id = ".data/serialization_id"
    if serialization_id in archive.members and not _SERIALIZATION_ID_RE.match(
        bytes(archive.read(serialization_id))
    ):
        raise MalformedCheckpointError(f"{archive.path}: malformed {serialization_id}")
