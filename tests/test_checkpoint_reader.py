"""Tests for :mod:`var_hf.checkpoint_reader`, the non-executing torch checkpoint reader.

Layout (mirrors ``checkpoint_security.md`` section 3):

* golden positives -- files written by ``torch.save`` at test time, compared bit-exactly;
* hostile inputs -- every malicious pickle/zip is *generated here at test time* (opcode
  assembler, a pickler that never calls what it pickles, byte surgery on valid zips); no live
  exploit is stored in the repository.  Payloads target a harmless sentinel file in
  ``tmp_path``; every hostile test asserts the refusal *and* that the sentinel is absent;
* property-based fuzzing of mutated golden files.
"""

from __future__ import annotations

import ast
import bz2
import collections
import gzip
import io
import lzma
import os
import pickle
import pickletools
import shlex
import struct
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from var_hf import checkpoint_reader as cr
from var_hf.checkpoint_reader import (
    DisallowedGlobalError,
    MalformedCheckpointError,
    ResourceLimitError,
    UnknownObject,
    UnknownObjectWarning,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    detect_format,
    load_torch_checkpoint,
)

# =========================================================================================
# Helpers: comparison
# =========================================================================================


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor's values (bit-exact comparison, NaN-safe)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert type(actual) is torch.Tensor
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert tensor_bytes(actual) == tensor_bytes(expected)


def assert_same_tree(actual: object, expected: object) -> None:
    """Recursive equality: same container types and keys, tensors bit-exact."""
    if isinstance(expected, torch.Tensor):
        assert_bit_exact(actual, expected)  # type: ignore[arg-type]
    elif isinstance(expected, dict):
        assert type(actual) is type(expected)
        assert list(actual) == list(expected)  # type: ignore[call-overload]
        for key in expected:
            assert_same_tree(actual[key], expected[key])  # type: ignore[index]
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)  # type: ignore[arg-type]
        for a, e in zip(actual, expected):  # type: ignore[call-overload]
            assert_same_tree(a, e)
    else:
        assert type(actual) is type(expected) and actual == expected


class MyTensor(torch.Tensor):
    """A tensor subclass (torch pickles it with ``_rebuild_from_type_v2``)."""


def save_and_load(tmp_path: Path, obj: object, name: str = "ckpt.pth", **save_kwargs) -> object:
    path = tmp_path / name
    torch.save(obj, path, **save_kwargs)
    return load_torch_checkpoint(path)


# =========================================================================================
# Helpers: generating pickles at test time (never executed)
# =========================================================================================


