"""Tests of the training recipe (`pipelines/train_var.py`, `var_hf.training_var`) on the CPU.

Data: crops of real photos bundled with scikit-image (astronaut, chelsea the cat, coffee, rocket) in class
sub-folders. Model: the tiny golden upstream model (64 px, 10 classes, patch_nums 1,2,3,4) converted to a pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from var_hf import VARPipeline
from var_hf.training_var import (
    EpochShuffleSampler,
    TokenCacheError,
    VARLRWDSchedule,
    latest_checkpoint,
    load_token_cache,
    no_weight_decay_names,
    progressive_scale_index,
    progressive_stage,
    progressive_token_weights,
    prune_checkpoints,
    resize_class_embedding,
    tokenizer_fingerprint,
    upstream_lr_factor,
    upstream_weight_decay,
    var_param_groups,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "train_var.py"
GOLDEN = REPO / "tests" / "fixtures" / "golden" / "var_tiny_64"
ALLOWED_SUFFIXES = {".json", ".safetensors"}


# ------------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def train_var():
    spec = importlib.util.spec_from_file_location("train_var_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")


def reset_accelerate_state() -> None:
    """Each in-process run builds its own Accelerator (accelerate keeps its state in process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The tiny model gains nothing from intra-op threads; on a busy 2-core machine they spin against each other
    (30x slower seen). Restored afterwards; subprocesses get OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SUBPROCESS_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def golden_pipe(tmp_path_factory) -> Path:
    from var_hf.convert_var_original import convert_to_pipeline_folder

    root = tmp_path_factory.mktemp("golden")
    return convert_to_pipeline_folder(GOLDEN / "vae_state.safetensors", GOLDEN / "var_state.safetensors", root / "pipe", log=lambda *_: None)


def write_photo_crops(root: Path, classes: dict[str, str], per_class: int, seed: int = 0) -> Path:
    """Square-ish crops of scikit-image's bundled photos, resized small, one sub-folder per class."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for folder, name in classes.items():
        image = getattr(skimage.data, name)()
        (root / folder).mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        for i in range(per_class):
            side = int(min(h, w) * rng.uniform(0.5, 0.8))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            PIL.Image.fromarray(image[y : y + side, x : x + side]).resize((88, 76), PIL.Image.BICUBIC).save(root / folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_photo_crops(tmp_path_factory.mktemp("photos"), {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee"}, per_class=4)


def base_args(pipe: Path, data: Path, out: Path, **overrides) -> list[str]:
    args = {
        "--pretrained_model_name_or_path": str(pipe),
        "--train_data_dir": str(data),
        "--output_dir": str(out),
        "--train_batch_size": "2",
        "--max_train_steps": "4",
        "--checkpointing_steps": "100",
        "--learning_rate": "1e-3",
        "--report_to": "none",
        "--num_validation_images": "0",
        "--dataloader_num_workers": "0",
    }
    args.update(overrides)
    flat = []
    for key, value in args.items():
        if value is None:
            continue
        flat += [key] if value is True else [key, value]
    return flat


def run_until_first_checkpoint(train_var, monkeypatch, args: list[str]) -> None:
    """Run the script and kill it right after it has written its first checkpoint, as a crash would."""

    class Killed(Exception):
        pass

    original = train_var.save_checkpoint

    def save_then_die(*save_args, **save_kwargs):
        original(*save_args, **save_kwargs)
        raise Killed

    monkeypatch.setattr(train_var, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_var.main(args)
    monkeypatch.setattr(train_var, "save_checkpoint", original)
    reset_accelerate_state()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pipeline_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------- recipe pieces
def test_param_groups_follow_upstream_exclusions(golden_pipe):
    pipe = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32)
    groups = {g["group_name"]: g for g in var_param_groups(pipe.transformer, 0.05)}
    names = {id(p): n for n, p in pipe.transformer.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"pos_embed", "start_pos_embed", "scale_embed.weight", "layers.0.attn.logit_scale", "layers.0.attn.q_bias", "lm_head.bias"} <= no_decay
    assert {"class_embed.weight", "input_proj.weight", "lm_head.weight", "layers.0.attn.qkv_proj.weight", "layers.1.adaln_modulation.weight"} <= decay
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 0.05
    assert len(decay) + len(no_decay) == len(names)

    # Classified by name for wrapped models (DDP/FSDP prefixes), with the names of the unwrapped model.
    wrapper = torch.nn.Module()
    wrapper.module = pipe.transformer
    wrapped = var_param_groups(wrapper, 0.05, set(no_weight_decay_names(pipe.transformer)))
    assert [len(g["params"]) for g in wrapped] == [len(decay), len(no_decay)]


def test_upstream_lr_and_weight_decay_schedule():
    total, warmup = 100, 10
    f = lambda step: upstream_lr_factor(step, warmup, total, "lin0", 0.005, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.005)
    assert f(5) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(10) == f(13) == 1.0  # hold for 5 % of the decay phase
    assert f(99) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))
    assert upstream_lr_factor(50, 0, 100, "cos", end_factor=0.0) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 50 / 99))
    assert upstream_weight_decay(0, total, 0.05, 0.08) == pytest.approx(0.05)
    assert upstream_weight_decay(99, total, 0.05, 0.08) == pytest.approx(0.08)

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(var_param_groups(model, 0.05), lr=1.0)
    schedule = VARLRWDSchedule(peak_lr=2e-4, total_steps=total, warmup_steps=warmup, end_factor=0.1, weight_decay=0.05)
    lr, wd = schedule.apply(optimizer, 10)
    assert lr == pytest.approx(2e-4) and wd == pytest.approx(0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [pytest.approx(0.05), 0.0]


def test_progressive_training_helpers():
    # Upstream: pg0 = 1 until the warm-up ends, all 4 scales (index -1) from 50 % of the run.
    assert progressive_scale_index(0, 10, 100, 0.5, 1, 4) == 1
    assert progressive_scale_index(10, 10, 100, 0.5, 1, 4) == 1
    assert progressive_scale_index(30, 10, 100, 0.5, 1, 4) == 2
    assert progressive_scale_index(50, 10, 100, 0.5, 1, 4) == -1
    assert progressive_scale_index(30, 10, 100, 0.0, 1, 4) == -1
    # Python's round (half to even), as upstream: the second stage begins at step 21.
    assert progressive_scale_index(20, 10, 100, 0.5, 1, 4) == 1 and progressive_scale_index(21, 10, 100, 0.5, 1, 4) == 2
    assert progressive_stage(23, 10, 100, 0.5, 1, 4, stage_warmup_steps=10) == (2, pytest.approx(0.3))
    assert progressive_stage(5, 10, 100, 0.5, 1, 4, stage_warmup_steps=10) == (1, 1.0)  # no ramp in the first stage
    weights = progressive_token_weights([1, 2, 3, 4], 1, 0.5)
    assert torch.allclose(weights[:1], torch.tensor(1 / 30)) and torch.allclose(weights[1:5], torch.tensor(0.5 / 30))
    assert weights[5:].abs().sum() == 0
    assert torch.allclose(progressive_token_weights([1, 2, 3, 4], -1).sum(), torch.tensor(1.0))


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(20, seed=3), EpochShuffleSampler(20, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)
    assert list(b) == first  # independent of the global RNG
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(20))


def test_resize_class_embedding_keeps_rows_and_null_class(golden_pipe):
    transformer = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32).transformer
    old = transformer.class_embed.weight.detach().clone()  # (11, C): 10 classes + null
    resize_class_embedding(transformer, 3)
    new = transformer.class_embed.weight
    assert transformer.config.num_classes == 3 and new.shape[0] == 4
    assert torch.equal(new[:3], old[:3]) and torch.equal(new[3], old[10])


def test_checkpoint_listing_ignores_incomplete_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "other"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    removed = prune_checkpoints(tmp_path, total_limit=1)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-12.tmp", "checkpoint-2"]  # room for the next one
    assert latest_checkpoint(tmp_path) is None and (tmp_path / "other").is_dir()


# --------------------------------------------------------------------------------------------------------- training runs
def test_short_run_exports_a_safe_pipeline_and_pushes_it(train_var, golden_pipe, image_dir, tmp_path, fake_hub):
    out = tmp_path / "run"
    result = train_var.main(base_args(
        golden_pipe, image_dir, out, **{
            "--max_train_steps": "3", "--checkpointing_steps": "2", "--report_to": "tensorboard",
            "--validation_steps": "2", "--num_validation_images": "2", "--random_flip": True,
            "--push_to_hub": True, "--hub_model_id": "fake-user/var-photos",
        }
    ))
    assert result["global_step"] == 3 and len(result["losses"]) == 3
    pipeline_dir = out / "pipeline"
    files = pipeline_files(pipeline_dir)
    assert all(f.suffix in ALLOWED_SUFFIXES or f.name == "README.md" for f in files), files
    assert {Path("model_index.json"), Path("transformer/model.safetensors"), Path("vqvae/diffusion_pytorch_model.safetensors"), Path("README.md")} <= set(files)

    pipe = VARPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    assert pipe.id2label[0] == "astronaut" and pipe.id2label[2] == "coffee" and pipe.id2label[5] == "5"
    images = pipe(class_labels=[0, 1], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()

    before = load_file(str(golden_pipe / "transformer" / "model.safetensors"))
    after = load_file(str(pipeline_dir / "transformer" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4  # the weights moved
    vq_before = load_file(str(golden_pipe / "vqvae" / "diffusion_pytorch_model.safetensors"))
    vq_after = load_file(str(pipeline_dir / "vqvae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vq_before[k], vq_after[k]) for k in vq_before)  # frozen tokenizer

    card = (pipeline_dir / "README.md").read_text()
    assert "train_var.py" in card and "--train_data_dir" in card and "image folder" in card and "astronaut" in card
    assert (out / "samples" / "step-2.png").is_file() and (out / "samples" / "step-3.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "checkpoints" / "checkpoint-2" / "optimizer.bin").is_file()  # pickles stay local ...

    pushed = fake_hub.repos["fake-user/var-photos"]  # ... and are never uploaded
    assert set(pushed) == {str(f) for f in files}
    assert not any("checkpoint" in name or name.endswith((".bin", ".pkl", ".pt", ".png")) for name in pushed)


def test_resume_continues_the_same_run(train_var, golden_pipe, image_dir, tmp_path, monkeypatch):
    """6 steps uninterrupted == 3 steps, killed, then resumed with `latest` (mid-epoch, with EMA and warm-up)."""
    common = {"--max_train_steps": "6", "--checkpointing_steps": "3", "--use_ema": True, "--ema_decay": "0.5", "--lr_warmup_steps": "2"}
    full = tmp_path / "full"
    train_var.main(base_args(golden_pipe, image_dir, full, **common))

    resumed = tmp_path / "resumed"
    run_until_first_checkpoint(train_var, monkeypatch, base_args(golden_pipe, image_dir, resumed, **common))  # killed after checkpoint-3
    # A later save killed half-way leaves a .tmp folder behind: `latest` must ignore it.
    (resumed / "checkpoints" / "checkpoint-5.tmp").mkdir()
    (resumed / "checkpoints" / "checkpoint-5.tmp" / "model.safetensors").write_bytes(b"partial")
    result = train_var.main(base_args(golden_pipe, image_dir, resumed, **common, **{"--resume_from_checkpoint": "latest"}))
    assert result["global_step"] == 6 and len(result["losses"]) == 3
    assert not (resumed / "checkpoints" / "checkpoint-5.tmp").exists()

    for relative in ("pipeline/transformer/model.safetensors", "checkpoints/checkpoint-6/model.safetensors", "checkpoints/checkpoint-6/transformer_ema/model.safetensors"):
        a, b = load_file(str(full / relative)), load_file(str(resumed / relative))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, relative
    ema_export = load_file(str(full / "pipeline/transformer/model.safetensors"))  # the exported weights are the EMA's
    ema_saved = load_file(str(full / "checkpoints/checkpoint-6/transformer_ema/model.safetensors"))
    raw = load_file(str(full / "checkpoints/checkpoint-6/model.safetensors"))
    assert all(torch.equal(ema_export[k], ema_saved[k]) for k in ema_export)
    assert not all(torch.equal(ema_export[k], raw[k]) for k in ema_export)
    loss_full = [m["loss"] for m in metrics(full)]
    loss_resumed = [m["loss"] for m in metrics(resumed)]
    assert loss_resumed[:3] == pytest.approx(loss_full[:3], abs=1e-6) and loss_resumed[3:] == pytest.approx(loss_full[3:], abs=1e-6)
    assert [m["lr"] for m in metrics(resumed)] == pytest.approx([m["lr"] for m in metrics(full)])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_decreases_on_real_photos(train_var, golden_pipe, tmp_path, lora):
    data = write_photo_crops(tmp_path / "data", {"astronaut": "astronaut", "cat": "chelsea", "rocket": "rocket"}, per_class=4, seed=1)
    out = tmp_path / "run"
    result = train_var.main(base_args(golden_pipe, data, out, **{
        "--max_train_steps": "30", "--train_batch_size": "4", "--learning_rate": "1e-2" if lora else "2e-3", "--lr_warmup_steps": "3",
        "--class_dropout_prob": "0",  # default recipe otherwise: random crops, 'lin0' decay, clipping
        **({"--use_lora": True, "--lora_rank": "8"} if lora else {}),
    }))
    losses = result["losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < (0.8 if lora else 0.7) * first, (first, last)  # seen: 0.65 (LoRA rank 8), 0.45 (all weights)


def test_token_cache_round_trip_and_refusal(train_var, golden_pipe, image_dir, tmp_path):
    cache = tmp_path / "cache"
    train_var.main(base_args(golden_pipe, image_dir, tmp_path / "a", **{"--cache_tokens": str(cache), "--max_train_steps": "1"}))
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["num_samples"] == 12 and info["id2label"]["1"] == "cat"

    # Round trip: the cached tokens are the tokenizer's tokens of the centre crops.
    from var_hf.training_data import load_class_image_dataset

    pipe = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32)
    dataset = load_token_cache(cache, tokenizer_fingerprint(pipe.vqvae), pipe.vqvae.patch_nums)
    images = load_class_image_dataset(train_data_dir=str(image_dir), resolution=64, random_crop=False)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    with torch.no_grad():
        expected = torch.cat(pipe.vqvae.encode_scales(pixels), dim=1)
    assert torch.equal(dataset.scale_indices.long(), expected)
    assert dataset.class_labels.tolist() == [label for _, label in images.samples]

    # Re-used without the images; training on the cache works.
    reset_accelerate_state()
    result = train_var.main(base_args(golden_pipe, image_dir, tmp_path / "b", **{
        "--cache_tokens": str(cache), "--train_data_dir": None, "--max_train_steps": "2", "--num_classes": "3",
    }))
    assert result["global_step"] == 2
    finetuned = VARPipeline.from_pretrained(tmp_path / "b" / "pipeline", dtype=torch.float32)  # class embedding resized
    assert finetuned.transformer.config.num_classes == 3 and finetuned.id2label == {0: "astronaut", 1: "cat", 2: "coffee"}

    # Another tokenizer (one weight changed) is refused with a clear message.
    other = tmp_path / "other_pipe"
    import shutil

    shutil.copytree(golden_pipe, other)
    weights_path = other / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_path))
    weights["quant_conv.bias"] = weights["quant_conv.bias"] + 0.01
    save_file(weights, str(weights_path))
    reset_accelerate_state()
    with pytest.raises(train_var.TrainingInputError, match="another tokenizer"):
        train_var.main(base_args(other, image_dir, tmp_path / "c", **{"--cache_tokens": str(cache)}))
    with pytest.raises(TokenCacheError, match="another tokenizer"):
        load_token_cache(cache, "0" * 64, [1, 2, 3, 4])
    assert not (tmp_path / "c" / "metrics.jsonl").exists()


def test_from_scratch_with_a_datasets_folder(train_var, golden_pipe, image_dir, tmp_path):
    """A new transformer on the golden tokenizer; data through `datasets` (imagefolder); accumulation, checkpointing
    of activations and progressive training switched on."""
    out = tmp_path / "scratch"
    result = train_var.main(base_args(None, None, out, **{
        "--pretrained_model_name_or_path": None, "--train_data_dir": None,
        "--vqvae_model_name_or_path": str(golden_pipe), "--dataset_name": str(image_dir),
        "--depth": "2", "--width": "64", "--num_heads": "2", "--gradient_accumulation_steps": "2", "--gradient_checkpointing": True,
        "--max_train_steps": "3", "--progressive_fraction": "0.5", "--progressive_initial_scale": "1", "--scale_lr": True,
    }))
    assert result["global_step"] == 3
    pipe = VARPipeline.from_pretrained(out / "pipeline", dtype=torch.float32)
    config = pipe.transformer.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_classes, config.patch_nums) == (2, 64, 3, [1, 2, 3, 4])
    assert pipe.id2label == {0: "astronaut", 1: "cat", 2: "coffee"}
    logged = metrics(out)
    assert logged[0]["progressive_scale"] == 1 and logged[-1]["progressive_scale"] == 3
    assert logged[0]["lr"] == pytest.approx(1e-3 * 4 / 256)  # --scale_lr: tblr · global batch (2 × 1 × 2) / 256


def _bad_case(kind: str, root: Path, image_dir: Path) -> tuple[dict, str]:
    data = root / "data"
    if kind == "empty":
        data.mkdir()
        return {"--train_data_dir": str(data)}, "no class sub-folders"
    if kind == "unreadable":
        write_photo_crops(data, {"cat": "chelsea"}, per_class=1)
        (data / "cat" / "broken.png").write_bytes(b"this is not a png")
        return {"--train_data_dir": str(data)}, "unreadable image"
    if kind == "class_id":
        write_photo_crops(data, {"3": "chelsea", "12": "coffee"}, per_class=1)
        return {"--train_data_dir": str(data)}, r"class ids >= the model's num_classes \(10\)"
    if kind == "resolution":
        return {"--train_data_dir": str(image_dir), "--resolution": "128"}, "--resolution 128 is not the tokenizer's resolution 64"
    if kind == "foreign_checkpoint":
        foreign = root / "elsewhere" / "checkpoints" / "checkpoint-3"
        foreign.mkdir(parents=True)
        return {"--train_data_dir": str(image_dir), "--resume_from_checkpoint": str(foreign)}, "only from this run's own"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "unreadable", "class_id", "resolution", "foreign_checkpoint"])
def test_bad_inputs_stop_before_training(train_var, golden_pipe, image_dir, tmp_path, kind):
    overrides, message = _bad_case(kind, tmp_path, image_dir)
    out = tmp_path / "out"
    with pytest.raises(train_var.TrainingInputError, match=message):
        train_var.main(base_args(golden_pipe, image_dir, out, **overrides))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists() and not (out / "pipeline").exists()


def test_bad_input_message_on_the_command_line(golden_pipe, image_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *base_args(golden_pipe, image_dir, out, **{"--resolution": "256"})],
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --resolution 256 is not the tokenizer's resolution 64" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_cpu_processes_with_accelerate_launch(golden_pipe, image_dir, tmp_path, lora):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: two CPU processes over gloo."""
    out = tmp_path / "ddp"
    extra = {"--use_lora": True, "--lora_rank": "2"} if lora else {}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000 + lora),
        str(SCRIPT), *base_args(golden_pipe, image_dir, out, **{"--max_train_steps": "4", "--checkpointing_steps": "2", "--cache_tokens": str(tmp_path / "cache"), **extra}),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    wall_s = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "Num processes: 2" in log and "gloo" in log
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    # a sanity bound on images/s (2 processes × 2 images per step): the steps' times fit in the launch's wall time
    step_seconds = [2 * 2 / m["img_per_s"] for m in metrics(out)]
    assert all(s > 0 for s in step_seconds) and sum(step_seconds) < wall_s
    assert {p.name for p in (out / "checkpoints" / "checkpoint-4").iterdir()} >= {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"}
    assert len(json.loads((tmp_path / "cache" / "cache_info.json").read_text())["shards"]) == 2  # each rank encoded its share
    pipe = VARPipeline.from_pretrained(out / "pipeline", dtype=torch.float32)
    assert pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="np").images.shape == (1, 64, 64, 3)
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file() == lora


