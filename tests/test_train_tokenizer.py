"""Tokenizer training (`pipelines/train_tokenizer.py`, `var_hf.training_tokenizer`) on crops of real photos, CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from var_hf import MultiScaleVQModel
from var_hf.training_tokenizer import (
    CodebookUsageTracker,
    FeatureNetworkPerceptualLoss,
    load_tokenizer_image_dataset,
    multiscale_vq_training_forward,
    restart_dead_codes,
    sample_restart_vectors,
    vgg16_perceptual_state_dict,
)

skimage_data = pytest.importorskip("skimage.data")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # robust under --import-mode=importlib too
from fake_hub import fake_hub  # noqa: F401  (fixture re-export)

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat"]
# Small tokenizer: 16 px, latent 8×8 (channel_multipliers 1,2), four scales. base_channels 64 keeps two channels per
# GroupNorm group in the decoder's last stage (32 would be instance normalisation, which cannot carry flat colours).
TINY = ["--resolution", "16", "--patch_nums", "1,2,4,8", "--channel_multipliers", "1,2", "--base_channels", "64",
        "--num_res_blocks", "1", "--codebook_size", "128", "--latent_channels", "8", "--report_to", "none"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_tokenizer_recipe", REPO / "pipelines" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """`main` runs in-process several times: start each test with fresh Accelerate singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    logging.disable(logging.NOTSET)


