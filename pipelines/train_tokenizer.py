#!/usr/bin/env python
"""Train VAR's multi-scale VQ tokenizer (`var_hf.MultiScaleVQModel`) with Accelerate.

Objective per step: l2_weight·MSE + l1_weight·L1 (reconstruction) + vq_weight·VQ loss (the multi-scale residual
quantization's commitment/codebook terms, see `var_hf.training_tokenizer.multiscale_vq_training_forward`)
[+ perceptual_weight·LPIPS-style distance with `--lpips_weights`] [+ disc_weight·λ·hinge generator loss of a PatchGAN
discriminator from `--disc_start_step` on, λ = VQGAN's adaptive weight]. Codes unused for `--dead_code_steps` steps
are re-initialised from random encoder outputs of the batch.

Example (small tokenizer on an image folder, 32 px, latent 8×8):

    accelerate launch pipelines/train_tokenizer.py \
        --train_data_dir ./images --output_dir ./tokenizer \
        --resolution 32 --patch_nums 1,2,4,8 --base_channels 64 --channel_multipliers 1,2,2 \
        --codebook_size 1024 --latent_channels 16 --train_batch_size 32 --max_train_steps 20000 \
        --checkpointing_steps 1000 --validation_steps 500 --resume_from_checkpoint latest

`--lpips_weights PATH`: a safetensors file of a VGG feature network in torchvision's `features.<i>.*` layout or the
`lpips` package's `net.slice<k>.<i>.*` layout, with optional LPIPS linear layers `lin<k>.model.1.weight` (without
them every channel weighs 1). On a machine with `lpips` installed:

    import lpips
    from safetensors.torch import save_file
    state = lpips.LPIPS(net="vgg").state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("lins.")}, "lpips_vgg.safetensors")

The trained tokenizer is saved with `save_pretrained(output_dir)` (config.json + diffusion_pytorch_model.safetensors;
`--push_to_hub` adds a README.md card and uploads exactly those top-level files). Checkpoints (Accelerate state, local
only) live in `output_dir/checkpoint-<step>/`, reconstruction grids in `output_dir/validation/`, tracker logs in
`output_dir/<logging_dir>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_tokenizer")

# Upstream's released tokenizer (vae_ch160v4096z32, 256 px); used for flags left unset when training from scratch.
ARCHITECTURE_DEFAULTS = {
    "codebook_size": 4096,
    "latent_channels": 32,
    "base_channels": 160,
    "channel_multipliers": (1, 1, 2, 2, 4),
    "num_res_blocks": 2,
    "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "phi_count": 4,
    "phi_residual_ratio": 0.5,
}
# Config entries that may differ from a --pretrained_model_name_or_path tokenizer (they do not change weight shapes).
OVERRIDABLE_WITH_PRETRAINED = ("patch_nums", "beta", "dropout")
COMPLETE_MARKER = "training_state.json"
USAGE_STATE_FILE = "codebook_usage.safetensors"


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train VAR's multi-scale VQ tokenizer (MultiScaleVQModel) with Accelerate.")
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None, help="Folder of images (flat or nested; sub-folder names are ignored).")
    g.add_argument("--dataset_name", type=str, default=None, help="`datasets` dataset name or a `save_to_disk` folder.")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--dataset_split", type=str, default="train")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--center_crop", action="store_true", help="Centre crops instead of random crops.")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--validation_data_dir", type=str, default=None, help="Held-out images for reconstruction grids and metrics (default: the first training images).")
    g.add_argument("--num_validation_images", type=int, default=8)

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Start from an existing tokenizer (folder or Hub id; a pipeline's vqvae/, in a folder or a Hub repo, is found automatically).")
    g.add_argument("--subfolder", type=str, default=None, help="Subfolder of --pretrained_model_name_or_path holding the tokenizer.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--codebook_size", type=int, default=None, help="Vocabulary V (default 4096).")
    g.add_argument("--latent_channels", type=int, default=None, help="Latent channels Cvae (default 32).")
    g.add_argument("--base_channels", type=int, default=None, help="Channels of the first level, a multiple of 32 (default 160).")
    g.add_argument("--channel_multipliers", type=int_list, default=None, help="Per-level multipliers, e.g. 1,1,2,2,4 (default); downsampling 2^(levels-1).")
    g.add_argument("--num_res_blocks", type=int, default=None, help="ResNet blocks per encoder level (default 2).")
    g.add_argument("--patch_nums", type=int_list, default=None, help="Scale sides, e.g. 1,2,3,4,5,6,8,10,13,16 (default); the last one is the latent side.")
    g.add_argument("--phi_count", type=int, default=None, help="Shared Phi convolutions (default 4).")
    g.add_argument("--phi_residual_ratio", type=float, default=None, help="Phi(h) = (1-r)·h + r·conv(h) (default 0.5).")
    g.add_argument("--beta", type=float, default=None, help="Commitment weight (default 0.25, or the pretrained config's).")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--no_attention", action="store_true", help="No self-attention blocks (new models only).")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="var-tokenizer")
    g.add_argument("--resolution", type=int, default=None, help="Image side; must equal last patch_num × 2^(len(channel_multipliers)-1) (default: that).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Per-device batch size.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimisation steps (default: --num_train_epochs epochs).")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="Multiply the learning rates by batch size × accumulation × processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers scheduler name: constant, constant_with_warmup, cosine, linear, ...")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9, help="0.5 (with --adam_beta2 0.9) is VQGAN's choice for adversarial training.")
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=None)

    g = p.add_argument_group("losses")
    g.add_argument("--l2_weight", type=float, default=1.0, help="Weight of the pixel MSE.")
    g.add_argument("--l1_weight", type=float, default=0.0, help="Weight of the pixel L1.")
    g.add_argument("--vq_weight", type=float, default=1.0, help="Weight of the VQ (commitment + codebook) loss.")
    g.add_argument("--lpips_weights", type=str, default=None, help="safetensors of an LPIPS-VGG / VGG feature network; enables the perceptual loss.")
    g.add_argument("--perceptual_weight", type=float, default=1.0)
    g.add_argument("--disc_weight", type=float, default=0.0, help="Adversarial loss weight (0: no discriminator).")
    g.add_argument("--disc_start_step", type=int, default=0, help="Step from which the discriminator trains and the adversarial term is used.")
    g.add_argument("--disc_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    g.add_argument("--disc_layers", type=int, default=3, help="Stride-2 layers of the PatchGAN discriminator.")
    g.add_argument("--disc_channels", type=int, default=64)
    g.add_argument("--no_adaptive_disc_weight", action="store_true", help="Use disc_weight as is instead of VQGAN's gradient-balanced weight.")

    g = p.add_argument_group("codebook")
    g.add_argument("--dead_code_steps", type=int, default=100, help="Re-initialise codes unused for this many steps (0: never).")
    g.add_argument("--codebook_init", type=str, default="auto", choices=["auto", "data", "uniform", "none"], help="New models: codes from random encoder outputs of the first images (data, the auto default) or U(-1/V, 1/V); pretrained models keep theirs.")
    g.add_argument("--dead_code_source", type=str, default="latent", choices=["latent", "residual"], help="Restart from encoder-output rows (latent) or from the per-scale residuals.")

    g = p.add_argument_group("checkpoints, logging, hub")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    g.add_argument("--validation_steps", type=int, default=500, help="Reconstruction grid + metrics before training and every N steps (0: only at the end).")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--report_to", type=str, default="tensorboard", help='tensorboard, wandb, all, or "none".')
    g.add_argument("--tracker_project_name", type=str, default="var-tokenizer")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("pass exactly one of --train_data_dir or --dataset_name")
    if args.pretrained_model_name_or_path is None:
        for name, value in ARCHITECTURE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if args.resolution is not None:
            from var_hf.training_tokenizer import check_tokenizer_resolution

            check_tokenizer_resolution(args.resolution, args.patch_nums, args.channel_multipliers)
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_validation_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError("--max_train_steps must be >= 1")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).resolve().name
    return args


# --------------------------------------------------------------------------------------------------- model

def hub_pipeline_holds_tokenizer(repo_id: str, revision: str | None) -> bool:
    """Whether Hub repo `repo_id` is a pipeline with a tokenizer in vqvae/ (False when that cannot be told)."""
    from huggingface_hub import file_exists

    try:
        return file_exists(repo_id, "vqvae/config.json", revision=revision) and not file_exists(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001  (offline, no such repo, no access: the original error is the one to show)
        return False

def build_model(args):
    from var_hf import MultiScaleVQModel

    if args.pretrained_model_name_or_path is None:
        return MultiScaleVQModel(
            codebook_size=args.codebook_size,
            latent_channels=args.latent_channels,
            base_channels=args.base_channels,
            channel_multipliers=tuple(args.channel_multipliers),
            num_res_blocks=args.num_res_blocks,
            dropout=args.dropout or 0.0,
            use_attention=not args.no_attention,
            use_mid_attention=not args.no_attention,
            patch_nums=tuple(args.patch_nums),
            phi_count=args.phi_count,
            phi_residual_ratio=args.phi_residual_ratio,
            beta=0.25 if args.beta is None else args.beta,
        )
    source, subfolder = args.pretrained_model_name_or_path, args.subfolder
    if subfolder is None and Path(source).is_dir() and not (Path(source) / "config.json").is_file() and (Path(source) / "vqvae" / "config.json").is_file():
        subfolder = "vqvae"
    try:
        config = MultiScaleVQModel.load_config(source, subfolder=subfolder, revision=args.revision)
    except EnvironmentError:
        if subfolder is not None or Path(source).is_dir() or not hub_pipeline_holds_tokenizer(source, args.revision):
            raise
        subfolder = "vqvae"  # a pipeline repo on the Hub: the tokenizer lives in its vqvae/
        config = MultiScaleVQModel.load_config(source, subfolder=subfolder, revision=args.revision)
    overrides = {}
    for name in ARCHITECTURE_DEFAULTS:
        value = getattr(args, name)
        if value is None:
            continue
        current = config.get(name)
        same = list(value) == list(current) if isinstance(value, (tuple, list)) else value == current
        if same:
            continue
        if name not in OVERRIDABLE_WITH_PRETRAINED:
            raise ValueError(f"--{name} {value} differs from the pretrained tokenizer's {current}; architecture flags cannot change a pretrained model")
        overrides[name] = tuple(value) if isinstance(value, (tuple, list)) else value
    for name in ("beta", "dropout"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if "patch_nums" in overrides:
        overrides["phi_index_per_scale"] = None  # recomputed for the new schedule
    if args.no_attention:
        raise ValueError("--no_attention cannot change a pretrained tokenizer")
    return MultiScaleVQModel.from_pretrained(source, subfolder=subfolder, revision=args.revision, **overrides)


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if m and path.is_dir() and (not complete_only or (path / COMPLETE_MARKER).is_file()):
                found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(accelerator, args, output_dir: Path, global_step: int, tracker) -> Path:
    from safetensors.torch import save_file

    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        existing = list_checkpoints(output_dir, complete_only=False)
        excess = len(existing) - (args.checkpoints_total_limit - 1)
        for _, path in existing[: max(excess, 0)]:
            logger.info("removing old checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    path = output_dir / f"checkpoint-{global_step}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        save_file(tracker.state_dict(), str(path / USAGE_STATE_FILE))
        # Written last: a checkpoint folder without it (crash while saving) is ignored by --resume_from_checkpoint.
        (path / COMPLETE_MARKER).write_text(json.dumps({"global_step": global_step}) + "\n")
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", path)
    return path


def resolve_resume_path(args, output_dir: Path) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        complete = list_checkpoints(output_dir)
        return complete[-1][1] if complete else None
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir() and (output_dir / path).is_dir():
        path = output_dir / path
    if path.resolve().parent != output_dir.resolve():  # accelerate states are pickles: only this run's own are read
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: checkpoints are read only from this run's own "
            f"{output_dir} (accelerate states are pickles; never load ones you did not write)"
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a complete checkpoint (no {COMPLETE_MARKER})")
    return path


# ---------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def run_validation(accelerator, vq, images: torch.Tensor, output_dir: Path, global_step: int) -> dict[str, float]:
    from var_hf.training_tokenizer import reconstruction_grid, reconstruction_metrics

    was_training = vq.training
    vq.eval()
    images = images.to(accelerator.device)
    with accelerator.autocast():
        metrics = reconstruction_metrics(vq, images)
        reconstructions = vq(images[:8]).sample
    vq.train(was_training)
    grid = reconstruction_grid(images[:8], reconstructions)
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step_{global_step:07d}.png")
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation/reconstructions", np.asarray(grid), global_step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/reconstructions": wandb.Image(grid, caption="top: input, bottom: reconstruction")}, step=global_step)
        except Exception as error:  # noqa: BLE001  (a tracker that cannot take images must not stop training)
            logger.warning("could not log the reconstruction grid to %s: %s", tracker.name, error)
    return {f"val/{k}": v for k, v in metrics.items()}


def write_model_card(output_dir: Path, vq, args, global_step: int, metrics: dict) -> None:
    config = vq.config
    lines = [
        "---",
        "library_name: diffusers",
        "tags:",
        "- var",
        "- vq-vae",
        "- multi-scale-vq",
        "- var-hf",
        "---",
        "",
        "# VAR multi-scale VQ tokenizer",
        "",
        (
            "A `var_hf.MultiScaleVQModel` (VAR's multi-scale residual VQ tokenizer) trained with "
            "`pipelines/train_tokenizer.py` of var-hf. Weights are in safetensors."
        ),
        "",
        f"- resolution: {vq.resolution} px, patch_nums {list(config.patch_nums)}, codebook {config.codebook_size} × {config.latent_channels}",
        f"- encoder/decoder: base_channels {config.base_channels}, channel_multipliers {list(config.channel_multipliers)}, num_res_blocks {config.num_res_blocks}",
        f"- training steps: {global_step}, batch size {args.train_batch_size} × {args.gradient_accumulation_steps} accumulation",
    ]
    if metrics:
        lines.append("- validation: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in sorted(metrics.items())))
    lines += [
        "",
        "```python",
        "from var_hf import MultiScaleVQModel",
        "",
        "vq = MultiScaleVQModel.from_pretrained(\"<this repo or folder>\")",
        "tokens = vq.encode_scales(images)  # images in [-1, 1]",
        "reconstruction = vq.decode_scales(tokens)",
        "```",
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines))


def push_tokenizer_to_hub(output_dir: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload only the exported top-level json/safetensors files and README.md (never checkpoints or logs)."""
    from huggingface_hub import HfApi

    allow = sorted(p.name for p in output_dir.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors") or p.name == "README.md"))
    if not any(name.endswith(".safetensors") for name in allow):
        raise ValueError(f"{output_dir} holds no exported safetensors weights to push")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        allow_patterns=allow,  # exact top-level names: checkpoint-*/ files never match
        commit_message="Upload VAR multi-scale VQ tokenizer (var-hf)",
        repo_type="model",
    )
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)

    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, broadcast, set_seed
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from var_hf.training_tokenizer import (
        CodebookUsageTracker,
        EpochShuffleSampler,
        FeatureNetworkPerceptualLoss,
        MultiScaleVQTrainingWrapper,
        PatchGANDiscriminator,
        adaptive_generator_weight,
        check_tokenizer_resolution,
        hinge_discriminator_loss,
        hinge_generator_loss,
        initialize_codebook,
        load_tokenizer_image_dataset,
        reconstruction_loss,
        restart_dead_codes,
        sample_restart_vectors,
        unused_phi_convs,
    )

    output_dir = Path(args.output_dir)
    if args.seed is not None:
        set_seed(args.seed)
    vq = build_model(args)
    resolution = vq.resolution if args.resolution is None else args.resolution
    if vq.config.base_channels * vq.config.channel_multipliers[0] <= 32:
        logger.warning(
            "base_channels × channel_multipliers[0] = %d gives one channel per GroupNorm group in the decoder's last "
            "stage (instance normalisation): the decoder can hardly reproduce flat colours; use >= 64",
            vq.config.base_channels * vq.config.channel_multipliers[0],
        )
    check_tokenizer_resolution(resolution, vq.patch_nums, vq.config.channel_multipliers)

    perceptual = None
    if args.lpips_weights:
        perceptual = FeatureNetworkPerceptualLoss.from_safetensors(args.lpips_weights)
        if resolution < perceptual.min_resolution:
            raise ValueError(f"--lpips_weights: this feature network needs images of at least {perceptual.min_resolution} px, got {resolution}")
    use_disc = args.disc_weight > 0
    if use_disc and PatchGANDiscriminator.output_side(resolution, args.disc_layers) < 1:
        raise ValueError(f"--disc_layers {args.disc_layers} is too deep for {resolution} px images; use fewer layers")

    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=bool(unused_phi_convs(vq)))
    log_with = None if args.report_to in (None, "", "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[ddp_kwargs],
        cpu=not torch.cuda.is_available(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ data
    sampler_seed = 0 if args.seed is None else args.seed
    train_dataset = load_tokenizer_image_dataset(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        resolution=resolution,
        image_column=args.image_column,
        split=args.dataset_split,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        random_crop=not args.center_crop,
        hflip=args.random_flip,
        seed=sampler_seed,
        max_samples=args.max_train_samples,
    )
    if len(train_dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"the dataset has {len(train_dataset)} images, fewer than one batch ({args.train_batch_size} × {accelerator.num_processes} processes)")
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(train_dataset), sampler_seed),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    if args.validation_data_dir:
        val_dataset = load_tokenizer_image_dataset(train_data_dir=args.validation_data_dir, resolution=resolution, random_crop=False)
    else:
        val_dataset = load_tokenizer_image_dataset(
            train_data_dir=args.train_data_dir, dataset_name=args.dataset_name, resolution=resolution, image_column=args.image_column,
            split=args.dataset_split, dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, random_crop=False,
            max_samples=args.num_validation_images,
        )
    val_images = torch.stack([val_dataset[i]["pixel_values"] for i in range(min(args.num_validation_images, len(val_dataset)))])

    # ------------------------------------------------------------- optimisation
    trainer = MultiScaleVQTrainingWrapper(vq, restart_source=args.dead_code_source)
    trainer.train()
    scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes if args.scale_lr else 1
    learning_rate = args.learning_rate * scale
    optimizer = torch.optim.AdamW(
        trainer.parameters(), lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    batches_per_process = len(train_dataset) // (args.train_batch_size * accelerator.num_processes)  # drop_last sharding
    updates_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    trainer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(trainer, optimizer, train_dataloader, lr_scheduler)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)  # per process, after sharding
    disc = disc_optimizer = None
    if use_disc:
        disc = PatchGANDiscriminator(3, args.disc_channels, args.disc_layers)
        disc_optimizer = torch.optim.AdamW(
            disc.parameters(), lr=(args.disc_learning_rate or args.learning_rate) * scale, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        )
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    vq = accelerator.unwrap_model(trainer).vq
    usage = CodebookUsageTracker(vq.config.codebook_size, args.dead_code_steps)

    if accelerator.is_main_process and log_with is not None:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    resume_path = resolve_resume_path(args, output_dir)
    codebook_init = args.codebook_init
    if codebook_init == "auto":
        codebook_init = "none" if args.pretrained_model_name_or_path else "data"
    if codebook_init != "none" and resume_path is None:
        generator = torch.Generator().manual_seed(sampler_seed)
        init_count = min(len(train_dataset), max(args.train_batch_size, math.ceil(4 * vq.config.codebook_size / vq.patch_nums[-1] ** 2)), 256)
        init_images = torch.stack([train_dataset[int(i)]["pixel_values"] for i in torch.randperm(len(train_dataset), generator=generator)[:init_count]])
        initialize_codebook(vq, codebook_init, init_images.to(accelerator.device), generator)
        if accelerator.num_processes > 1:
            vq.quantizer.embedding.weight.data.copy_(broadcast(vq.quantizer.embedding.weight.data.contiguous(), from_process=0))

    # ------------------------------------------------------------------ resume
    global_step = 0
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info("no complete checkpoint in %s: starting a new run", output_dir)
    if resume_path is not None:
        logger.info("resuming from %s", resume_path)
        accelerator.load_state(str(resume_path))
        global_step = int(json.loads((resume_path / COMPLETE_MARKER).read_text())["global_step"])
        if (resume_path / USAGE_STATE_FILE).is_file():
            usage.load_state_dict(load_file(str(resume_path / USAGE_STATE_FILE)))
    initial_global_step = global_step
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)

    logger.info(
        "training %d steps (%d images, batch %d × %d accumulation × %d processes), tokenizer %d px, patch_nums %s, V=%d",
        max_train_steps, len(train_dataset), args.train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
        resolution, vq.patch_nums, vq.config.codebook_size,
    )
    last_layer = vq.decoder.conv_out.weight
    disc_module = accelerator.unwrap_model(disc) if use_disc else None
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    logs: dict = {}
    val_metrics: dict = {}
    initial_val_metrics: dict = {}
    if accelerator.is_main_process and args.validation_steps and global_step == 0:
        initial_val_metrics = run_validation(accelerator, vq, val_images, output_dir, 0)
        accelerator.log(initial_val_metrics, step=0)
    step_hits = torch.zeros(vq.config.codebook_size, device=accelerator.device)
    candidates = None
    step_started, step_images = time.perf_counter(), 0  # images/s of each optimizer step (its wall time)

    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # the sampler's permutation
        train_dataset.set_epoch(epoch)  # crops/flips (Accelerate skips this when it shards the batch sampler)
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in loader:
            gan_active = use_disc and global_step >= args.disc_start_step
            models = (trainer, disc) if use_disc else (trainer,)
            with accelerator.accumulate(*models):
                images = batch["pixel_values"]
                step_images += images.shape[0]
                out = trainer(images)
                reconstruction = out["reconstruction"]
                rec_loss = reconstruction_loss(reconstruction, images, args.l2_weight, args.l1_weight)
                nll = rec_loss
                if perceptual is not None:
                    p_loss = perceptual(reconstruction.float(), images.float()).mean()
                    nll = nll + args.perceptual_weight * p_loss
                    logs["loss/perceptual"] = p_loss.item()
                loss = nll + args.vq_weight * out["vq_loss"]
                if gan_active:
                    disc_module.requires_grad_(False)
                    with accelerator.autocast():
                        g_loss = hinge_generator_loss(disc_module(reconstruction))
                    weight = args.disc_weight
                    if not args.no_adaptive_disc_weight:
                        weight = weight * adaptive_generator_weight(nll, g_loss, last_layer)
                    loss = loss + weight * g_loss
                    logs["loss/generator"] = g_loss.item()
                    logs["loss/adaptive_disc_weight"] = float(weight)
                accelerator.backward(loss)
                if gan_active:
                    disc_module.requires_grad_(True)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainer.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                if gan_active:
                    with accelerator.autocast():
                        logits = disc(torch.cat([images, reconstruction.detach()], dim=0))
                    real_logits, fake_logits = logits.chunk(2, dim=0)
                    d_loss = hinge_discriminator_loss(real_logits, fake_logits)
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    logs["loss/discriminator"] = d_loss.item()
                    logs["disc/logits_real"] = real_logits.float().mean().item()
                    logs["disc/logits_fake"] = fake_logits.float().mean().item()

                step_hits += out["code_hits"].detach()
                candidates = out.get("restart_candidates")
                logs["loss/total"] = loss.item()
                logs["loss/reconstruction"] = rec_loss.item()
                logs["loss/mse"] = F.mse_loss(reconstruction.detach().float(), images.float()).item()
                logs["loss/vq"] = out["vq_loss"].item()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            # the losses' .item() waited for the step; every process sees equally many images
            logs["img_per_s"] = step_images * accelerator.num_processes / (time.perf_counter() - step_started)

            # codebook usage and dead codes (identical on every process: hits are summed over processes)
            hits = accelerator.reduce(step_hits, reduction="sum") if accelerator.num_processes > 1 else step_hits
            logs.update(usage.update(hits, global_step))
            step_hits = torch.zeros_like(step_hits)
            dead = usage.dead_codes(global_step)
            restarted = 0
            if dead.numel() and candidates is not None and candidates.shape[0] > 0:
                generator = torch.Generator().manual_seed(sampler_seed * 7_919 + global_step)
                new_vectors = sample_restart_vectors(candidates, dead.numel(), generator).to(accelerator.device)
                if accelerator.num_processes > 1:
                    new_vectors = broadcast(new_vectors.contiguous(), from_process=0)
                restart_dead_codes(vq, dead, new_vectors, optimizer)
                usage.mark_restarted(dead, global_step)
                restarted = int(dead.numel())
            logs["codebook/restarted"] = restarted
            logs["codebook/total_restarts"] = usage.total_restarts
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(mse=f"{logs['loss/mse']:.4f}", vq=f"{logs['loss/vq']:.4f}", usage=f"{logs['codebook/usage']:.2f}", img_per_s=f"{logs['img_per_s']:.1f}")

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, output_dir, global_step, usage)
            if accelerator.is_main_process and args.validation_steps and global_step % args.validation_steps == 0:
                val_metrics = run_validation(accelerator, vq, val_images, output_dir, global_step)
                logs.update(val_metrics)
            accelerator.log(logs, step=global_step)
            for key in [k for k in logs if k.startswith("val/")]:
                del logs[key]
            if global_step >= max_train_steps:
                break
            step_started, step_images = time.perf_counter(), 0  # checkpoints and validation are not training time

    # ------------------------------------------------------------------ export
    accelerator.wait_for_everyone()
    result = {"global_step": global_step, "initial_global_step": initial_global_step, "output_dir": str(output_dir), "logs": dict(logs)}
    if accelerator.is_main_process:
        if not val_metrics or not args.validation_steps or global_step % args.validation_steps:
            val_metrics = run_validation(accelerator, vq, val_images, output_dir, global_step)
            accelerator.log(val_metrics, step=global_step)
        vq.save_pretrained(str(output_dir), safe_serialization=True)  # config.json + diffusion_pytorch_model.safetensors
        logger.info("saved the tokenizer to %s (validation %s)", output_dir, val_metrics)
        if args.push_to_hub:
            write_model_card(output_dir, vq, args, global_step, val_metrics)
            result["commit_url"] = push_tokenizer_to_hub(output_dir, args.hub_model_id, args.hub_token, args.hub_private)
    result["validation"] = val_metrics
    result["initial_validation"] = initial_val_metrics
    accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)
    except ValueError as error:  # bad flags or data: a clear message, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