@needs_compiler
def test_torch_compile_flag_trains_the_same_model(train_var, golden_pipe, image_dir, tmp_path):
    """`--torch_compile` (compiled blocks): same losses and exported weights as the plain run, same file layout."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    train_var.main(base_args(golden_pipe, image_dir, plain, **{"--max_train_steps": "3"}))
    reset_accelerate_state()
    train_var.main(base_args(golden_pipe, image_dir, compiled, **{"--max_train_steps": "3", "--torch_compile": True}))
    assert [m["loss"] for m in metrics(compiled)] == pytest.approx([m["loss"] for m in metrics(plain)], abs=1e-4)
    assert pipeline_files(plain / "pipeline") == pipeline_files(compiled / "pipeline")
    a = load_file(str(plain / "pipeline/transformer/model.safetensors"))
    b = load_file(str(compiled / "pipeline/transformer/model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


# ------------------------------------------------------------------------------------------------------------------ LoRA
LORA_TARGETS = ("qkv_proj", "out_proj", "fc1", "fc2")


def test_lora_adapters_act_in_every_forward_and_merge_exactly(golden_pipe):
    """peft LoRA layers on the four block matmuls (qkv included, which the attention reads through a fused bias):
    teacher forcing, KV-cached sampling and the merged weights agree; with the adapters off, the base model comes back."""
    import copy

    from peft import LoraConfig, get_peft_model

    pipe = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    labels, teacher_input = expected["input.labels"], expected["var.teacher_input"]
    base_logits = pipe.transformer(class_labels=labels, teacher_input=teacher_input).logits

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS) + ["adaln_modulation"], init_lora_weights=False)
    adapted = get_peft_model(pipe.transformer, config).eval()
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # large enough that skipping any one adapter shows in the logits
            param.data.normal_(0, 0.2)
    merged = copy.deepcopy(adapted).merge_and_unload()
    assert type(merged) is type(pipe.transformer) and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        adapted_logits = adapted(class_labels=labels, teacher_input=teacher_input).logits
        merged_logits = merged(class_labels=labels, teacher_input=teacher_input).logits
        with adapted.disable_adapter():  # the wrapped qkv adds its bias after the matmul: equal up to rounding
            disabled_logits = adapted(class_labels=labels, teacher_input=teacher_input).logits
    scale = base_logits.abs().max()
    assert (disabled_logits - base_logits).abs().max() < 1e-6 * scale
    assert (adapted_logits - base_logits).abs().max() > 0.05 * scale  # the adapters matter ...
    assert (adapted_logits - merged_logits).abs().max() < 1e-5 * scale  # ... and each one acts exactly as merged
    for target in LORA_TARGETS:  # every adapter counts: merging all but one is visibly different
        partial = copy.deepcopy(adapted)
        for name, module in partial.named_modules():
            if name.endswith(target) and hasattr(module, "lora_B"):
                module.lora_B["default"].weight.data.zero_()
        with torch.no_grad():
            partial_logits = partial.merge_and_unload()(class_labels=labels, teacher_input=teacher_input).logits
        assert (partial_logits - adapted_logits).abs().max() > 1e-3 * scale, target

    # Sampling through the KV cache with the adapters live == sampling the merged weights (float32, same draws).
    live = VARPipeline(transformer=adapted.get_base_model(), vqvae=pipe.vqvae)
    flat = VARPipeline(transformer=merged, vqvae=pipe.vqvae)
    runs = [p(class_labels=[1, 4], top_k=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0), output_type="pt") for p in (live, flat)]
    for p in (live, flat):
        p.set_progress_bar_config(disable=True)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].scale_indices, runs[1].scale_indices))
    with pytest.raises(ValueError, match="merge adapters"):
        adapted.get_base_model().set_float8_matmuls()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_lora_with_gradient_checkpointing_trains_every_adapter(golden_pipe, use_reentrant):
    """Frozen base, checkpointed blocks: with reentrant checkpointing the gradients reach the adapters only if the
    token embedding's output is marked as requiring grad (peft asks the model for `get_input_embeddings`)."""
    from peft import LoraConfig, get_peft_model

    transformer = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32).transformer.train()
    transformer.config.class_dropout_prob = 0.0
    transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    adapted = get_peft_model(transformer, LoraConfig(r=2, target_modules=list(LORA_TARGETS)))
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    logits = adapted(class_labels=expected["input.labels"], teacher_input=expected["var.teacher_input"]).logits
    tokens = torch.cat([expected[f"vae.idx.{k}"] for k in range(len(transformer.config.patch_nums))], dim=1)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    lora_b = {name: param for name, param in adapted.named_parameters() if "lora_B" in name}
    assert len(lora_b) == 4 * transformer.config.num_hidden_layers
    assert all(param.grad is not None and param.grad.abs().max() > 0 for param in lora_b.values())  # B starts at 0: A gets none
    assert not any(p.grad is not None for n, p in adapted.named_parameters() if "lora" not in n)  # the base stays frozen


def test_lora_fine_tuning_exports_merged_weights_and_the_adapters(train_var, golden_pipe, image_dir, tmp_path, fake_hub):
    out = tmp_path / "run"
    result = train_var.main(base_args(golden_pipe, image_dir, out, **{
        "--use_lora": True, "--lora_rank": "4", "--lora_alpha": "8", "--max_train_steps": "4", "--learning_rate": "5e-3",
        "--validation_steps": "2", "--num_validation_images": "1", "--push_to_hub": True, "--hub_model_id": "fake-user/var-lora",
    }))
    assert result["global_step"] == 4 and all(math.isfinite(x) for x in result["losses"])
    assert (out / "samples" / "step-2.png").is_file()  # validation sampled with the adapters live
    adapter_dir = out / "lora_adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == sorted(LORA_TARGETS)

    before = load_file(str(golden_pipe / "transformer" / "model.safetensors"))
    after = load_file(str(out / "pipeline" / "transformer" / "model.safetensors"))
    assert before.keys() == after.keys()
    adapted_names = set()
    for key, weight in adapter.items():  # ...layers.0.attn.qkv_proj.lora_A.weight -> layers.0.attn.qkv_proj.weight
        if ".lora_A." in key:
            module = key.split("base_model.model.", 1)[1].rsplit(".lora_A.", 1)[0]
            lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
            assert lora_b.abs().max() > 0  # trained away from peft's zero init
            expected_weight = before[f"{module}.weight"] + (8 / 4) * lora_b @ weight  # W + (alpha / r) · B A
            torch.testing.assert_close(after[f"{module}.weight"], expected_weight, rtol=0, atol=1e-6)
            adapted_names.add(f"{module}.weight")
    depth = sum(1 for k in before if k.endswith("attn.qkv_proj.weight"))
    assert len(adapted_names) == 4 * depth
    trained_class_embed = next(v for k, v in adapter.items() if "class_embed" in k)
    assert torch.equal(after["class_embed.weight"], trained_class_embed)
    assert not torch.equal(after["class_embed.weight"], before["class_embed.weight"])  # trained in full
    frozen = [k for k in before if k not in adapted_names and k != "class_embed.weight"]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # everything else untouched, bit for bit

    card = (out / "pipeline" / "README.md").read_text()
    assert "| LoRA | rank 4, scale 2" in card
    assert set(fake_hub.repos["fake-user/var-lora"]) == {str(f) for f in pipeline_files(out / "pipeline")}  # merged pipeline only
    pipe = VARPipeline.from_pretrained(out / "pipeline", dtype=torch.float32)
    assert pipe(class_labels=[0], generator=torch.Generator().manual_seed(0), output_type="np").images.shape == (1, 64, 64, 3)

    # the adapter folder alone, on the base model with peft, computes what the merged pipeline computes
    from peft import PeftModel

    base = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32).transformer
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    inputs = {"class_labels": expected["input.labels"], "teacher_input": expected["var.teacher_input"]}
    with torch.no_grad():
        merged_logits, adapter_logits = pipe.transformer(**inputs).logits, with_adapter(**inputs).logits
    assert (merged_logits - adapter_logits).abs().max() < 1e-5 * merged_logits.abs().max()