def write_crops(folder: Path, count: int, seed: int, size: int = 48) -> Path:
    """Random square crops (side 48 px .. a third of the photo) of skimage's colour photos, resized to `size`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage_data, name)()[..., :3] for name in PHOTOS]
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(size, min(height, width) // 3))
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        crop = PIL.Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), PIL.Image.BICUBIC)
        crop.save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def photo_crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    return write_crops(root / "train", 64, seed=0), write_crops(root / "val", 16, seed=1)


def held_out_images(val_dir: Path) -> torch.Tensor:
    dataset = load_tokenizer_image_dataset(train_data_dir=str(val_dir), resolution=16, random_crop=False)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------- training forward
def tiny_model(**overrides) -> MultiScaleVQModel:
    torch.manual_seed(0)
    config = {"codebook_size": 64, "latent_channels": 8, "base_channels": 32, "channel_multipliers": (1, 2), "num_res_blocks": 1, "patch_nums": (1, 2, 4, 8)}
    config.update(overrides)
    return MultiScaleVQModel(**config)


def test_training_forward_matches_inference_quantization_and_routes_gradients():
    model = tiny_model()
    with torch.no_grad():
        model.quantizer.embedding.weight.mul_(0.1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = multiscale_vq_training_forward(model, images)
    with torch.no_grad():
        encoded = model.encode(images)
        expected = model.decoder(model.post_quant_conv(encoded.f_hat))
    # forward value: the decoder sees exactly the inference f_hat (straight-through only changes the gradient)
    torch.testing.assert_close(out.reconstruction, expected, rtol=1e-4, atol=1e-5)
    hits = torch.stack([torch.bincount(i.flatten(), minlength=64) for i in encoded.scale_indices]).float()
    torch.testing.assert_close(out.scale_code_hits, hits)
    assert out.code_hits.sum() == sum(2 * pn * pn for pn in model.patch_nums)
    assert out.restart_candidates.shape == (2 * 8 * 8, 8)

    model.zero_grad()
    out.vq_loss.backward(retain_graph=True)
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0  # codebook term
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term
    assert model.decoder.conv_out.weight.grad is None  # the VQ loss does not touch the decoder
    model.zero_grad()
    out.reconstruction.square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator reaches the encoder
    assert model.quantizer.embedding.weight.grad is None or model.quantizer.embedding.weight.grad.abs().sum() == 0


def test_codebook_usage_tracker_and_dead_code_restart():
    tracker = CodebookUsageTracker(8, dead_after_steps=3)
    hits = torch.tensor([5.0, 3, 0, 0, 0, 0, 0, 0])
    for step in (1, 2):
        stats = tracker.update(hits, step)
        assert tracker.dead_codes(step).numel() == 0
    assert stats["codebook/usage"] == pytest.approx(2 / 8)
    assert stats["codebook/perplexity"] == pytest.approx(float(torch.exp(-(torch.tensor([5 / 8, 3 / 8]) * torch.tensor([5 / 8, 3 / 8]).log()).sum())))
    tracker.update(hits, 3)
    dead = tracker.dead_codes(3)
    assert dead.tolist() == [2, 3, 4, 5, 6, 7]

    model = tiny_model(codebook_size=8)
    candidates = torch.randn(20, 8) * 3
    new = sample_restart_vectors(candidates, dead.numel(), torch.Generator().manual_seed(0))
    before = model.quantizer.embedding.weight.detach().clone()
    restart_dead_codes(model, dead, new)
    after = model.quantizer.embedding.weight.detach()
    torch.testing.assert_close(after[:2], before[:2])
    distances = torch.cdist(after[2:], candidates).min(dim=1).values
    assert (distances < 0.2).all()  # each restarted code sits on an encoder output (plus 1 % noise)
    tracker.mark_restarted(dead, 3)
    assert tracker.dead_codes(4).numel() == 0 and tracker.total_restarts == 6
    state = tracker.state_dict()
    copy = CodebookUsageTracker(8, 3)
    copy.load_state_dict(state)
    assert torch.equal(copy.last_used_step, tracker.last_used_step) and copy.total_restarts == 6


def test_perceptual_loss_key_layouts(tmp_path):
    state = vgg16_perceptual_state_dict(seed=0, channels=(8, 16, 16, 32, 32))
    loss = FeatureNetworkPerceptualLoss.from_state_dict(state)
    assert loss.taps == [1, 3, 6, 9, 12] and loss.min_resolution == 16
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    assert (loss(x, y) > 0).all()
    # the lpips package's layout: net.slice<k>.<index>.*, lin<k>.model.1.weight (+ the duplicate lins.<k>.* entries)
    slices = {1: range(4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
    lpips_state = {}
    for key, value in state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            k = next(k for k, r in slices.items() if index in r)
            lpips_state[f"net.slice{k}.{key[len('features.'):]}"] = value
        else:
            lpips_state[key] = value
            lpips_state["lins." + key[3:]] = value.clone()
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(lpips_state, str(path))
    torch.testing.assert_close(FeatureNetworkPerceptualLoss.from_safetensors(path)(x, y), loss(x, y))
    with pytest.raises(ValueError, match="no VGG feature convolutions"):
        FeatureNetworkPerceptualLoss.from_state_dict({"lin0.model.1.weight": torch.ones(1, 8, 1, 1)})


# ------------------------------------------------------------------------------------------------- recipe
def test_training_lowers_error_below_mean_colour_and_exports_safetensors(recipe, photo_crops, tmp_path):
    train_dir, val_dir = photo_crops
    out = tmp_path / "tok"
    logging.disable(logging.INFO)
    started = time.perf_counter()
    result = recipe.main([
        "--train_data_dir", str(train_dir), "--validation_data_dir", str(val_dir), "--num_validation_images", "16",
        "--output_dir", str(out), *TINY, "--train_batch_size", "8", "--max_train_steps", "100", "--learning_rate", "3e-4",
        "--dead_code_steps", "10", "--seed", "0", "--checkpointing_steps", "0", "--validation_steps", "50",
    ])
    assert result["global_step"] == 100
    whole_run_img_per_s = 100 * 8 / (time.perf_counter() - started)  # setup, validations and export included
    assert whole_run_img_per_s / 10 < result["logs"]["img_per_s"] < 50 * whole_run_img_per_s  # the last step's rate: sane units

    # export: only json + safetensors at the top level, reloadable with from_pretrained
    top_files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert top_files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(out.rglob("*.bin")) or all("checkpoint-" in str(p) for p in out.rglob("*.bin"))
    model = MultiScaleVQModel.from_pretrained(out).eval()
    assert model.patch_nums == [1, 2, 4, 8] and model.config.codebook_size == 128 and model.resolution == 16
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_0000000.png", "step_0000050.png", "step_0000100.png"]

    # held-out real crops: error drops clearly versus the initial model and ends clearly below the mean-colour baseline
    images = held_out_images(val_dir)
    with torch.no_grad():
        final_mse = F.mse_loss(model(images).sample, images).item()
        tokens = model.encode_scales(images)
    mean_colour_mse = F.mse_loss(images.mean(dim=(2, 3), keepdim=True).expand_as(images), images).item()
    initial_mse = result["initial_validation"]["val/mse"]
    assert result["validation"]["val/mse"] == pytest.approx(final_mse, rel=1e-4)
    assert final_mse < 0.7 * initial_mse, (initial_mse, final_mse)
    assert final_mse < 0.8 * mean_colour_mse, (mean_colour_mse, final_mse)
    assert len(torch.cat([t.flatten() for t in tokens]).unique()) >= 16  # the codebook is in use
    logs = result["logs"]
    assert 0 < logs["codebook/usage"] <= 1 and logs["codebook/perplexity"] > 4 and logs["loss/vq"] > 0


def test_resume_latest_continues_exactly(recipe, photo_crops, tmp_path):
    train_dir, val_dir = photo_crops
    common = [
        "--train_data_dir", str(train_dir), "--validation_data_dir", str(val_dir), "--num_validation_images", "4",
        "--resolution", "16", "--patch_nums", "1,2,4,8", "--channel_multipliers", "1,2", "--base_channels", "32",
        "--num_res_blocks", "1", "--codebook_size", "64", "--latent_channels", "8", "--train_batch_size", "4",
        "--learning_rate", "1e-3", "--dead_code_steps", "2", "--seed", "3", "--checkpointing_steps", "3", "--validation_steps", "0",
    ]
    logging.disable(logging.INFO)
    straight = recipe.main(common + ["--output_dir", str(tmp_path / "a"), "--max_train_steps", "6", "--report_to", "none"])
    assert straight["global_step"] == 6

    out = tmp_path / "b"
    first = recipe.main(common + ["--output_dir", str(out), "--max_train_steps", "3", "--report_to", "tensorboard"])
    assert first["global_step"] == 3 and (out / "checkpoint-3" / "training_state.json").is_file()
    assert (out / "checkpoint-3" / "codebook_usage.safetensors").is_file()
    (out / "checkpoint-5").mkdir()  # a crashed save: no completion marker, must be ignored
    (out / "checkpoint-5" / "model.safetensors").write_bytes(b"partial")
    for path in (out / "checkpoint-3").iterdir():
        assert path.suffix in {".json", ".safetensors", ".bin", ".pkl"}, path

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = recipe.main(common + ["--output_dir", str(out), "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--report_to", "tensorboard"])
    assert resumed["initial_global_step"] == 3 and resumed["global_step"] == 6
    assert (out / "checkpoint-6" / "training_state.json").is_file()
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6
    assert list((out / "logs").rglob("events.out.tfevents*"))

    # 3 + 3 resumed steps give the same tokenizer as 6 straight steps (data order, augmentations, optimizer, codebook usage)
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed["logs"]["codebook/total_restarts"] == straight["logs"]["codebook/total_restarts"]

    # another run's checkpoint (pickled accelerate state) is never loaded, even when complete
    foreign = tmp_path / "elsewhere" / "checkpoint-3"
    shutil.copytree(out / "checkpoint-3", foreign)
    with pytest.raises(ValueError, match="only from this run's own"):
        recipe.main(common + ["--output_dir", str(tmp_path / "c"), "--max_train_steps", "6", "--resume_from_checkpoint", str(foreign), "--report_to", "none"])
    with pytest.raises(ValueError, match="only from this run's own"):
        recipe.main(common + ["--output_dir", str(out), "--max_train_steps", "6", "--resume_from_checkpoint", str(foreign), "--report_to", "none"])


def test_bad_resolution_is_refused(recipe, photo_crops, tmp_path):
    train_dir, _ = photo_crops
    argv = ["--train_data_dir", str(train_dir), "--output_dir", str(tmp_path / "x"), *TINY, "--max_train_steps", "1"]
    argv[argv.index("--resolution") + 1] = "24"
    with pytest.raises(ValueError, match=r"--resolution 24 .*last patch number \(8\) × .*2\^\(len\(channel_multipliers\) - 1\) = 2.* 16"):
        recipe.main(argv)
    assert not (tmp_path / "x").exists()


def test_adversarial_perceptual_and_push_to_hub(recipe, photo_crops, tmp_path, fake_hub):  # noqa: F811
    train_dir, _ = photo_crops
    lpips_path = tmp_path / "lpips_vgg.safetensors"
    save_file(vgg16_perceptual_state_dict(seed=1, channels=(8, 16, 16, 32, 32)), str(lpips_path))
    out = tmp_path / "gan"
    logging.disable(logging.INFO)
    result = recipe.main([
        "--train_data_dir", str(train_dir), "--output_dir", str(out), "--resolution", "16", "--patch_nums", "1,2,4,8",
        "--channel_multipliers", "1,2", "--base_channels", "32", "--num_res_blocks", "1", "--codebook_size", "64",
        "--latent_channels", "8", "--train_batch_size", "4", "--max_train_steps", "3", "--report_to", "none",
        "--lpips_weights", str(lpips_path), "--disc_weight", "0.5", "--disc_start_step", "1", "--disc_layers", "2",
        "--l1_weight", "1.0", "--checkpointing_steps", "2", "--validation_steps", "0", "--num_validation_images", "2",
        "--push_to_hub", "--hub_model_id", "org/tiny-tokenizer",
    ])
    logs = result["logs"]
    for key in ("loss/perceptual", "loss/generator", "loss/discriminator", "loss/adaptive_disc_weight"):
        assert np.isfinite(logs[key]), key
    assert set(fake_hub.repos["org/tiny-tokenizer"]) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    assert (out / "checkpoint-2").is_dir()  # local checkpoints exist but were not uploaded
    config = json.loads(fake_hub.repos["org/tiny-tokenizer"]["config.json"])
    assert config["_class_name"] == "MultiScaleVQModel" and config["patch_nums"] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="too deep"):
        recipe.main(["--train_data_dir", str(train_dir), "--output_dir", str(tmp_path / "deep"), *TINY, "--disc_weight", "1", "--disc_layers", "3"])


def test_pretrained_start_from_a_pipeline_repo_on_the_hub(recipe, photo_crops, tmp_path, fake_hub):  # noqa: F811
    """A Hub repo id of a whole pipeline: its tokenizer is found in vqvae/ (as for a local pipeline folder)."""
    from huggingface_hub import HfApi

    train_dir, _ = photo_crops
    start = tiny_model(patch_nums=(1, 2, 4, 8))
    start.save_pretrained(tmp_path / "pipe" / "vqvae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "VARPipeline"}))
    HfApi().create_repo("org/var-pipe")
    HfApi().upload_folder(repo_id="org/var-pipe", folder_path=tmp_path / "pipe")
    logging.disable(logging.INFO)
    result = recipe.main([
        "--train_data_dir", str(train_dir), "--pretrained_model_name_or_path", "org/var-pipe", "--output_dir", str(tmp_path / "out"),
        "--train_batch_size", "4", "--max_train_steps", "1", "--report_to", "none", "--checkpointing_steps", "0",
        "--validation_steps", "0", "--num_validation_images", "2",
    ])
    assert result["global_step"] == 1
    trained = MultiScaleVQModel.from_pretrained(tmp_path / "out")
    assert trained.config.codebook_size == start.config.codebook_size and trained.patch_nums == [1, 2, 4, 8]
    torch.testing.assert_close(trained.quantizer.embedding.weight, start.quantizer.embedding.weight, atol=0.05, rtol=0)  # started from it
    with pytest.raises(EnvironmentError):  # a repo without a tokenizer anywhere still fails clearly
        recipe.main(["--train_data_dir", str(train_dir), "--pretrained_model_name_or_path", "org/no-such-repo",
                     "--output_dir", str(tmp_path / "none"), "--report_to", "none"])


def test_datasets_source_and_pretrained_start(recipe, photo_crops, tmp_path):
    datasets = pytest.importorskip("datasets")
    train_dir, _ = photo_crops
    paths = sorted(train_dir.glob("*.png"))[:12]
    data = datasets.Dataset.from_dict({"img": [str(p) for p in paths]}).cast_column("img", datasets.Image())
    data.save_to_disk(str(tmp_path / "ds"))

    start = tiny_model(patch_nums=(1, 2, 4, 8))
    start.save_pretrained(tmp_path / "pipe" / "vqvae")  # a pipeline folder: the vqvae/ subfolder is found
    out = tmp_path / "from_pretrained"
    logging.disable(logging.INFO)
    result = recipe.main([
        "--dataset_name", str(tmp_path / "ds"), "--image_column", "img", "--pretrained_model_name_or_path", str(tmp_path / "pipe"),
        "--patch_nums", "1,3,8", "--output_dir", str(out), "--train_batch_size", "4", "--max_train_steps", "2",
        "--report_to", "none", "--checkpointing_steps", "0", "--validation_steps", "0", "--num_validation_images", "2",
    ])
    assert result["global_step"] == 2
    trained = MultiScaleVQModel.from_pretrained(out)
    assert trained.patch_nums == [1, 3, 8] and trained.config.base_channels == 32 and trained.resolution == 16
    before, after = start.state_dict(), trained.state_dict()
    torch.testing.assert_close(after["quantizer.embedding.weight"], before["quantizer.embedding.weight"], atol=0.05, rtol=0)  # kept, not re-initialised
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])  # trained

    with pytest.raises(ValueError, match="architecture flags cannot change a pretrained model"):
        recipe.main(["--train_data_dir", str(train_dir), "--pretrained_model_name_or_path", str(tmp_path / "pipe" / "vqvae"),
                     "--base_channels", "64", "--output_dir", str(tmp_path / "y"), "--report_to", "none"])
    with pytest.raises(ValueError, match="--resolution 32 does not fit"):
        recipe.main(["--train_data_dir", str(train_dir), "--pretrained_model_name_or_path", str(tmp_path / "pipe" / "vqvae"),
                     "--resolution", "32", "--output_dir", str(tmp_path / "z"), "--report_to", "none"])