class Reduce:
    """Pickles as ``func(*args)``; ``func`` is only *named* in the pickle, never called."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class PID:
    """Pickles as a BINPERSID persistent id."""

    def __init__(self, pid):
        self.pid = pid


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, PID) else None


def dumps(obj: object, protocol: int = 2) -> bytes:
    """Serialize with the stdlib pickler (writing a pickle never executes it)."""
    buf = io.BytesIO()
    _PidPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def storage_pid(key: str = "0", stype=torch.FloatStorage, numel: int = 4, location: str = "cpu") -> PID:
    return PID(("storage", stype, key, location, numel))


def rebuild_v2(storage=None, offset=0, size=(4,), stride=(1,), requires_grad=False, hooks=None, *extra) -> Reduce:
    storage = storage_pid() if storage is None else storage
    hooks = collections.OrderedDict() if hooks is None else hooks
    return Reduce(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, requires_grad, hooks, *extra))


FLOATS_0123 = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)


# Raw opcode assembler for what the stdlib pickler cannot express.
def sstr(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def glob(module: str, name: str, form: str = "GLOBAL") -> bytes:
    if form == "GLOBAL":
        return b"c" + f"{module}\n{name}\n".encode()
    return sstr(module) + sstr(name) + b"\x93"  # STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def proto(n: int = 2) -> bytes:
    return b"\x80" + bytes([n])


def in_dict(value: bytes, key: str = "w") -> bytes:
    """``{key: value}`` as opcodes: EMPTY_DICT key value SETITEM."""
    return b"}" + sstr(key) + value + b"s"


def stream(body: bytes, protocol: int = 2) -> bytes:
    return proto(protocol) + body + b"."


# =========================================================================================
# Helpers: zip containers
# =========================================================================================

DEFAULT_RECORDS = {"version": b"3\n", "byteorder": b"little"}


def write_torch_zip(
    path: Path,
    pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    records: dict[str, bytes] | None = None,
    extra: tuple[tuple[str, bytes], ...] = (),
    compress_type: int = zipfile.ZIP_STORED,
) -> Path:
    """A torch-layout zip written with the stdlib zipfile (no data descriptors)."""
    records = DEFAULT_RECORDS if records is None else records
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", pkl, compress_type=compress_type)
        for rel, data in records.items():
            archive.writestr(f"{prefix}/{rel}", data)
        for key, data in (storages or {}).items():
            archive.writestr(f"{prefix}/data/{key}", data, compress_type=compress_type)
        for name, data in extra:
            archive.writestr(name, data)
    return path


def tensor_zip(path: Path, obj: object, storages: dict[str, bytes] | None = None, protocol: int = 2, **kw) -> Path:
    storages = {"0": FLOATS_0123} if storages is None else storages
    return write_torch_zip(path, dumps(obj, protocol), storages, **kw)


_CENTRAL = struct.Struct("<4s6H3I5H2I")  # central directory file header
_LOCAL = struct.Struct("<4s5H3I2H")  # local file header
_CD_FLAGS, _CD_CRC, _CD_CSIZE, _CD_USIZE, _CD_OFFSET = 3, 7, 8, 9, 16
_LH_FLAGS = 2


def central_entries(data: bytes) -> dict[str, int]:
    """name -> position of its central directory header."""
    found, pos = {}, data.find(b"PK\x01\x02")
    while pos >= 0:
        fields = _CENTRAL.unpack_from(data, pos)
        name = data[pos + _CENTRAL.size : pos + _CENTRAL.size + fields[10]].decode()
        found[name] = pos
        pos = data.find(b"PK\x01\x02", pos + 1)
    return found


def patch_central(data: bytes, name: str, **changes: int) -> bytes:
    index = {"flags": _CD_FLAGS, "crc": _CD_CRC, "csize": _CD_CSIZE, "usize": _CD_USIZE, "offset": _CD_OFFSET}
    pos = central_entries(data)[name]
    fields = list(_CENTRAL.unpack_from(data, pos))
    for key, value in changes.items():
        fields[index[key]] = value
    out = bytearray(data)
    _CENTRAL.pack_into(out, pos, *fields)
    return bytes(out)


def local_header_pos(data: bytes, name: str) -> int:
    return _CENTRAL.unpack_from(data, central_entries(data)[name])[_CD_OFFSET]


def patch_local_flags(data: bytes, name: str, flags: int) -> bytes:
    pos = local_header_pos(data, name)
    fields = list(_LOCAL.unpack_from(data, pos))
    fields[_LH_FLAGS] = flags
    out = bytearray(data)
    _LOCAL.pack_into(out, pos, *fields)
    return bytes(out)


def member_data_offset(data: bytes, name: str) -> int:
    pos = local_header_pos(data, name)
    fields = _LOCAL.unpack_from(data, pos)
    return pos + _LOCAL.size + fields[9] + fields[10]


def rename_member_bytes(data: bytes, old: str, new: str, where: str = "both") -> bytes:
    """Rename a member in place (same length) in the local and/or central header."""
    assert len(old) == len(new)
    out = bytearray(data)
    if where in ("both", "central"):
        pos = central_entries(data)[old] + _CENTRAL.size
        out[pos : pos + len(old)] = new.encode()
    if where in ("both", "local"):
        pos = local_header_pos(data, old) + _LOCAL.size
        out[pos : pos + len(old)] = new.encode()
    return bytes(out)


def zip_member_bytes(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


# =========================================================================================
# Fixtures
# =========================================================================================


@pytest.fixture
def sentinel(tmp_path: Path):
    """A file the payloads would create; asserted absent after every hostile test."""
    path = tmp_path / "SENTINEL_payload_ran"
    yield path
    assert not path.exists(), "a checkpoint payload was executed"


def touch_cmd(sentinel: Path) -> str:
    return f"touch {shlex.quote(str(sentinel))}"


@pytest.fixture
def golden_path(tmp_path: Path) -> Path:
    """A small, valid torch.save file (data descriptors, zip64 end record, as torch writes)."""
    path = tmp_path / "golden.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}, path)
    return path


def refused(path: Path, error: type[Exception] = UnsafeCheckpointError, match: str | None = None, **kw):
    with pytest.raises(error, match=match) as info:
        load_torch_checkpoint(path, **kw)
    return info.value


# =========================================================================================
# G. Golden positives
# =========================================================================================


def test_flat_fp32_state_dict(tmp_path):
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(5), "nan": torch.tensor([float("nan"), -0.0, float("inf")])}
    result = save_and_load(tmp_path, sd)
    assert type(result) is dict
    assert_same_tree(result, sd)


def test_ordered_dict_module_state_dict_with_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    sd = model.state_dict()  # OrderedDict with a `_metadata` attribute (BUILD in the pickle)
    result = save_and_load(tmp_path, sd)
    assert type(result) is collections.OrderedDict
    assert_same_tree(result, collections.OrderedDict(sd))


def test_nested_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    var = torch.nn.Linear(4, 3)
    vae = torch.nn.Conv2d(2, 2, 3)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-3)
    var(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = {
        "epoch": 3,
        "iter": 1234,
        "trainer": {
            "var_wo_ddp": var.state_dict(),
            "vae_local": vae.state_dict(),
            "var_opt": {"optim": opt.state_dict(), "scaler": {"scale": 65536.0, "_growth_tracker": 7}},
            "config": {"patch_nums": (1, 2, 3), "depth": 16, "shared_aln": False, "name": None},
        },
        "args": {"lr": 1e-4, "names": ["a", "b"], "neg": -(2**40), "flags": (True, False, None)},
    }
    result = save_and_load(tmp_path, ckpt)
    expected = dict(ckpt)
    expected["trainer"] = dict(ckpt["trainer"])
    expected["trainer"]["var_wo_ddp"] = collections.OrderedDict(var.state_dict())
    expected["trainer"]["vae_local"] = collections.OrderedDict(vae.state_dict())
    assert_same_tree(result, expected)
    assert set(result["trainer"]["var_wo_ddp"]) == {"weight", "bias"}


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
        torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    ],
)
def test_storage_dtypes_bit_exact(tmp_path, dtype):
    if dtype.is_floating_point:
        values = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 1e-3], dtype=dtype)
    elif dtype == torch.bool:
        values = torch.tensor([True, False, True, True, False])
    else:
        info = torch.iinfo(dtype)
        values = torch.tensor([info.min, info.max, 0, 1, 7], dtype=dtype)
    sd = {"v": values, "m": values.repeat(3).reshape(3, -1)}
    assert_same_tree(save_and_load(tmp_path, sd), sd)


def test_shared_storages_and_views(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "base": base,
        "tied": base,
        "row": base[1],
        "col": base[:, 2],
        "transposed": base.t(),
        "window": base.view(-1)[5:17],
        "strided": base[::2, 1::3],
    }
    result = save_and_load(tmp_path, sd)
    for key, expected in sd.items():
        assert_bit_exact(result[key], expected)
        assert result[key].stride() == expected.stride()
        assert result[key].storage_offset() == expected.storage_offset()
    pointers = {t.untyped_storage().data_ptr() for t in result.values()}
    assert len(pointers) == 1, "views of one storage must share one storage"
    result["base"][1, 2] = -1.0  # a private copy: writable, and shared like the original
    assert result["row"][2] == -1.0 and result["col"][1] == -1.0


def test_zero_dim_and_empty_tensors(tmp_path):
    sd = {
        "scalar_f32": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "scalar_i64": torch.tensor(-(2**62)),
        "scalar_bool": torch.tensor(True),
        "empty": torch.empty(0),
        "empty_2d": torch.zeros(0, 3),
        "empty_2d_b": torch.zeros(3, 0, dtype=torch.int64),
    }
    assert_same_tree(save_and_load(tmp_path, sd), sd)


def test_parameters_become_plain_tensors(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    result = save_and_load(tmp_path, {"weight": weight, "frozen": frozen})
    assert_bit_exact(result["weight"], weight.detach())
    assert_bit_exact(result["frozen"], frozen.detach())
    assert not result["weight"].requires_grad


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols(tmp_path, protocol):
    base = torch.randn(5, 3)
    sd = collections.OrderedDict(w=base, v=base[1:], h=torch.randn(4, dtype=torch.float16), n={"x": torch.arange(3)})
    if protocol >= 3:  # protocol 2 has no bytes opcode (it would need _codecs.encode, refused)
        sd["blob"] = b"\x00\xffbytes"
    assert_same_tree(save_and_load(tmp_path, sd, pickle_protocol=protocol), sd)


def test_protocol2_bytes_need_codecs_encode_and_are_refused(tmp_path):
    path = tmp_path / "bytes2.pth"
    torch.save({"blob": b"\x00\x01"}, path, pickle_protocol=2)
    refused(path, DisallowedGlobalError, match="_codecs.encode")


def test_explicit_new_zipfile_serialization_flag(tmp_path):
    sd = {"w": torch.randn(2, 2)}
    assert_same_tree(save_and_load(tmp_path, sd, _use_new_zipfile_serialization=True), sd)


def test_big_endian_archive_is_byteswapped(tmp_path, golden_path):
    """A file declaring byteorder=big with byteswapped storages loads to the same values."""
    members = zip_member_bytes(golden_path)
    prefix = next(iter(members)).split("/")[0]
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    storages = {}
    for name, data in members.items():
        if "/data/" in name:
            storages[name.rsplit("/", 1)[1]] = bytes(b for i in range(0, len(data), 4) for b in data[i : i + 4][::-1])
    path = write_torch_zip(
        tmp_path / "big.pth", members[f"{prefix}/data.pkl"], storages, records={"version": b"3\n", "byteorder": b"big"}
    )
    assert_same_tree(load_torch_checkpoint(path), sd)


def test_archive_written_by_stdlib_zipfile_loads(tmp_path):
    """Positive control for the hand-built archives the hostile tests use."""
    path = tensor_zip(tmp_path / "ok.pth", {"t": rebuild_v2()})
    assert_bit_exact(load_torch_checkpoint(path)["t"], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_path_like_and_detect_format(golden_path):
    assert detect_format(golden_path) == "torch_zip"
    assert detect_format(str(golden_path)) == "torch_zip"
    assert set(load_torch_checkpoint(golden_path)) == {"w", "b"}


def test_nothing_is_unpickled_or_imported(tmp_path, monkeypatch, golden_path):
    """Loading works with every execution path booby-trapped."""

    def trap(*args, **kwargs):
        raise AssertionError("the reader must not call this")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (pickle, "_Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, trap)
    monkeypatch.setattr(torch.serialization, "load", trap)
    import builtins
    import importlib

    # patch objects, not dotted strings: resolving a string would itself go through the trapped import_module
    monkeypatch.setattr(builtins, "eval", trap)
    monkeypatch.setattr(builtins, "exec", trap)
    monkeypatch.setattr(importlib, "import_module", trap)
    assert set(load_torch_checkpoint(golden_path)) == {"w", "b"}


def test_reader_source_has_no_execution_primitives():
    """Static guard: no unpickling, eval, dynamic import or attribute lookup by name."""
    tree = ast.parse(Path(cr.__file__).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    builtins_forbidden = {"eval", "exec", "compile", "__import__", "getattr", "setattr", "globals", "locals", "vars"}
    attributes_forbidden = {"load", "loads", "Unpickler", "import_module", "find_class", "eval", "exec", "__import__"}
    assert not names & (builtins_forbidden | attributes_forbidden)
    assert not attributes & attributes_forbidden
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    allowed_imports = {"__future__", "collections", "dataclasses", "os", "re", "struct", "typing", "torch", "warnings", "zipfile", "zlib"}
    assert imported <= allowed_imports


# =========================================================================================
# D. Format detection and container attacks
# =========================================================================================


def test_detect_safetensors_and_refuse_it_in_the_pickle_reader(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.bin"  # extension deliberately misleading
    save_file({"w": torch.ones(2)}, str(path))
    assert detect_format(path) == "safetensors"
    refused(path, UnsupportedFormatError, match="safetensors")


def test_legacy_torch_format_refused_with_resave_hint(tmp_path, sentinel):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedFormatError, match="legacy torch serialization.*re-save"):
        detect_format(path)
    refused(path, UnsupportedFormatError, match="re-save")


@pytest.mark.parametrize("protocol", range(6))
def test_raw_pickle_files_refused(tmp_path, sentinel, protocol):
    path = tmp_path / "raw.pkl"
    path.write_bytes(dumps({"w": Reduce(os.system, (touch_cmd(sentinel),))}, protocol))
    refused(path, UnsupportedFormatError, match="pickle")


def _tar_of(inner: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(inner, arcname="ckpt.pth")
    return buf.getvalue()


@pytest.mark.parametrize("wrapper", ["gzip", "bz2", "xz", "tar", "7z", "zstd"])
def test_wrapped_containers_refused(tmp_path, golden_path, wrapper):
    raw = golden_path.read_bytes()
    wrapped = {
        "gzip": lambda: gzip.compress(raw),
        "bz2": lambda: bz2.compress(raw),
        "xz": lambda: lzma.compress(raw),
        "tar": lambda: _tar_of(golden_path),
        "7z": lambda: b"7z\xbc\xaf\x27\x1c\x00\x04" + raw,  # header only: detection is by magic
        "zstd": lambda: b"\x28\xb5\x2f\xfd" + raw,
    }[wrapper]()
    path = tmp_path / "wrapped.pth"
    path.write_bytes(wrapped)
    with pytest.raises(UnsupportedFormatError):
        detect_format(path)
    refused(path, UnsupportedFormatError)


@pytest.mark.parametrize("marker", ["archive/code/__torch__/model.py", "archive/constants.pkl"])
def test_torchscript_archives_refused(tmp_path, sentinel, marker):
    code = f"import os\nos.system({touch_cmd(sentinel)!r})".encode()
    path = write_torch_zip(tmp_path / "ts.pt", stream(in_dict(b"N")), extra=((marker, code),))
    with pytest.raises(UnsupportedFormatError, match="TorchScript"):
        detect_format(path)
    refused(path, UnsupportedFormatError, match="TorchScript")


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"hello world", b"PK\x05\x06" + b"\x00" * 18, b"{\"a\": 1}"])
def test_unrecognised_content_refused(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    refused(path, UnsupportedFormatError)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin", ".safetensors", ""])
def test_detection_ignores_extensions(tmp_path, sentinel, golden_path, suffix):
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(dumps({"w": Reduce(os.system, (touch_cmd(sentinel),))}))
    refused(evil, UnsupportedFormatError)
    good = tmp_path / f"good{suffix}"
    good.write_bytes(golden_path.read_bytes())
    assert detect_format(good) == "torch_zip"


def test_pickle_prepended_to_zip_refused(tmp_path, sentinel, golden_path):
    """Zip polyglot: zip readers accept leading junk, we do not."""
    path = tmp_path / "poly.pth"
    path.write_bytes(dumps(Reduce(os.system, (touch_cmd(sentinel),))) + golden_path.read_bytes())
    refused(path, UnsupportedFormatError)


def test_pickle_prepended_to_legacy_file_refused(tmp_path, sentinel):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    path = tmp_path / "prepended.pth"
    path.write_bytes(dumps(Reduce(os.system, (touch_cmd(sentinel),))) + legacy.read_bytes())
    refused(path, UnsupportedFormatError)


def _golden_name(data: bytes, rel: str) -> str:
    return next(name for name in central_entries(data) if name.endswith("/" + rel))


ZIP_SURGERY = {
    "encrypted": lambda d, n: patch_local_flags(patch_central(d, n, flags=0x0809), n, 0x0809),
    "flag_0x20": lambda d, n: patch_local_flags(patch_central(d, n, flags=0x0828), n, 0x0828),
    "flag_0x40": lambda d, n: patch_local_flags(patch_central(d, n, flags=0x0848), n, 0x0848),
    "local_flags_differ": lambda d, n: patch_local_flags(d, n, 0x0800),
    "crc_mismatch": lambda d, n: _flip_byte(d, member_data_offset(d, n)),
    "central_crc_lies": lambda d, n: patch_central(d, n, crc=0x12345678),
    "size_lies_up": lambda d, n: patch_central(d, n, csize=28, usize=28),
    "size_lies_down": lambda d, n: patch_central(d, n, csize=20, usize=20),
    "huge_declared_size": lambda d, n: patch_central(d, n, csize=2**31, usize=2**31),
    "local_name_differs": lambda d, n: rename_member_bytes(d, n, n[:-1] + "9", where="local"),
    "nul_in_name": lambda d, n: rename_member_bytes(d, n, n[:-2] + "\x00" + n[-1]),
    "header_offset_moved": lambda d, n: patch_central(d, n, offset=_CENTRAL.unpack_from(d, central_entries(d)[n])[_CD_OFFSET] + 1),
    "truncated_in_data": lambda d, n: d[: member_data_offset(d, n) + 3],
    "truncated_at_end": lambda d, n: d[:-1],
    "trailing_junk": lambda d, n: d + b"\x80\x02N.",
    "zip_comment": lambda d, n: d[:-2] + struct.pack("<H", 4) + b"evil",
    "eocd_cd_offset_outside": lambda d, n: d[:-6] + struct.pack("<I", len(d) + 100) + d[-2:],
    "zip64_cd_offset_outside": lambda d, n: _patch_zip64_cd_offset(d, len(d) * 2),
    "eocd_entry_count_lies": lambda d, n: d[:-14] + struct.pack("<HH", 3, 3) + d[-10:],
    "prepended_junk": lambda d, n: b"PK\x03\x04" + d,
}


def _flip_byte(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


def _patch_zip64_cd_offset(data: bytes, value: int) -> bytes:
    pos = data.rfind(b"PK\x06\x06")
    assert pos > 0
    return data[: pos + 48] + struct.pack("<Q", value) + data[pos + 56 :]


@pytest.mark.parametrize("attack", sorted(ZIP_SURGERY))
def test_zip_surgery_on_torch_file_refused(tmp_path, golden_path, attack):
    data = golden_path.read_bytes()
    path = tmp_path / "tampered.pth"
    path.write_bytes(ZIP_SURGERY[attack](data, _golden_name(data, "data/0")))
    refused(path)


def test_zip_surgery_control_is_valid(tmp_path, golden_path):
    """The unmodified golden file loads, so each surgery above is what gets refused."""
    data = golden_path.read_bytes()
    path = tmp_path / "copy.pth"
    path.write_bytes(patch_central(data, _golden_name(data, "data/0")))
    assert set(load_torch_checkpoint(path)) == {"w", "b"}


@pytest.mark.parametrize("cut", [10, 100, 0.5, 0.9, -30, -23, -5])
def test_truncated_zips_refused(tmp_path, golden_path, cut):
    data = golden_path.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "trunc.pth"
    path.write_bytes(data[:end])
    refused(path)


@pytest.mark.parametrize(
    "name",
    [
        "../evil", "/abs/data.pkl", "archive/../evil", "archive/./version", "archive\\data.pkl",
        "archive//x", "C:/archive/x", "archive/data/", "top",
    ],
)
def test_unsafe_member_names_refused(tmp_path, sentinel, name):
    path = tensor_zip(tmp_path / "names.pth", {"t": rebuild_v2()}, extra=((name, touch_cmd(sentinel).encode()),))
    refused(path, MalformedCheckpointError)


@pytest.mark.parametrize(
    "extra_name",
    [
        "archive/evil.py", "archive/data/0.pkl", "archive/data/abc", "archive/data.pkl2",
        "archive/.data/version", "archive/extra/x", "archive/data/1/x",
    ],
)
def test_unexpected_members_refused(tmp_path, extra_name):
    path = tensor_zip(tmp_path / "extra.pth", {"t": rebuild_v2()}, extra=((extra_name, b"\x80\x02N."),))
    refused(path)


def test_duplicate_member_names_refused(tmp_path, sentinel):
    evil = stream(in_dict(call(glob("os", "system"), sstr(touch_cmd(sentinel)))))
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = tensor_zip(tmp_path / "dup.pth", {"t": rebuild_v2()}, extra=(("archive/data.pkl", evil),))
    refused(path, MalformedCheckpointError, match="duplicate")


def test_two_top_level_folders_refused(tmp_path):
    path = tensor_zip(tmp_path / "two.pth", {"t": rebuild_v2()}, extra=(("other/data.pkl", dumps({})), ("other/version", b"3\n")))
    refused(path, MalformedCheckpointError, match="top-level")


@pytest.mark.parametrize("missing", ["data.pkl", "version"])
def test_missing_required_members_refused(tmp_path, missing):
    path = tmp_path / "missing.pth"
    members = {"data.pkl": dumps({}), "version": b"3\n", "byteorder": b"little"}
    del members[missing]
    with zipfile.ZipFile(path, "w") as archive:
        for rel, data in members.items():
            archive.writestr(f"archive/{rel}", data)
    refused(path, MalformedCheckpointError, match="missing")


@pytest.mark.parametrize("compressed", ["data.pkl", "storage"])
def test_deflated_members_refused(tmp_path, compressed):
    def method(member: str) -> int:
        return zipfile.ZIP_DEFLATED if member == compressed else zipfile.ZIP_STORED

    path = tmp_path / "deflate.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", dumps({"t": rebuild_v2()}), compress_type=method("data.pkl"))
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/data/0", FLOATS_0123, compress_type=method("storage"))
    refused(path, MalformedCheckpointError, match="compressed")


def test_deflate_bomb_refused_without_inflating(tmp_path):
    path = tmp_path / "bomb.pth"
    numel = 4 * 2**20
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", dumps({"t": rebuild_v2(storage_pid(numel=numel), size=(numel,))}))
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/data/0", bytes(4 * numel), compress_type=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    refused(path, MalformedCheckpointError, match="compressed")
    assert time.perf_counter() - start < 1.0


def test_total_storage_bytes_limit(golden_path):
    refused(golden_path, ResourceLimitError, match="exceeds the limit 16", max_total_bytes=16)  # one member
    refused(golden_path, ResourceLimitError, match="max_total_bytes=30", max_total_bytes=30)  # the sum
    assert set(load_torch_checkpoint(golden_path, max_total_bytes=36)) == {"w", "b"}


@pytest.mark.parametrize("byteorder", [b"middle", b"LITTLE", b"little\n", b""])
def test_bad_byteorder_refused(tmp_path, byteorder):
    path = tensor_zip(tmp_path / "bo.pth", {"t": rebuild_v2()}, records={"version": b"3\n", "byteorder": byteorder})
    refused(path, MalformedCheckpointError, match="byteorder")


@pytest.mark.parametrize("version", [b"three", b"3\n\n", b"", b"1" * 20])
def test_bad_version_record_refused(tmp_path, version):
    path = tensor_zip(tmp_path / "ver.pth", {"t": rebuild_v2()}, records={"version": version})
    refused(path, MalformedCheckpointError, match="version")


# =========================================================================================
# A. Code-execution globals
# =========================================================================================


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_os_system_reduce_all_protocols(tmp_path, sentinel, protocol, container):
    payload = dumps({"w": Reduce(os.system, (touch_cmd(sentinel),))}, protocol)
    path = tmp_path / "evil.pth"
    if container == "raw":
        path.write_bytes(payload)
        refused(path, UnsupportedFormatError)
        return
    write_torch_zip(path, payload)
    if protocol < 2:
        refused(path, MalformedCheckpointError, match="PROTO")
        return
    first_global = next(pos for op, _arg, pos in pickletools.genops(payload) if op.name in ("GLOBAL", "STACK_GLOBAL"))
    error = refused(path, DisallowedGlobalError)
    assert f"'{os.system.__module__}.system'" in str(error)
    assert f"data.pkl@{first_global}:" in str(error)


DANGEROUS_GLOBALS = [
    # A1-A3: direct execution and getattr/import gadgets
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("os", "execv"), ("os", "popen"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("builtins", "__import__"),
    ("builtins", "getattr"), ("builtins", "open"), ("builtins", "breakpoint"), ("builtins", "setattr"),
    ("__builtin__", "eval"), ("__builtin__", "__import__"), ("operator", "attrgetter"),
    ("operator", "methodcaller"), ("pydoc", "locate"), ("pkgutil", "resolve_name"),
    ("importlib", "import_module"), ("subprocess", "run"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("shutil", "rmtree"),
    # A4: nested loads
    ("pickle", "loads"), ("_pickle", "loads"), ("pickle", "Unpickler"), ("functools", "partial"),
    ("torch", "load"), ("torch.serialization", "load"), ("torch.serialization", "_load"),
    ("torch.storage", "_load_from_bytes"), ("torch.jit", "load"),
    # A5: torch-internal gadgets (the allow-list is exact, not a prefix rule)
    ("torch.utils.collect_env", "run"), ("torch._inductor.codecache", "compile_file"),
    ("torch.jit.unsupported_tensor_ops", "execWrapper"), ("torch.utils._config_module", "ConfigModule.load_config"),
    ("torch._dynamo.guards", "GuardBuilder.get"), ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression"),
    ("torch.utils.bottleneck.__main__", "run_cprofile"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._utils", "_rebuild_sparse_tensor"), ("torch._utils", "_rebuild_sparse_csr_tensor"),
    ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch", "Tensor"), ("torch.nn", "Parameter"), ("torch", "UntypedStorage"), ("torch.storage", "TypedStorage"),
    ("torch", "FloatStorage.from_file"), ("torch._utils", "_rebuild_tensor_v2.__globals__"), ("torch", "_utils._rebuild_tensor_v2"),
    ("collections", "OrderedDict.fromkeys"), ("collections", "defaultdict"), ("collections ", "OrderedDict"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("copyreg", "_reconstructor"),
    # A6: stdlib gadgets from scanner advisories
    ("runpy", "_run_code"), ("cProfile", "run"), ("profile", "run"), ("timeit", "timeit"), ("bdb", "Bdb.run"),
    ("idlelib.pyshell", "ModifiedInterpreter.runcode"), ("code", "InteractiveInterpreter.runcode"),
    ("ensurepip", "_run_pip"), ("pip", "main"), ("venv", "create"), ("pydoc", "pipepager"), ("ctypes", "CDLL"),
    ("pty", "spawn"), ("uuid", "_get_command_stdout"), ("_osx_support", "_read_output"),
    ("_aix_support", "_read_cmd_output"), ("imaplib", "IMAP4_stream"), ("io", "FileIO"),
    ("logging", "FileHandler"), ("urllib.request", "urlopen"), ("socket", "create_connection"),
    ("types", "CodeType"), ("asyncio.unix_events", "_UnixSubprocessTransport._start"), ("webbrowser", "open"),
]


@pytest.mark.parametrize("form", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize(("module", "name"), DANGEROUS_GLOBALS, ids=[f"{m}.{n}" for m, n in DANGEROUS_GLOBALS])
def test_dangerous_globals_refused(tmp_path, sentinel, module, name, form):
    payload = call(glob(module, name, form), sstr(touch_cmd(sentinel)))
    pkl = stream(in_dict(payload), protocol=4 if form == "STACK_GLOBAL" else 2)
    list(pickletools.genops(pkl))  # the generated payload is a well-formed pickle
    path = write_torch_zip(tmp_path / "evil.pth", pkl)
    error = refused(path, DisallowedGlobalError)
    offset = pkl.index(b"\x93") if form == "STACK_GLOBAL" else pkl.index(b"c" + module.encode())
    assert f"{module}.{name}" in str(error) and f"@{offset}:" in str(error)


@pytest.mark.parametrize("form", ["GLOBAL", "STACK_GLOBAL"])
def test_getattr_chain_refused(tmp_path, sentinel, form):
    imported_os = call(glob("builtins", "__import__", form), sstr("os"))
    system = call(glob("builtins", "getattr", form), imported_os, sstr("system"))
    path = write_torch_zip(tmp_path / "chain.pth", stream(in_dict(call(system, sstr(touch_cmd(sentinel)))), 4))
    refused(path, DisallowedGlobalError, match="builtins.getattr")


def test_nested_pickle_loads_refused(tmp_path, sentinel):
    inner = dumps(Reduce(os.system, (touch_cmd(sentinel),)))
    path = tensor_zip(tmp_path / "nested.pth", {"t": rebuild_v2(), "x": Reduce(pickle.loads, (inner,))})
    refused(path, DisallowedGlobalError, match="loads")


def test_nested_torch_load_via_partial_refused(tmp_path, sentinel):
    import functools

    path = tensor_zip(tmp_path / "partial.pth", {"x": Reduce(functools.partial, (torch.load, str(sentinel)))})
    refused(path, DisallowedGlobalError, match="functools.partial")


def test_second_pickle_as_storage_is_only_bytes(tmp_path, sentinel):
    """A pickle hidden in data/<key> and referenced as a storage is raw data, never unpickled."""
    inner = dumps(Reduce(os.system, (touch_cmd(sentinel),)))
    obj = {"x": rebuild_v2(storage_pid("1", torch.ByteStorage, len(inner)), size=(len(inner),))}
    path = tensor_zip(tmp_path / "hidden.pth", obj, storages={"1": inner})
    result = load_torch_checkpoint(path)
    assert tensor_bytes(result["x"]) == inner


def test_memo_fetched_stack_global_operands_refused(tmp_path, sentinel):
    # {'k': ('os', 'system')} with both strings memoized, then STACK_GLOBAL(memo[0], memo[1])
    decoy = sstr("k") + sstr("os") + b"\x94" + sstr("system") + b"\x94" + b"\x86s"
    payload = sstr("v") + b"h\x00h\x01\x93" + b"(" + sstr(touch_cmd(sentinel)) + b"tRs"
    pkl = stream(b"}" + decoy + payload, 4)
    path = write_torch_zip(tmp_path / "memo.pth", pkl)
    refused(path, DisallowedGlobalError, match="'os.system'")


@pytest.mark.parametrize("operands", [b"K\x01K\x02", b"NN", sstr("os") + b"K\x01", b"](" + b"t"])
def test_non_string_stack_global_operands_refused(tmp_path, operands):
    path = write_torch_zip(tmp_path / "ops.pth", stream(in_dict(operands + b"\x93"), 4))
    refused(path, MalformedCheckpointError, match="STACK_GLOBAL")


@pytest.mark.parametrize(
    ("label", "body"),
    [
        ("INST", b"(" + b"ios\nsystem\n"),
        ("OBJ", b"(" + glob("collections", "OrderedDict") + b"o"),
        ("OBJ+POP", b"(" + glob("collections", "OrderedDict") + b"o0"),
        ("NEWOBJ", glob("collections", "OrderedDict") + b")\x81"),
        ("NEWOBJ_EX", glob("collections", "OrderedDict") + b")}\x92"),
        ("EXT1", b"\x82\x01"),
        ("EXT2", b"\x83\x01\x00"),
        ("EXT4", b"\x84\x01\x00\x00\x00"),
        ("PERSID", b"P0\n"),
        ("DUP", b"N2"),
        ("LONG4", b"\x8b\xff\xff\xff\x7f"),
        ("GET", b"Np0\n0g0\n"),
        ("STRING", b"S'os'\n"),
        ("BINSTRING", b"U\x02os"),
        ("UNICODE", b"Vos\n"),
        ("INT", b"I1\n"),
        ("EMPTY_SET", b"\x8f"),
        ("FROZENSET", b"(\x91"),
        ("BYTEARRAY8", b"\x96\x01\x00\x00\x00\x00\x00\x00\x00x"),
        ("NEXT_BUFFER", b"\x97"),
        ("unknown 0xff", b"\xff"),
        ("unknown 0x00", b"\x00"),
        ("second PROTO", b"\x80\x02N"),
    ],
)
def test_refused_opcodes(tmp_path, sentinel, label, body):
    path = write_torch_zip(tmp_path / "op.pth", stream(b"}" + sstr("k") + body + b"s", 4))
    refused(path, MalformedCheckpointError)


@pytest.mark.parametrize("ignore", [False, True])
def test_newobj_on_allowed_class_refused_even_when_ignoring(tmp_path, ignore):
    path = write_torch_zip(tmp_path / "newobj.pth", stream(in_dict(glob("collections", "OrderedDict") + b")\x81"), 4))
    refused(path, MalformedCheckpointError, match="NEWOBJ", ignore_unknown_objects=ignore)


@pytest.mark.parametrize(
    "body",
    [
        b"]}b",  # BUILD on a list
        b"}}b",  # BUILD on a plain dict
        call(glob("collections", "OrderedDict")) + b"}" + sstr("__class__") + b"Nsb",  # unexpected state key
        call(glob("collections", "OrderedDict")) + b"]b",  # non-dict state
    ],
)
def test_build_on_non_allowed_targets_refused(tmp_path, body):
    path = write_torch_zip(tmp_path / "build.pth", stream(in_dict(body)))
    refused(path, MalformedCheckpointError, match="BUILD")


def test_build_on_tensor_refused(tmp_path):
    tensor_ops = dumps(rebuild_v2())[2:-1]  # without PROTO and STOP
    pkl = stream(in_dict(tensor_ops + b"}" + sstr("requires_grad") + b"\x88sb"))
    path = write_torch_zip(tmp_path / "bt.pth", pkl, {"0": FLOATS_0123})
    refused(path, MalformedCheckpointError)


def test_reduce_on_storage_type_refused(tmp_path):
    path = tensor_zip(tmp_path / "rs.pth", {"x": Reduce(torch.FloatStorage, (4,))})
    refused(path, MalformedCheckpointError, match="REDUCE")


# =========================================================================================
# B. Abuse of allowed functions
# =========================================================================================

BAD_REBUILD_ARGS = {
    "offset_beyond": dict(offset=4, size=(1,)),
    "size_beyond": dict(size=(5,)),
    "view_beyond": dict(offset=2, size=(2, 2), stride=(2, 1)),
    "stride_beyond": dict(size=(2,), stride=(4,)),
    "negative_size": dict(size=(-1,)),
    "negative_stride": dict(size=(2,), stride=(-1,)),
    "negative_offset": dict(offset=-1, size=(1,)),
    "int64_overflow": dict(size=(2**62, 2**62), stride=(2**62, 1)),
    "numel_overflow": dict(size=(2**40, 2**40), stride=(0, 0)),
    "allocation_bomb": dict(size=(2**40,), stride=(0,)),
    "empty_offset_beyond": dict(offset=5, size=(0,)),
    "rank_too_high": dict(size=(1,) * 40, stride=(1,) * 40),
    "rank_mismatch": dict(size=(2, 2), stride=(1,)),
    "float_offset": dict(offset=0.0),
    "bool_size": dict(size=(True,)),
    "list_size": dict(size=[4]),
    "str_stride": dict(stride="1"),
    "huge_int": dict(offset=2**70),
    "requires_grad_int": dict(requires_grad=1),
    "hooks_nonempty": dict(hooks=collections.OrderedDict(a=1)),
    "hooks_list": dict(hooks=[]),
    "storage_not_storage": dict(storage=7),
    "storage_tensorish": dict(storage=(1, 2)),
}


@pytest.mark.parametrize("case", sorted(BAD_REBUILD_ARGS))
def test_rebuild_tensor_v2_argument_checks(tmp_path, sentinel, case):
    path = tensor_zip(tmp_path / "bad.pth", {"t": rebuild_v2(**BAD_REBUILD_ARGS[case])})
    refused(path)


@pytest.mark.parametrize(
    "extra",
    [({"neg": True},), ({"x": 1},), (1,), ("meta",), ({}, None)],
)
def test_rebuild_tensor_v2_metadata_and_arity(tmp_path, extra):
    path = tensor_zip(tmp_path / "meta.pth", {"t": rebuild_v2(None, 0, (4,), (1,), False, None, *extra)})
    refused(path, MalformedCheckpointError)


def test_rebuild_tensor_v2_empty_metadata_accepted(tmp_path):
    path = tensor_zip(tmp_path / "meta_ok.pth", {"t": rebuild_v2(None, 0, (4,), (1,), False, None, {})})
    assert load_torch_checkpoint(path)["t"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_backward_hook_with_callable_refused(tmp_path, sentinel):
    hooks = collections.OrderedDict(h=Reduce(os.system, (touch_cmd(sentinel),)))
    path = tensor_zip(tmp_path / "hooks.pth", {"t": rebuild_v2(hooks=hooks)})
    refused(path, DisallowedGlobalError, match="system")


def test_rebuild_from_type_v2_with_os_system_refused(tmp_path, sentinel):
    import torch._tensor

    obj = Reduce(torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (touch_cmd(sentinel),), {}))
    path = tensor_zip(tmp_path / "rft.pth", {"t": obj})
    refused(path, DisallowedGlobalError, match="_rebuild_from_type_v2")


@pytest.mark.parametrize(
    "pid",
    [
        ("storage", torch.FloatStorage, "0", "cpu"),
        ("storage", torch.FloatStorage, "0", "cpu", 4, "extra"),
        ("storage", torch.FloatStorage, 0, "cpu", 4),
        ("storage", torch.FloatStorage, "0", "cpu", 4.0),
        ("storage", torch.FloatStorage, "0", "cpu", -4),
        ("storage", torch.FloatStorage, "0", "cpu", True),
        ("storage", torch.FloatStorage, "../0", "cpu", 4),
        ("storage", torch.FloatStorage, "0", "cpu; rm -rf", 4),
        ("storage", torch.FloatStorage, "0", 0, 4),
        ("module", torch.FloatStorage, "0", "cpu", 4),
        (b"storage", torch.FloatStorage, "0", "cpu", 4),
        ("storage", "FloatStorage", "0", "cpu", 4),
        ("storage", collections.OrderedDict, "0", "cpu", 4),
        ["storage", torch.FloatStorage, "0", "cpu", 4],
        "storage",
    ],
)
def test_persistent_id_shape_refused(tmp_path, pid):
    path = tensor_zip(tmp_path / "pid.pth", {"t": rebuild_v2(PID(pid))}, protocol=3)
    refused(path, MalformedCheckpointError)


def test_persistent_id_text_form_refused(tmp_path):
    path = write_torch_zip(tmp_path / "persid.pth", stream(in_dict(b"P0\n")))
    refused(path, MalformedCheckpointError, match="PERSID")


@pytest.mark.parametrize(
    ("obj", "storages", "match"),
    [
        ({"t": rebuild_v2(storage_pid("7"))}, {"0": FLOATS_0123}, "no member"),
        ({"t": rebuild_v2()}, {"0": FLOATS_0123[:-1]}, "member size"),
        ({"t": rebuild_v2(storage_pid(numel=3), size=(3,))}, {"0": FLOATS_0123}, "member size"),
        ({"t": rebuild_v2(), "u": rebuild_v2(storage_pid(stype=torch.IntStorage))}, {"0": FLOATS_0123}, "different type"),
        ({"t": rebuild_v2(), "u": rebuild_v2(storage_pid(numel=2), size=(2,))}, {"0": FLOATS_0123}, "different type or size"),
        ({"t": rebuild_v2()}, {"0": FLOATS_0123, "1": FLOATS_0123}, "never referenced"),
        ({"t": rebuild_v2(storage_pid(stype=torch.BoolStorage))}, {"0": b"\x00\x01\x02\x01"}, "0/1"),
        ({"t": rebuild_v2(storage_pid(stype=torch.DoubleStorage))}, {"0": FLOATS_0123}, "member size"),
    ],
)
def test_storage_mismatches_refused(tmp_path, obj, storages, match):
    path = tensor_zip(tmp_path / "st.pth", obj, storages=storages)
    refused(path, MalformedCheckpointError, match=match)


def test_rebuild_parameter_wrapping_non_tensor_refused(tmp_path, sentinel):
    obj = {"p": Reduce(torch._utils._rebuild_parameter, (Reduce(os.system, (touch_cmd(sentinel),)), True, collections.OrderedDict()))}
    refused(tensor_zip(tmp_path / "p1.pth", obj, storages={}), DisallowedGlobalError)
    obj = {"p": Reduce(torch._utils._rebuild_parameter, ([1, 2], True, collections.OrderedDict()))}
    refused(tensor_zip(tmp_path / "p2.pth", obj, storages={}), MalformedCheckpointError, match="Parameter")


def test_parameter_with_state_refused_unless_empty(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))
    param.extra_attribute = "x"
    path = tmp_path / "pstate.pth"
    torch.save({"p": param}, path)
    refused(path, MalformedCheckpointError, match="state")
    empty = {"p": Reduce(torch._utils._rebuild_parameter_with_state, (rebuild_v2(), True, collections.OrderedDict(), {}))}
    assert load_torch_checkpoint(tensor_zip(tmp_path / "pempty.pth", empty))["p"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.eye(3).to_sparse(),
        lambda: torch.eye(3).to_sparse_csr(),
        lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8),
        lambda: torch.tensor([1, 2, 3], dtype=torch.uint16),
        lambda: torch.ones(2, dtype=torch.complex64),
        lambda: torch.ones(3).as_subclass(MyTensor),
    ],
    ids=["sparse_coo", "sparse_csr", "quantized", "uint16_v3", "complex", "subclass"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unsupported_real_torch_tensors_refused(tmp_path, make):
    """Files genuinely written by torch.save that need rebuild functions outside the list."""
    path = tmp_path / "unsupported.pth"
    torch.save({"t": make()}, path)
    refused(path, DisallowedGlobalError)


def test_tensor_with_python_attribute_refused(tmp_path):
    tensor = torch.ones(2)
    tensor.note = "hello"
    path = tmp_path / "attr.pth"
    torch.save({"t": tensor}, path)
    refused(path, DisallowedGlobalError, match="_rebuild_from_type_v2")


# =========================================================================================
# C. Stream and parser differentials
# =========================================================================================


def test_stacked_pickles_refused(tmp_path, sentinel):
    good = dumps({"t": rebuild_v2()})
    evil = dumps(Reduce(os.system, (touch_cmd(sentinel),)))
    refused(write_torch_zip(tmp_path / "s1.pth", good + evil, {"0": FLOATS_0123}), MalformedCheckpointError, match="trailing")
    refused(write_torch_zip(tmp_path / "s2.pth", evil + good, {"0": FLOATS_0123}), DisallowedGlobalError)
    refused(write_torch_zip(tmp_path / "s3.pth", good + b"\x00", {"0": FLOATS_0123}), MalformedCheckpointError, match="trailing")


def test_broken_pickle_with_payload_before_corruption_refused(tmp_path, sentinel):
    """nullifAI style: payload first, then a stream that would break anyway."""
    pkl = proto(2) + call(glob("os", "system"), sstr(touch_cmd(sentinel))) + b"\xff\xfe garbage"
    refused(write_torch_zip(tmp_path / "broken.pth", pkl), DisallowedGlobalError)
    truncated = dumps({"t": rebuild_v2(), "u": rebuild_v2()})[:-7]
    refused(write_torch_zip(tmp_path / "trunc.pth", truncated, {"0": FLOATS_0123}), MalformedCheckpointError)


def _framed(body: bytes, frame_len: int) -> bytes:
    return proto(4) + b"\x95" + struct.pack("<Q", frame_len) + body + b"."


@pytest.mark.parametrize(
    ("label", "pkl"),
    [
        ("frame_too_short", _framed(b"}" + sstr("key") + b"Ns", 3)),
        ("frame_too_long", _framed(b"}" + sstr("k") + b"Ns", 100)),
        ("frame_zero", _framed(b"}", 0)),
        ("nested_frame", proto(4) + b"\x95" + struct.pack("<Q", 20) + b"}\x95" + struct.pack("<Q", 1) + b"N" + b"." ),
        ("stop_inside_longer_frame", _framed(b"}.", 3)[:-1]),
    ],
)
def test_frame_boundary_violations_refused(tmp_path, label, pkl):
    refused(write_torch_zip(tmp_path / "frame.pth", pkl), MalformedCheckpointError)


def test_well_formed_frames_accepted(tmp_path):
    body = b"}" + sstr("k") + b"K\x00s"
    pkl = _framed(body, len(body))  # STOP after the frame
    assert load_torch_checkpoint(write_torch_zip(tmp_path / "frame_ok.pth", pkl)) == {"k": 0}
    pkl = proto(4) + b"\x95" + struct.pack("<Q", len(body) + 1) + body + b"."  # STOP inside
    assert load_torch_checkpoint(write_torch_zip(tmp_path / "frame_ok2.pth", pkl)) == {"k": 0}


def test_straddling_opcode_refused(tmp_path):
    # frame ends in the middle of SHORT_BINUNICODE's argument
    pkl = proto(4) + b"\x95" + struct.pack("<Q", 3) + b"}" + sstr("key") + b"Ns."
    refused(write_torch_zip(tmp_path / "straddle.pth", pkl), MalformedCheckpointError, match="FRAME")


@pytest.mark.parametrize(
    "body",
    [
        b"h\x05",  # GET of an empty memo slot
        b"N\x94N\x94h\x07",  # GET past the memo
        b"Nq\x00Nq\x00",  # memo slot written twice
        b"s",  # SETITEM with nothing
        b"(Nu",  # odd SETITEMS
        b"Na",  # APPEND to a dict
        b"]" + b"K\x01" + b"\x8e" + struct.pack("<Q", 2**62),  # huge BINBYTES8
        b"\x8d" + struct.pack("<Q", 2**62),  # huge BINUNICODE8
        b"X" + struct.pack("<I", 2**31),  # huge BINUNICODE
        b"X\x02\x00\x00\x00\xff\xfe",  # invalid UTF-8
        b"t",  # TUPLE without MARK
        b"\x87",  # TUPLE3 with too few items
        b"R",  # REDUCE with nothing
        b"NNR",  # REDUCE on None
        b"]K\x01s",  # SETITEM on list
        b"}]K\x01s",  # list as a dict key
        b"(]tK\x01s",  # tuple holding a list as dict key
        b"K\x01K\x01sK\x01K\x02s",  # duplicate dict key
    ],
)
def test_malformed_streams_refused(tmp_path, body):
    pkl = proto(2) + b"}" + body + b"."
    refused(write_torch_zip(tmp_path / "bad.pth", pkl), MalformedCheckpointError)


def test_top_level_must_be_a_dict(tmp_path):
    refused(tensor_zip(tmp_path / "list.pth", [rebuild_v2()]), MalformedCheckpointError, match="not a dict")
    refused(tensor_zip(tmp_path / "tensor.pth", rebuild_v2()), MalformedCheckpointError, match="not a dict")


def test_bare_storage_in_result_refused(tmp_path):
    refused(tensor_zip(tmp_path / "bare.pth", {"s": storage_pid()}), MalformedCheckpointError, match="not allowed in the result")


def test_callable_reference_in_result_refused(tmp_path):
    refused(tensor_zip(tmp_path / "fn.pth", {"f": torch._utils._rebuild_tensor_v2}, storages={}), MalformedCheckpointError)


def test_reference_cycle_refused(tmp_path):
    pkl = proto(2) + b"}" + sstr("l") + b"]q\x00h\x00as" + b"."  # l = []; l.append(l)
    refused(write_torch_zip(tmp_path / "cycle.pth", pkl), MalformedCheckpointError, match="cycle")


# =========================================================================================
# E. Resource exhaustion
# =========================================================================================


def test_billion_laughs_via_memo_refused_quickly(tmp_path):
    levels = 40
    body = b"]" + b"]q\x00a"  # outer = [L0]
    for level in range(1, levels):  # L_k = [L_{k-1}, L_{k-1}]; outer.append(L_k)
        body += b"](" + b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"e" + b"q" + bytes([level]) + b"a"
    pkl = proto(2) + b"}" + sstr("bomb") + body + b"s."
    start = time.perf_counter()
    refused(write_torch_zip(tmp_path / "laughs.pth", pkl), ResourceLimitError, match="expands")
    assert time.perf_counter() - start < 2.0


def test_deep_mark_nesting_refused(tmp_path):
    pkl = proto(2) + b"}" + b"(" * 100_000 + b"."
    refused(write_torch_zip(tmp_path / "marks.pth", pkl), ResourceLimitError, match="MARK")


def test_deep_container_nesting_refused(tmp_path):
    depth = 200
    pkl = proto(2) + b"}" + sstr("deep") + b"]" * depth + b"a" * (depth - 1) + b"s."
    refused(write_torch_zip(tmp_path / "deep.pth", pkl), ResourceLimitError, match="nested")


def test_tensor_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "MAX_TENSORS", 50)
    path = tensor_zip(tmp_path / "many.pth", {f"t{i}": rebuild_v2(size=(1,), offset=i % 4) for i in range(51)})
    refused(path, ResourceLimitError, match="tensors")
    path = tensor_zip(tmp_path / "fifty.pth", {f"t{i}": rebuild_v2(size=(1,), offset=i % 4) for i in range(50)})
    assert len(load_torch_checkpoint(path)) == 50


@pytest.mark.parametrize(
    ("limit", "value", "obj"),
    [
        ("MAX_MEMO_ENTRIES", 10, {f"k{i}": i for i in range(20)}),
        ("MAX_OPCODES", 100, {f"k{i}": i for i in range(100)}),
        ("MAX_STACK_ITEMS", 10, {"l": list(range(20))}),
    ],
)
def test_interpreter_limits(tmp_path, monkeypatch, limit, value, obj):
    monkeypatch.setattr(cr, limit, value)
    refused(write_torch_zip(tmp_path / "lim.pth", dumps(obj)), ResourceLimitError)


def test_pickle_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "_FIXED_RECORD_CAPS", {**cr._FIXED_RECORD_CAPS, "data.pkl": 64})
    refused(write_torch_zip(tmp_path / "bigpkl.pth", dumps({"x": "y" * 100})), ResourceLimitError, match="data.pkl")


def test_logical_size_limit(tmp_path):
    """A broadcast view that is small in the file but huge when materialised."""
    path = tensor_zip(tmp_path / "broadcast.pth", {"t": rebuild_v2(size=(2**20, 4), stride=(0, 1))})
    refused(path, ResourceLimitError, max_total_bytes=2**20)
    assert load_torch_checkpoint(path)["t"].shape == (2**20, 4)


def test_huge_length_fields_do_not_allocate(tmp_path):
    for opcode, fmt in ((b"\x8e", "<Q"), (b"\x8d", "<Q"), (b"B", "<I"), (b"X", "<I")):
        pkl = proto(4) + b"}" + sstr("k") + opcode + struct.pack(fmt, 2**31 - 1 if fmt == "<I" else 2**60) + b"s."
        refused(write_torch_zip(tmp_path / "len.pth", pkl), MalformedCheckpointError, match="truncated")


# =========================================================================================
# ignore_unknown_objects
# =========================================================================================


def test_training_checkpoint_with_namespace_args(tmp_path):
    import argparse

    ckpt = {"epoch": 1, "trainer": {"var_wo_ddp": {"w": torch.randn(2, 2)}}, "args": argparse.Namespace(lr=0.1, depth=16)}
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save(ckpt, path)
    error = refused(path, DisallowedGlobalError)
    assert "'argparse.Namespace'" in str(error) and "@" in str(error)
    with pytest.warns(UnknownObjectWarning, match="argparse.Namespace"):
        result = load_torch_checkpoint(path, ignore_unknown_objects=True)
    assert isinstance(result["args"], UnknownObject) and result["args"].qualname == "argparse.Namespace"
    assert_bit_exact(result["trainer"]["var_wo_ddp"]["w"], ckpt["trainer"]["var_wo_ddp"]["w"])


def test_ignore_mode_never_calls_unknown_globals(tmp_path, sentinel):
    obj = {
        "t": rebuild_v2(),
        "evil": Reduce(os.system, (touch_cmd(sentinel),)),
        "ex": Reduce(exec, (f"open({str(sentinel)!r}, 'w')",)),
    }
    path = tensor_zip(tmp_path / "ignored.pth", obj)
    with pytest.warns(UnknownObjectWarning):
        result = load_torch_checkpoint(path, ignore_unknown_objects=True)
    assert isinstance(result["evil"], UnknownObject) and isinstance(result["ex"], UnknownObject)
    assert result["t"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch", "load"), ("torch._utils", "_rebuild_tensor"), ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.storage", "_load_from_bytes"), ("numpy", "ndarray"),
    ],
)
def test_ignore_mode_still_refuses_torch_and_numpy_globals(tmp_path, sentinel, module, name):
    pkl = stream(in_dict(call(glob(module, name), sstr(touch_cmd(sentinel)))))
    refused(write_torch_zip(tmp_path / "t.pth", pkl), DisallowedGlobalError, ignore_unknown_objects=True)


class AttrDict(dict):
    """A dict subclass as found in training configs (pickled with NEWOBJ + SETITEMS + BUILD)."""


def test_ignore_mode_absorbs_items_and_state_of_unknown_objects(tmp_path):
    config = AttrDict(depth=16, names=["a"])
    config.extra = {"x": 1}
    ckpt = {
        "w": torch.ones(2),
        "config": config,
        "counts": collections.defaultdict(list, {"a": [1, 2]}),
        "tags": {"a", "b"},
    }
    path = tmp_path / "unknown.pth"
    torch.save(ckpt, path)
    refused(path, DisallowedGlobalError)
    with pytest.warns(UnknownObjectWarning):
        result = load_torch_checkpoint(path, ignore_unknown_objects=True)
    kinds = {k: type(v).__name__ for k, v in result.items()}
    assert kinds == {"w": "Tensor", "config": "UnknownObject", "counts": "UnknownObject", "tags": "UnknownObject"}
    assert result["config"].qualname.endswith("AttrDict")


@pytest.mark.parametrize(
    "obj",
    [
        {"y": Reduce(collections.Counter, (rebuild_v2(),))},  # REDUCE argument
        {"y": collections.defaultdict(list, {"t": rebuild_v2()})},  # SETITEMS on a placeholder
        {"y": AttrDict(t=rebuild_v2())},  # NEWOBJ + SETITEMS
    ],
)
def test_ignore_mode_refuses_tensors_fed_to_unknown_objects(tmp_path, obj):
    with pytest.warns(UnknownObjectWarning):
        refused(tensor_zip(tmp_path / "u.pth", obj), MalformedCheckpointError, match="cannot be ignored", ignore_unknown_objects=True)


def test_ignore_mode_scanning_is_budgeted(tmp_path, monkeypatch):
    """Re-scanning one shared payload for every unknown call cannot go quadratic."""
    monkeypatch.setattr(cr, "MAX_EXPANDED_NODES", 1000)
    shared = list(range(100))
    obj = {f"x{i}": Reduce(collections.Counter, (shared,)) for i in range(20)}
    with pytest.warns(UnknownObjectWarning):
        path = tensor_zip(tmp_path / "budget.pth", obj, storages={})
        refused(path, ResourceLimitError, match="unknown objects", ignore_unknown_objects=True)


# =========================================================================================
# H. Property-based fuzzing
# =========================================================================================

_FUZZ_SD = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "v": torch.tensor([True, False]),
    "n": {"s": torch.tensor(2.0, dtype=torch.bfloat16), "l": [1, 2.5, None, "x"]},
}


def _fuzz_base(protocol: int) -> tuple[bytes, dict[str, bytes]]:
    buf = io.BytesIO()
    torch.save(_FUZZ_SD, buf, pickle_protocol=protocol)
    members = zip_member_bytes_from_bytes(buf.getvalue())
    pkl = next(v for k, v in members.items() if k.endswith("/data.pkl"))
    storages = {k.rsplit("/", 1)[1]: v for k, v in members.items() if "/data/" in k}
    return buf.getvalue(), {"pkl": pkl, **{f"s{k}": v for k, v in storages.items()}}


def zip_member_bytes_from_bytes(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


_FUZZ_ZIP, _FUZZ_PARTS = _fuzz_base(2)
_FUZZ_PARTS_4 = _fuzz_base(4)[1]
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="ckpt_fuzz_"))


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def _load_or_refuse(path: Path) -> None:
    try:
        result = load_torch_checkpoint(path, max_total_bytes=2**20)
    except UnsafeCheckpointError:
        return
    assert type(result) in (dict, collections.OrderedDict)


_edits = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=6)


_FUZZ_SETTINGS = settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ_SETTINGS
@given(edits=_edits, cut=st.one_of(st.none(), st.integers(1, len(_FUZZ_ZIP))))
def test_fuzz_mutated_zip_bytes(edits, cut):
    path = _FUZZ_DIR / "zip.pth"
    path.write_bytes(_mutate(_FUZZ_ZIP, edits, cut))
    _load_or_refuse(path)


@_FUZZ_SETTINGS
@given(edits=_edits, cut=st.one_of(st.none(), st.integers(1, len(_FUZZ_PARTS["pkl"]))), protocol=st.sampled_from([2, 4]))
def test_fuzz_mutated_pickle_in_valid_zip(edits, cut, protocol):
    """Mutations inside data.pkl with a correct CRC, so the interpreter itself is exercised."""
    parts = _FUZZ_PARTS if protocol == 2 else _FUZZ_PARTS_4
    storages = {k[1:]: v for k, v in parts.items() if k.startswith("s")}
    path = write_torch_zip(_FUZZ_DIR / "pkl.pth", _mutate(parts["pkl"], edits, cut), storages)
    _load_or_refuse(path)