def test_lora_adapter_of_a_resized_class_embedding_loads_onto_a_resized_base(train_var, golden_pipe, image_dir, tmp_path):
    """With --num_classes the adapter carries the resized class embedding: resize the base the same way, then load it."""
    from peft import PeftModel

    out = tmp_path / "run"
    train_var.main(base_args(golden_pipe, image_dir, out, **{"--use_lora": True, "--lora_rank": "2", "--num_classes": "3", "--max_train_steps": "2"}))
    merged = VARPipeline.from_pretrained(out / "pipeline", dtype=torch.float32).transformer
    assert merged.config.num_classes == 3
    base = VARPipeline.from_pretrained(golden_pipe, dtype=torch.float32).transformer
    resize_class_embedding(base, 3)
    with_adapter = PeftModel.from_pretrained(base, str(out / "lora_adapter")).eval()
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    inputs = {"class_labels": torch.tensor([0, 2]), "teacher_input": expected["var.teacher_input"]}
    with torch.no_grad():
        a, b = merged(**inputs).logits, with_adapter(**inputs).logits
    assert (a - b).abs().max() < 1e-5 * a.abs().max()


def test_lora_run_resumes_to_the_same_adapters(train_var, golden_pipe, image_dir, tmp_path, monkeypatch):
    common = {"--use_lora": True, "--lora_rank": "2", "--max_train_steps": "4", "--checkpointing_steps": "2", "--learning_rate": "5e-3", "--lora_freeze_class_embedding": True}
    full = tmp_path / "full"
    train_var.main(base_args(golden_pipe, image_dir, full, **common))

    resumed = tmp_path / "resumed"
    run_until_first_checkpoint(train_var, monkeypatch, base_args(golden_pipe, image_dir, resumed, **common))
    train_var.main(base_args(golden_pipe, image_dir, resumed, **common, **{"--resume_from_checkpoint": "latest"}))
    a, b = (load_file(str(folder / "lora_adapter" / "adapter_model.safetensors")) for folder in (full, resumed))
    assert a.keys() == b.keys() and not any("class_embed" in k for k in a)  # frozen class embedding: not in the adapter
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [m["loss"] for m in metrics(resumed)] == pytest.approx([m["loss"] for m in metrics(full)], abs=1e-6)  # steps 1-2, then 3-4 resumed
    before = load_file(str(golden_pipe / "transformer" / "model.safetensors"))
    after = load_file(str(resumed / "pipeline" / "transformer" / "model.safetensors"))
    assert torch.equal(before["class_embed.weight"], after["class_embed.weight"])


