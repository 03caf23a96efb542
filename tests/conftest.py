"""Shared fixtures: the golden upstream models converted to var-hf pipelines, offline Hub switches."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_DISABLE_REMOTE_CODE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import fake_hub  # noqa: E402,F401  (pytest fixture)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_MODELS = {
    # folder: (VQVAE source folder, converter overrides)
    "var_tiny_64": ("var_tiny_64", {}),
    "var_tiny_64_saln_legacy": ("var_tiny_64", {"num_heads": 4}),  # legacy attention: heads not in the weights
}


def golden_files(name: str) -> dict[str, Path]:
    vae_folder, _ = GOLDEN_MODELS[name]
    return {
        "vae": GOLDEN / vae_folder / "vae_state.safetensors",
        "var": GOLDEN / name / "var_state.safetensors",
        "expected": GOLDEN / name / "expected.safetensors",
        "config": GOLDEN / name / "config.json",
    }


def golden_config(name: str) -> dict:
    return json.loads(golden_files(name)["config"].read_text())


@pytest.fixture(scope="session")
def converted_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Both golden models converted once per session with the project's converter."""
    from var_hf.convert_var_original import convert_to_pipeline_folder

    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for name, (_, overrides) in GOLDEN_MODELS.items():
        files = golden_files(name)
        folders[name] = convert_to_pipeline_folder(files["vae"], files["var"], root / name, log=lambda *_: None, **overrides)
    return folders


@pytest.fixture(scope="session")
def golden_pipelines(converted_pipelines):
    from var_hf import VARPipeline

    pipes = {}
    for name, folder in converted_pipelines.items():
        pipe = VARPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes
