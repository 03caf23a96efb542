"""Publishing pipelines to the Hugging Face Hub: an allow-list upload that never sends pickles."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from .model_card import PLACEHOLDER_REPO_ID
from .safety import check_folder_has_no_pickles

# What a published pipeline consists of (uploaded and downloaded); optimizer/RNG states, checkpoints, code stay local.
UPLOAD_ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md"]
DEFAULT_COMMIT_MESSAGE = "Upload VAR pipeline (var-hf)"


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """
    Create `repo_id` if needed and upload the pipeline in `folder` (configs, safetensors, card) as one commit to
    `revision` (default `main`; a missing branch is created), or as a pull request against it with `create_pr=True`.
    Returns the commit URL, or the pull request's URL.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a pipeline folder (no model_index.json)")
    for sub in ("transformer", "vqvae"):
        if not (folder / sub).is_dir():
            raise ValueError(f"{folder} lacks the {sub}/ component")
        check_folder_has_no_pickles(folder / sub)
    card = folder / "README.md"
    if not card.is_file():
        from .model_card import write_model_card
        from .pipeline_var import VARPipeline

        write_model_card(folder, VARPipeline.from_pretrained(folder), repo_id=repo_id)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    operations = []
    for name in filter_repo_objects(files, allow_patterns=UPLOAD_ALLOW_PATTERNS):
        content: bytes | Path = folder / name
        if name == "README.md":  # a card written before the repo was known names it in the upload (the folder is left as is)
            content = card.read_text(encoding="utf-8").replace(PLACEHOLDER_REPO_ID, repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not revision.startswith("refs/pr/"):  # as transformers: a new branch starts from main
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        except HfHubHTTPError as error:  # without write access a pull request can still be opened against it
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    info = api.create_commit(
        repo_id, operations=operations, commit_message=commit_message, revision=revision, create_pr=create_pr, repo_type="model"
    )
    if create_pr and getattr(info, "pr_url", None):
        return str(info.pr_url)
    return str(getattr(info, "commit_url", info))


__all__ = ["push_folder_to_hub", "UPLOAD_ALLOW_PATTERNS", "DEFAULT_COMMIT_MESSAGE"]