@pytest.mark.parametrize(
    "extra, message, at_parse",
    [
        ({"--use_ema": True}, "--use_lora and --use_ema", True),
        ({"--lora_rank": "0"}, "--lora_rank must be >= 1", True),
        ({"--lora_alpha": "0"}, "--lora_alpha > 0", True),
        ({"--lora_target_modules": "no_such_linear"}, "--lora_target_modules no_such_linear", False),
        ({"--lora_freeze_class_embedding": True, "--num_classes": "12"}, "drop --lora_freeze_class_embedding", False),
    ],
)
def test_lora_bad_options_stop_before_training(train_var, golden_pipe, image_dir, tmp_path, capsys, extra, message, at_parse):
    out = tmp_path / "run"
    args = base_args(golden_pipe, image_dir, out, **{"--use_lora": True, **extra})
    if not at_parse:
        with pytest.raises(train_var.TrainingInputError, match=message):
            train_var.main(args)
    else:
        with pytest.raises(SystemExit):
            train_var.main(args)
        assert message in capsys.readouterr().err
    assert not (out / "pipeline").exists() and not (out / "checkpoints").exists()
    with pytest.raises(SystemExit):  # LoRA adapts a pretrained model: from scratch it is refused
        train_var.parse_args(["--vqvae_model_name_or_path", str(golden_pipe), "--train_data_dir", str(image_dir), "--use_lora"])
