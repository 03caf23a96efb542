"""Self-test of the in-process fake Hub (tests/fake_hub.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # robust under --import-mode=importlib too

from fake_hub import FAKE_ENDPOINT, FAKE_TOKEN, fake_hub  # noqa: E402,F401  (fixture re-export)

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_ORIGINAL_ENDPOINT = constants.ENDPOINT
_ORIGINAL_CACHE = constants.HF_HUB_CACHE


def _make_folder(root: Path) -> dict[str, bytes]:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 8, "id2label": {"0": "tench"}}))
    (root / "sub").mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(root / "sub" / "model.safetensors"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _assert_all_faked(hub) -> None:
    assert hub.requests, "the fake handler saw no request"
    assert all(url.startswith(FAKE_ENDPOINT + "/") for _, url in hub.requests), hub.requests
    assert not hub.blocked_connections, hub.blocked_connections


def test_environment_is_patched(fake_hub, tmp_path):
    assert constants.ENDPOINT == FAKE_ENDPOINT
    assert huggingface_hub.hf_api.api.endpoint == FAKE_ENDPOINT
    assert HfApi().endpoint == FAKE_ENDPOINT
    assert huggingface_hub.get_token() == FAKE_TOKEN
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert Path(constants.HF_HOME).is_relative_to(tmp_path)
    assert constants.HF_HUB_OFFLINE is False


def test_upload_then_download_roundtrip(fake_hub, tmp_path):
    files = _make_folder(tmp_path / "src")
    api = HfApi()

    url = api.create_repo("org/x")
    assert url == f"{FAKE_ENDPOINT}/org/x"
    assert url.repo_id == "org/x"
    api.create_repo("org/x", exist_ok=True)  # 409 path

    info = api.upload_folder(repo_id="org/x", folder_path=tmp_path / "src", commit_message="add weights")
    assert fake_hub.repos["org/x"] == files
    sha = fake_hub.head_sha("org/x")
    assert info.oid == sha

    model_info = api.model_info("org/x")
    assert model_info.sha == sha
    assert sorted(s.rfilename for s in model_info.siblings) == sorted(files)
    assert api.file_exists("org/x", "sub/model.safetensors")
    assert not api.file_exists("org/x", "missing.bin")
    assert sorted(api.list_repo_files("org/x")) == sorted(files)

    folder = Path(snapshot_download("org/x"))
    assert folder.is_relative_to(Path(constants.HF_HUB_CACHE))
    assert folder.name == sha
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == files

    path = hf_hub_download("org/x", "config.json", cache_dir=tmp_path / "other_cache")
    assert Path(path).read_bytes() == files["config.json"]

    # safetensors-only allow-list as the VARPipeline.download override will use
    folder2 = snapshot_download("org/x", allow_patterns=["*.safetensors"], cache_dir=tmp_path / "c3")
    assert [p.name for p in Path(folder2).rglob("*") if p.is_file()] == ["model.safetensors"]

    methods = {(m, u.split("?")[0].replace(FAKE_ENDPOINT, "")) for m, u in fake_hub.requests}
    assert ("POST", "/api/repos/create") in methods
    assert ("POST", "/api/models/org/x/commit/main") in methods
    assert ("GET", f"/org/x/resolve/{sha}/config.json") in methods or ("HEAD", "/org/x/resolve/main/config.json") in methods
    _assert_all_faked(fake_hub)


def test_second_commit_and_revisions(fake_hub, tmp_path):
    api = HfApi()
    api.create_repo("org/y")
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="org/y")
    sha1 = fake_hub.head_sha("org/y")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id="org/y")
    sha2 = fake_hub.head_sha("org/y")
    assert sha1 != sha2
    assert Path(hf_hub_download("org/y", "a.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download("org/y", "a.txt", revision=sha1)).read_bytes() == b"v1"
    # preupload reports the remote blob oid -> re-uploading identical bytes makes no commit
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id="org/y")
    assert fake_hub.head_sha("org/y") == sha2
    api.delete_file("a.txt", repo_id="org/y")
    assert fake_hub.repos["org/y"] == {}
    _assert_all_faked(fake_hub)


def test_errors(fake_hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    fake_hub.add_repo("org/z", {"config.json": "{}"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/z", "nope.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/z", revision="does-not-exist")
    # unknown routes are recorded and answered 404
    r = huggingface_hub.get_session().get(f"{FAKE_ENDPOINT}/api/agent-harnesses")
    assert r.status_code == 404
    assert ("GET", f"{FAKE_ENDPOINT}/api/agent-harnesses") in fake_hub.unhandled
    # a real TCP connect (anything bypassing the mocked client) is refused and recorded
    import socket

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert fake_hub.blocked_connections == [("127.0.0.1", 9)]


def test_offline_switch_still_honoured(fake_hub, monkeypatch):
    fake_hub.add_repo("org/o", {"config.json": "{}"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("org/o")


def test_factory_restored_after_fixture():
    from huggingface_hub.utils import _http

    assert _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory
    assert constants.ENDPOINT == _ORIGINAL_ENDPOINT
    assert constants.HF_HUB_CACHE == _ORIGINAL_CACHE
    assert huggingface_hub.hf_api.api.endpoint == _ORIGINAL_ENDPOINT
