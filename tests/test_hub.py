"""Repo-id loading and publishing, fully offline: an in-process fake Hub (tests/fake_hub.py) and a fake cache."""

from __future__ import annotations

import hashlib
import json
import shutil

import huggingface_hub
import pytest
import torch

from var_hf import VARPipeline
from var_hf.cli import main as cli_main

NAME = "var_tiny_64"


def sample_tokens(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[1], top_k=50, generator=torch.Generator().manual_seed(0), output_type="pt").scale_indices


def test_push_to_hub_then_from_pretrained_repo_id(fake_hub, golden_pipelines):
    pipe = golden_pipelines[NAME]
    pipe.push_to_hub("org/var-tiny")
    files = set(fake_hub.repos["org/var-tiny"])
    assert files == {
        "README.md",
        "model_index.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    }
    card = fake_hub.repos["org/var-tiny"]["README.md"].decode()
    assert "library_name: var-hf" in card and "VARPipeline.from_pretrained(\"org/var-tiny\"" in card
    loaded = VARPipeline.from_pretrained("org/var-tiny")
    assert all(torch.equal(a, b) for a, b in zip(sample_tokens(pipe), sample_tokens(loaded)))
    assert not fake_hub.blocked_connections


def test_pushing_an_already_saved_folder_names_the_repo_and_no_local_path(fake_hub, golden_pipelines, tmp_path):
    pipe = golden_pipelines[NAME]
    pipe.save_pretrained(tmp_path / "pipe")  # the card is written without a repo id first
    pipe.save_pretrained(tmp_path / "pipe", push_to_hub=True, repo_id="org/later", commit_message="first release")
    assert huggingface_hub.HfApi().list_repo_commits("org/later")[0].title == "first release"
    card = fake_hub.repos["org/later"]["README.md"].decode()
    assert 'VARPipeline.from_pretrained("org/later"' in card and "path/to/pipeline" not in card
    assert "path/to/pipeline" in (tmp_path / "pipe" / "README.md").read_text()  # the local folder is left as it was
    for name, content in fake_hub.repos["org/later"].items():
        if name.endswith(".json"):
            assert "_name_or_path" not in json.loads(content), name  # where it was loaded from stays local
            assert str(tmp_path) not in content.decode(), name


def test_push_as_pull_request_or_to_a_branch_leaves_main_alone(fake_hub, golden_pipelines, converted_pipelines, tmp_path):
    released, proposed = golden_pipelines[NAME], golden_pipelines["var_tiny_64_saln_legacy"]
    released.push_to_hub("org/var-pr")
    main_before = dict(fake_hub.repos["org/var-pr"])
    url = proposed.push_to_hub("org/var-pr", create_pr=True, commit_message="proposal")
    assert url.endswith("/org/var-pr/discussions/1")
    assert fake_hub.repos["org/var-pr"] == main_before  # main untouched
    refs = huggingface_hub.HfApi().list_repo_refs("org/var-pr", include_pull_requests=True)
    assert [pr.ref for pr in refs.pull_requests] == ["refs/pr/1"]
    assert huggingface_hub.HfApi().list_repo_commits("org/var-pr", revision="refs/pr/1")[0].title == "proposal"
    from_pr = VARPipeline.from_pretrained("org/var-pr", revision="refs/pr/1")
    from_main = VARPipeline.from_pretrained("org/var-pr")
    assert from_pr.transformer.config.shared_adaln and not from_main.transformer.config.shared_adaln
    assert all(torch.equal(a, b) for a, b in zip(sample_tokens(proposed), sample_tokens(from_pr)))
    # a further commit onto the open pull request (its ref is not a branch to create)
    released.push_to_hub("org/var-pr", revision="refs/pr/1", commit_message="revert to per-block AdaLN")
    assert huggingface_hub.HfApi().list_repo_commits("org/var-pr", revision="refs/pr/1")[0].title == "revert to per-block AdaLN"
    assert not VARPipeline.from_pretrained("org/var-pr", revision="refs/pr/1").transformer.config.shared_adaln
    assert fake_hub.repos["org/var-pr"] == main_before

    # a branch that does not exist yet is created from main, and main stays as it was
    folder = tmp_path / "pipe"
    shutil.copytree(converted_pipelines["var_tiny_64_saln_legacy"], folder)
    assert cli_main(["push", str(folder), "org/var-pr", "--revision", "dev"]) == 0
    assert fake_hub.repos["org/var-pr"] == main_before
    assert VARPipeline.from_pretrained("org/var-pr", revision="dev").transformer.config.shared_adaln
    assert cli_main(["push", str(folder), "org/var-pr", "--create-pr"]) == 0
    refs = huggingface_hub.HfApi().list_repo_refs("org/var-pr", include_pull_requests=True)
    assert sorted(pr.ref for pr in refs.pull_requests) == ["refs/pr/1", "refs/pr/2"]
    assert fake_hub.repos["org/var-pr"] == main_before
    assert not fake_hub.blocked_connections and not fake_hub.unhandled


def test_pull_request_against_a_branch_without_write_access(fake_hub, golden_pipelines, monkeypatch):
    """Creating the branch is forbidden (403) for a contributor; opening a pull request against it is not."""
    import httpx2

    pipe = golden_pipelines[NAME]
    pipe.push_to_hub("org/var-dev", revision="dev")  # the owner made the branch

    def forbidden(*args, **kwargs):
        request = httpx2.Request("POST", f"{fake_hub.endpoint}/api/models/org/var-dev/branch/dev")
        raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", forbidden)
    proposed = golden_pipelines["var_tiny_64_saln_legacy"]  # (pushing identical files would commit nothing)
    url = proposed.push_to_hub("org/var-dev", revision="dev", create_pr=True)
    assert url.endswith("/discussions/1")
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="403"):
        proposed.push_to_hub("org/var-dev", revision="dev")  # a direct commit needs the access it lacks


