"""In-process fake Hugging Face Hub for offline tests (see hf_integration.md §6.2, layer 3).

Usage (in ``tests/conftest.py`` or a test module)::

    from fake_hub import fake_hub  # noqa: F401  (re-exports the pytest fixture)

    def test_push(fake_hub):
        HfApi().create_repo("org/x")
        ...
        assert fake_hub.repos["org/x"]["config.json"] == b"..."

What the fixture does (all undone on teardown by ``monkeypatch``):

* points ``huggingface_hub.constants.ENDPOINT`` (and every module that copied it at import time, e.g. the
  module-level ``huggingface_hub.hf_api.api`` instance and ``diffusers.utils.constants``) at
  ``http://127.0.0.1:9`` -- a closed port, so anything that escapes the mock fails fast;
* sets ``HF_TOKEN=hf_fake`` and moves ``HF_HOME`` / ``HF_HUB_CACHE`` / token / xet / assets paths into a
  tmp dir (constants *and* env vars, so subprocesses inherit them); forces ``HF_HUB_OFFLINE=False`` and
  ``HF_HUB_DISABLE_TELEMETRY=True``;
* installs ``huggingface_hub.set_client_factory`` (and the async one) returning an
  ``httpx2.Client(transport=httpx2.MockTransport(handler))`` that keeps hub's request event hook, so flipping
  ``huggingface_hub.constants.HF_HUB_OFFLINE`` inside a test still raises ``OfflineModeIsEnabled``;
* blocks Python-level non-AF_UNIX socket connects (``ConnectionRefusedError``), recorded in
  ``.blocked_connections``.

The yielded :class:`FakeHub` exposes ``.repos`` (repo key -> {path: bytes}, current ``main``; key is the repo id
for models and ``"datasets/<id>"`` / ``"spaces/<id>"`` otherwise), ``.requests`` (list of ``(method, url)``),
``.unhandled`` (requests answered with the catch-all 404), ``.endpoint``, ``.token``, ``.hf_home``,
``.cache_dir`` and helpers ``add_repo`` / ``head_sha``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

FAKE_ENDPOINT = "http://127.0.0.1:9"
FAKE_TOKEN = "hf_fake"
FAKE_USER = "fake-user"

_REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NOW = "2024-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    """Git blob OID, which is what the Hub reports as ``oid`` / ``ETag`` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)
    n_prs: int = 0

    @property
    def key(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> _Commit | None:
        revision = unquote(revision)
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        if sha is None and len(revision) >= 7:  # short sha
            matches = [s for s in self.commits if s.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None


def _json_response(httpx2: Any, data: Any, status: int = 200, headers: dict | None = None):
    return httpx2.Response(status, json=data, headers=headers or {})


def _error(httpx2: Any, status: int, code: str | None, message: str):
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return httpx2.Response(status, json={"error": message}, headers=headers)


class FakeHub:
    """In-memory Hub store + ``httpx2`` handler. Thread-safe (downloads run in a thread pool)."""

    def __init__(self, endpoint: str = FAKE_ENDPOINT, token: str = FAKE_TOKEN, hf_home: Path | None = None):
        import httpx2

        self._httpx2 = httpx2
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.hf_home = Path(hf_home) if hf_home is not None else None
        self.cache_dir = self.hf_home / "hub" if self.hf_home is not None else None
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.blocked_connections: list[Any] = []
        self.patched_modules: list[str] = []  # module globals re-pointed by install_fake_hub
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0

    # ------------------------------------------------------------------ public helpers
    @property
    def repos(self) -> dict[str, dict[str, bytes]]:
        """repo key -> {path: bytes} of the current ``main`` (a fresh snapshot on each access)."""
        with self._lock:
            out = {}
            for repo in self._repos.values():
                head = repo.resolve("main")
                out[repo.key] = dict(head.files) if head else {}
            return out

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        repo_type: str = "model",
        message: str = "seed",
    ) -> str:
        """Create (or add a commit to) a repo directly, without HTTP. Returns the new head sha of ``main``."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create(repo_id, repo_type)
            if files:
                head = repo.resolve("main")
                new = dict(head.files)
                new.update({p: (c.encode() if isinstance(c, str) else bytes(c)) for p, c in files.items()})
                self._commit(repo, "main", new, message, "")
            return repo.branches["main"]

    def head_sha(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
            assert commit is not None, f"unknown revision {revision!r}"
            return commit.sha

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ------------------------------------------------------------------ client factories
    def client_factory(self):
        from huggingface_hub.utils import _http

        return self._httpx2.Client(
            transport=self._httpx2.MockTransport(self.handler),
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    def async_client_factory(self):
        from huggingface_hub.utils import _http

        return self._httpx2.AsyncClient(
            transport=self._httpx2.MockTransport(self.handler),
            event_hooks={"request": [_http.async_hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    # ------------------------------------------------------------------ store internals
    def _create(self, repo_id: str, repo_type: str, private: bool = False) -> _Repo:
        repo = _Repo(repo_id=repo_id, repo_type=repo_type, private=private)
        self._repos[(repo_type, repo_id)] = repo
        self._commit(repo, "main", {}, "initial commit", "", parent=None)
        return repo

    def _commit(self, repo: _Repo, branch: str, files: dict[str, bytes], title: str, message: str, parent="head"):
        if parent == "head":
            parent = repo.branches.get(branch)
        self._counter += 1
        h = hashlib.sha1()
        h.update(f"{repo.key}\0{branch}\0{parent}\0{self._counter}\0{title}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        sha = h.hexdigest()
        repo.commits[sha] = _Commit(sha=sha, parent=parent, title=title, message=message, files=dict(files))
        repo.branches[branch] = sha
        return sha

    # ------------------------------------------------------------------ HTTP handler
    def handler(self, request):
        with self._lock:
            self.requests.append((request.method, str(request.url)))
        try:
            response = self._dispatch(request)
        except Exception as exc:  # surface bugs of the fake as 500 with the message
            response = _error(self._httpx2, 500, None, f"fake hub error: {type(exc).__name__}: {exc}")
        if response is None:
            with self._lock:
                self.unhandled.append((request.method, str(request.url)))
            response = _error(self._httpx2, 404, None, f"fake hub: no route for {request.method} {request.url.path}")
        return response

    def _dispatch(self, request):
        raw = request.url.raw_path.decode("ascii").split("?", 1)[0]
        segs = [unquote(s) for s in raw.strip("/").split("/")]
        method = request.method
        query = dict(request.url.params)

        if segs[:1] == ["api"]:
            return self._api(method, segs[1:], request, query)
        # resolve: /[datasets|spaces/]{ns}/{name}/resolve/{rev}/{path...}
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = segs[0][:-1]
            segs = segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), request)
        return None

    # ---- /api/...
    def _api(self, method, segs, request, query):
        httpx2 = self._httpx2
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(json.loads(request.content or b"{}"))
        if segs == ["repos", "delete"] and method == "DELETE":
            body = json.loads(request.content or b"{}")
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or FAKE_USER}/{body['name']}"
            with self._lock:
                if self._repos.pop((repo_type, repo_id), None) is None:
                    return _error(httpx2, 404, "RepoNotFound", "Repository not found")
            return httpx2.Response(200)
        if segs == ["validate-yaml"] and method == "POST":
            return _json_response(httpx2, {"errors": [], "warnings": []})
        if segs == ["whoami-v2"] and method == "GET":
            return _json_response(
                httpx2,
                {
                    "type": "user",
                    "name": FAKE_USER,
                    "fullname": "Fake User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
                },
            )
        if len(segs) >= 3 and segs[0] in ("models", "datasets", "spaces"):
            repo_type = segs[0][:-1]
            repo_id = f"{segs[1]}/{segs[2]}"
            rest = segs[3:]
            with self._lock:
                repo = self._repos.get((repo_type, repo_id))
                if repo is None:
                    return _error(httpx2, 404, "RepoNotFound", f"Repository not found: {repo_id}")
                return self._repo_api(method, repo, rest, request, query)
        return None

    def _create_repo(self, body: dict):
        httpx2 = self._httpx2
        repo_type = body.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            return _error(httpx2, 400, None, f"invalid repo type {repo_type}")
        name = body["name"]
        repo_id = name if "/" in name else f"{body.get('organization') or FAKE_USER}/{name}"
        url = self.repo_url(repo_id, repo_type)
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                return _json_response(
                    httpx2, {"error": f"You already created this {repo_type} repo", "url": url}, status=409
                )
            self._create(repo_id, repo_type, private=body.get("visibility") == "private" or bool(body.get("private")))
        return _json_response(httpx2, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_api(self, method, repo: _Repo, rest, request, query):
        httpx2 = self._httpx2
        # GET /api/{t}s/{repo}  |  /revision/{rev}
        if method == "GET" and (not rest or rest[0] == "revision"):
            rev = "/".join(rest[1:]) if rest else "main"
            commit = repo.resolve(rev)
            if commit is None:
                return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return _json_response(httpx2, self._info(repo, commit))
        if not rest:
            return None
        op = rest[0]
        if op == "preupload" and method == "POST":
            rev = "/".join(rest[1:]) or "main"
            commit = repo.resolve(rev)
            if commit is None and not query.get("create_pr"):
                return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            existing = commit.files if commit else {}
            body = json.loads(request.content or b"{}")
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None,
                }
                for f in body.get("files", [])
            ]
            return _json_response(httpx2, {"files": files, "commitOid": commit.sha if commit else None})
        if op == "commit" and method == "POST":
            return self._commit_endpoint(repo, "/".join(rest[1:]) or "main", request, query)
        if op == "tree" and method == "GET":
            rev, path = rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])
            commit = repo.resolve(rev)
            if commit is None:
                return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            entries = self._tree(commit, path, recursive=query.get("recursive") in ("1", "true", "True"))
            if entries is None:
                return _error(httpx2, 404, "EntryNotFound", f"{path} does not exist on {rev}")
            return _json_response(httpx2, entries)
        if op == "paths-info" and method == "POST":
            rev = "/".join(rest[1:]) or "main"
            commit = repo.resolve(rev)
            if commit is None:
                return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            form = parse_qs((request.content or b"").decode())
            paths = form.get("paths", [])
            if not paths and request.headers.get("content-type", "").startswith("application/json"):
                paths = json.loads(request.content).get("paths", [])
            out = []
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(self._file_entry(p, commit.files[p]))
                elif any(f.startswith(p + "/") for f in commit.files):
                    out.append(self._dir_entry(p, commit))
            return _json_response(httpx2, out)
        if op == "refs" and method == "GET":
            return _json_response(
                httpx2,
                {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                        for b, s in repo.branches.items()
                        if not b.startswith("refs/pr/")
                    ],
                    "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()],
                    "converts": [],
                    "pullRequests": [
                        {"name": b, "ref": b, "targetCommit": s}
                        for b, s in repo.branches.items()
                        if b.startswith("refs/pr/")
                    ]
                    if query.get("include_prs")
                    else None,
                },
            )
        if op == "commits" and method == "GET":
            commit = repo.resolve("/".join(rest[1:]) or "main")
            if commit is None:
                return _error(httpx2, 404, "RevisionNotFound", "Invalid rev id")
            out = []
            while commit is not None:
                out.append(
                    {"id": commit.sha, "title": commit.title, "message": commit.message, "authors": [], "date": _NOW}
                )
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return _json_response(httpx2, out)
        if op == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            branch = "/".join(rest[1:])
            if method == "DELETE":
                if repo.branches.pop(branch, None) is None:
                    return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {branch}")
                return httpx2.Response(200)
            if branch.startswith("refs/"):  # the Hub refuses branch names under refs/ (e.g. refs/pr/1) with a 400
                return _error(httpx2, 400, None, f"Invalid reference for a branch: {branch}")
            body = json.loads(request.content or b"{}")
            start = repo.resolve(body.get("startingPoint") or "main")
            if start is None:
                return _error(httpx2, 404, "RevisionNotFound", "Invalid starting point")
            if branch in repo.branches:
                return _error(httpx2, 409, None, f"Reference already exists: {branch}")
            repo.branches[branch] = start.sha
            return httpx2.Response(200)
        return None

    def _commit_endpoint(self, repo: _Repo, revision: str, request, query):
        httpx2 = self._httpx2
        lines = [json.loads(line) for line in (request.content or b"").splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        create_pr = query.get("create_pr") in ("1", "true", "True")
        base = repo.resolve(revision)
        if base is None:
            return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != base.sha:
            return _error(httpx2, 412, None, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                continue
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    return _error(httpx2, 400, None, f"unsupported encoding {value.get('encoding')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return _error(httpx2, 404, "EntryNotFound", f"{value['path']} does not exist")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:  # lfsFile / anything else: the fake never asks for LFS uploads
                return _error(httpx2, 422, None, f"fake hub does not support commit operation {key!r}")
        pr_url = None
        if create_pr:
            repo.n_prs += 1
            branch = f"refs/pr/{repo.n_prs}"
            sha = self._commit(repo, branch, files, header.get("summary", ""), header.get("description", ""), base.sha)
            pr_url = f"{self.repo_url(repo.repo_id, repo.repo_type)}/discussions/{repo.n_prs}"
        else:
            branch = unquote(revision)
            if branch not in repo.branches:  # committing on a sha / tag: not allowed on the Hub
                return _error(httpx2, 400, None, f"Invalid rev id: {revision} is not a branch")
            sha = self._commit(repo, branch, files, header.get("summary", ""), header.get("description", ""))
        return _json_response(
            httpx2,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.repo_url(repo.repo_id, repo.repo_type)}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    def _info(self, repo: _Repo, commit: _Commit) -> dict:
        info = {
            "_id": hashlib.md5(repo.key.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": _NOW,
            "createdAt": _NOW,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in sorted(commit.files.items())
            ],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict:
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}

    @staticmethod
    def _dir_entry(path: str, commit: _Commit) -> dict:
        oid = hashlib.sha1(f"tree\0{commit.sha}\0{path}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _tree(self, commit: _Commit, path: str, recursive: bool) -> list[dict] | None:
        path = path.strip("/")
        prefix = path + "/" if path else ""
        under = sorted(p for p in commit.files if p.startswith(prefix))
        if path and not under:
            return None
        entries: dict[str, dict] = {}
        for p in under:
            rel = p[len(prefix) :].split("/")
            # folders along the way
            for depth in range(1, len(rel)):
                if not recursive and depth > 1:
                    break
                d = prefix + "/".join(rel[:depth])
                entries.setdefault(d, self._dir_entry(d, commit))
            if recursive or len(rel) == 1:
                entries[p] = self._file_entry(p, commit.files[p])
        return [entries[k] for k in sorted(entries)]

    # ---- /{repo}/resolve/{rev}/{path}
    def _resolve(self, method, repo_type, repo_id, revision, path, request):
        httpx2 = self._httpx2
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                return _error(httpx2, 404, "RepoNotFound", f"Repository not found: {repo_id}")
            commit = repo.resolve(revision)
            if commit is None:
                return _error(httpx2, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            data = commit.files.get(path)
        if data is None:
            response = _error(httpx2, 404, "EntryNotFound", "Entry not found")
            response.headers["X-Repo-Commit"] = commit.sha
            return response
        headers = {
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.sha,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        status, body = 200, data
        rng = request.headers.get("range")
        if rng and rng.startswith("bytes=") and method == "GET":
            start_s, _, end_s = rng[len("bytes=") :].split(",")[0].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if (start_s and end_s) else len(data) - 1
            body = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if method == "HEAD":
            # httpx2 would otherwise recompute Content-Length from the (empty) body
            response = httpx2.Response(status, headers=headers)
            response.headers["Content-Length"] = str(len(body))
            return response
        return httpx2.Response(status, headers=headers, content=body)


# ---------------------------------------------------------------------- installation


_ENDPOINT_NAMES = ("ENDPOINT", "HUGGINGFACE_CO_RESOLVE_ENDPOINT")
_PATCHED_PACKAGES = ("huggingface_hub", "diffusers", "transformers", "accelerate", "var_hf")


def _patch_copied_constants(monkeypatch, replacements: dict[str, tuple[Any, Any]]) -> list[str]:
    """Patch module globals that copied hub constants at import (``from ...constants import X``).

    ``replacements``: name -> (old value, new value). Only globals whose current value equals the old value are
    patched. Reads ``module.__dict__`` directly so lazy modules (transformers) are not triggered."""
    patched = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(_PATCHED_PACKAGES):
            continue
        if mod_name == "huggingface_hub.constants":
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, (old, new) in replacements.items():
            if name in namespace and type(namespace[name]) is type(old) and namespace[name] == old and old != new:
                monkeypatch.setattr(module, name, new)
                patched.append(f"{mod_name}.{name}")
    return patched


def install_fake_hub(monkeypatch, tmp_dir: Path, endpoint: str = FAKE_ENDPOINT, token: str = FAKE_TOKEN,
                     block_sockets: bool = True) -> FakeHub:
    """Install a :class:`FakeHub` using ``monkeypatch`` (everything is reverted by ``monkeypatch.undo()``),
    except the client factories, which the caller must restore (the fixture does)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hf_home = Path(tmp_dir) / "hf_home"
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    hub = FakeHub(endpoint=endpoint, token=token, hf_home=hf_home)
    endpoint = hub.endpoint
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()

    # --- env (for subprocesses and for values read lazily from os.environ)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
              "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(k, raising=False)

    # --- huggingface_hub.constants (read once at import)
    old = {name: getattr(constants, name) for name in ("ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE",
                                                       "HUGGINGFACE_CO_URL_TEMPLATE")}
    const_values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {host}),
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "default_cache_path": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "default_assets_cache_path": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "default_xet_cache_path": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in const_values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # --- copies made at import time elsewhere (hub's module-level `api`, diffusers constants, ...)
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    hub.patched_modules = _patch_copied_constants(
        monkeypatch,
        {
            **{name: (old["ENDPOINT"], endpoint) for name in _ENDPOINT_NAMES},
            "HUGGINGFACE_CO_URL_TEMPLATE": (old["HUGGINGFACE_CO_URL_TEMPLATE"],
                                            const_values["HUGGINGFACE_CO_URL_TEMPLATE"]),
            "HF_HUB_CACHE": (old["HF_HUB_CACHE"], str(hub_cache)),
            "HUGGINGFACE_HUB_CACHE": (old["HF_HUB_CACHE"], str(hub_cache)),
            "HF_HOME": (old["HF_HOME"], str(hf_home)),
            "HF_HUB_OFFLINE": (old["HF_HUB_OFFLINE"], False),
        },
    )
    # diffusers keeps the resolve endpoint only for error messages, but keep it consistent when it was set by env
    for mod_name in ("diffusers.utils.constants", "diffusers.utils", "diffusers.utils.hub_utils",
                     "diffusers.configuration_utils"):
        module = sys.modules.get(mod_name)
        if module is not None and "HUGGINGFACE_CO_RESOLVE_ENDPOINT" in module.__dict__:
            monkeypatch.setattr(module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint)
    hub_utils = sys.modules.get("diffusers.utils.hub_utils")
    if hub_utils is not None and "HF_HUB_DISABLE_TELEMETRY" in hub_utils.__dict__:
        monkeypatch.setattr(hub_utils, "HF_HUB_DISABLE_TELEMETRY", True)

    try:
        from huggingface_hub.utils._hf_uris import parse_hf_uri

        parse_hf_uri.cache_clear()
    except (ImportError, AttributeError):
        pass

    # --- belt and braces: no real (non-unix) socket may connect while the fake hub is installed
    if block_sockets:
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex

        def _blocked(sock, address):
            if sock.family == getattr(socket, "AF_UNIX", object()):
                return False
            hub.blocked_connections.append(address)
            return True

        def guarded_connect(sock, address):
            if _blocked(sock, address):
                raise ConnectionRefusedError(f"fake_hub: real network access blocked ({address!r})")
            return real_connect(sock, address)

        def guarded_connect_ex(sock, address):
            if _blocked(sock, address):
                return 111  # ECONNREFUSED
            return real_connect_ex(sock, address)

        monkeypatch.setattr(socket.socket, "connect", guarded_connect)
        monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)

    # --- HTTP clients
    huggingface_hub.set_client_factory(hub.client_factory)
    if hasattr(huggingface_hub, "set_async_client_factory"):
        huggingface_hub.set_async_client_factory(hub.async_client_factory)
    hub._restore_factories = lambda: _restore_factories(_http)
    return hub


def _restore_factories(_http) -> None:
    import huggingface_hub

    huggingface_hub.set_client_factory(_http.default_client_factory)  # also closes the fake session
    if hasattr(huggingface_hub, "set_async_client_factory"):
        huggingface_hub.set_async_client_factory(_http.default_async_client_factory)
    try:
        from huggingface_hub.utils._hf_uris import parse_hf_uri

        parse_hf_uri.cache_clear()
    except (ImportError, AttributeError):
        pass


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Yield a :class:`FakeHub`; the hub library talks to it instead of the network for the test's duration."""
    hub = install_fake_hub(monkeypatch, tmp_path)
    try:
        yield hub
    finally:
        hub._restore_factories()
        # monkeypatch (function-scoped, set up before this fixture) undoes constants/env after this teardown


__all__ = ["FAKE_ENDPOINT", "FAKE_TOKEN", "FakeHub", "fake_hub", "git_blob_sha1", "install_fake_hub"]