def test_cli_push_uploads_only_the_allow_list(fake_hub, converted_pipelines, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(converted_pipelines[NAME], folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"pickle bytes")
    (folder / "random_states_0.pkl").write_bytes(b"pickle bytes")
    (folder / "notes.txt").write_text("private")
    assert cli_main(["push", str(folder), "org/pushed"]) == 0
    uploaded = set(fake_hub.repos["org/pushed"])
    assert "model_index.json" in uploaded and "vqvae/diffusion_pytorch_model.safetensors" in uploaded
    assert not any(name.endswith((".bin", ".pkl", ".txt")) for name in uploaded)
    assert VARPipeline.from_pretrained("org/pushed").transformer.config.num_classes == 10


def test_repo_holding_only_pickles_is_refused(fake_hub, converted_pipelines, tmp_path):
    files = {p.relative_to(converted_pipelines[NAME]).as_posix(): p.read_bytes() for p in converted_pipelines[NAME].rglob("*") if p.is_file()}
    files.pop("transformer/model.safetensors")
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.bin")
    files["transformer/pytorch_model.bin"] = (tmp_path / "x.bin").read_bytes()
    fake_hub.add_repo("org/pickled", files)
    with pytest.raises(Exception) as error:
        VARPipeline.from_pretrained("org/pickled")
    assert "safetensors" in str(error.value) or "model.safetensors" in str(error.value)
    # the pickle was never downloaded
    downloaded = [url for method, url in fake_hub.requests if "pytorch_model.bin" in url and method == "GET"]
    assert downloaded == []


def _fake_cache(cache_dir, repo_id, folder):
    """A hub cache layout (refs, snapshots, trees) holding a saved pipeline, as `snapshot_download` leaves it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snapshot = root / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    tree = {}
    for path in snapshot.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            tree[path.relative_to(snapshot).as_posix()] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    (root / "trees").mkdir()
    (root / "trees" / f"{sha}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return root


@pytest.mark.parametrize("component", ["transformer", "vqvae"])
def test_components_load_safetensors_only(fake_hub, converted_pipelines, tmp_path, component):
    """`VARTransformer` / `MultiScaleVQModel` (and `AutoModel`) on their own: a folder or Hub repo whose weights are
    pickled is refused, and the pickle is neither read nor downloaded."""
    from transformers import AutoModel

    from var_hf import MultiScaleVQModel, PickleRefusedError, VARTransformer

    model_class = {"transformer": VARTransformer, "vqvae": MultiScaleVQModel}[component]
    source = converted_pipelines[NAME] / component
    weights = next(source.glob("*.safetensors"))
    pickled_name = {"transformer": "pytorch_model.bin", "vqvae": "diffusion_pytorch_model.bin"}[component]
    folder = tmp_path / component
    shutil.copytree(source, folder)
    (folder / weights.name).unlink()
    (folder / pickled_name).write_bytes(b"\x80\x04cos\nsystem\n.")  # never unpickled: refused by name first
    loaders = [model_class.from_pretrained] + ([AutoModel.from_pretrained] if component == "transformer" else [])
    for load in loaders:
        with pytest.raises(PickleRefusedError, match=pickled_name):
            load(folder)
    with pytest.raises(PickleRefusedError, match=pickled_name):  # the file named directly
        model_class.from_pretrained(folder / pickled_name, config=str(folder / "config.json"))
    with pytest.raises(ValueError, match="safetensors weights only"):
        model_class.from_pretrained(source, use_safetensors=False)
    fake_hub.add_repo(f"org/{component}-pickled", {p.name: p.read_bytes() for p in folder.iterdir()})
    with pytest.raises(Exception):  # no safetensors there (transformers also looks for the Hub's conversion PR first)
        model_class.from_pretrained(f"org/{component}-pickled")
    assert not [url for method, url in fake_hub.requests if pickled_name in url and method == "GET"]
    assert isinstance(model_class.from_pretrained(source), model_class)  # the safetensors folder still loads


def test_repo_id_from_offline_cache(converted_pipelines, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _fake_cache(cache, "org/cached", converted_pipelines[NAME])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pipe = VARPipeline.from_pretrained("org/cached", cache_dir=str(cache))
    assert pipe.transformer.config.num_hidden_layers == 2
    with pytest.raises(Exception):
        VARPipeline.from_pretrained("org/not-cached", cache_dir=str(cache))


def test_the_packaged_card_template_is_the_repository_one():
    """`model_card.md` at the repository root is the template users edit; the package ships it as
    `var_hf/templates/model_card.md` (what `render_model_card` reads). The two must not drift apart."""
    from pathlib import Path

    from var_hf.model_card import TEMPLATE_PATH

    root_template = Path(__file__).resolve().parents[1] / "model_card.md"
    assert TEMPLATE_PATH.read_text() == root_template.read_text()
