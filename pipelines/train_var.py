#!/usr/bin/env python
"""
Fine-tune or train VAR (next-scale prediction) on class-labelled images with 🤗 Accelerate.

    accelerate launch pipelines/train_var.py \
        --pretrained_model_name_or_path path/or/repo-of-a-var-hf-pipeline \
        --train_data_dir my_images/  (one sub-folder per class) \
        --train_batch_size 16 --max_train_steps 2000 --learning_rate 1e-5 \
        --checkpointing_steps 500 --mixed_precision bf16 --output_dir var-finetuned

The recipe is upstream's (FoundationVision/VAR `train.py`): cross-entropy over all tokens of all scales, label dropout
to the null class, AdamW (0.9, 0.95) without weight decay on biases/embeddings/scales, warm-up then 'lin0' decay,
gradient clipping at 2.0, a frozen float32 tokenizer. Output layout of `--output_dir`:

    pipeline/                 the trained VARPipeline (configs, safetensors, README.md): load, share or push this
    checkpoints/checkpoint-N/ accelerate states for --resume_from_checkpoint (hold pickles: local use only)
    samples/step-N.png        validation grids (one row per class)
    lora_adapter/             with --use_lora: the adapters alone (peft format, safetensors); pipeline/ has them merged
    metrics.jsonl, logs/      per-step metrics, tracker logs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, GradScalerKwargs, ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

import var_hf
from var_hf import MultiScaleVQModel, VARConfig, VARPipeline, VARTransformer
from var_hf.safety import check_folder_has_no_pickles
from var_hf.training_data import load_class_image_dataset
from var_hf.training_var import (
    SCHEDULE_TYPES,
    EpochShuffleSampler,
    TokenCacheError,
    VARLRWDSchedule,
    check_token_cache,
    checkpoint_step,
    clear_token_cache,
    compile_transformer_blocks,
    encode_token_shards,
    latest_checkpoint,
    load_ema,
    load_token_cache,
    no_weight_decay_names,
    progressive_stage,
    progressive_token_weights,
    prune_checkpoints,
    read_token_cache_info,
    resize_class_embedding,
    save_ema,
    step_seed,
    tokenizer_fingerprint,
    transformer_from_parameters,
    transformer_from_state_dict,
    upstream_init_adaln_gamma,
    upstream_lr_end_factor,
    upstream_peak_lr,
    var_param_groups,
    write_token_cache_info,
)

logger = get_logger(__name__, log_level="INFO")

PIPELINE_SUBFOLDER = "pipeline"
CHECKPOINTS_SUBFOLDER = "checkpoints"
LORA_SUBFOLDER = "lora_adapter"


class TrainingInputError(ValueError):
    """Bad flags or data, found before any training step."""


# ------------------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune or train a VAR pipeline (var-hf) with accelerate.")
    model = parser.add_argument_group("model: start from a pipeline, or from a tokenizer + config (from scratch)")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="var-hf pipeline folder or Hub repo id to fine-tune")
    model.add_argument("--revision", type=str, default=None, help="revision of a Hub repo")
    model.add_argument("--vqvae_model_name_or_path", type=str, default=None, help="from scratch: tokenizer to train on (a pipeline folder/repo with vqvae/, or a vqvae folder)")
    model.add_argument("--depth", type=int, default=16, help="from scratch: transformer blocks (upstream d16/d20/d24/d30)")
    model.add_argument("--width", type=int, default=None, help="from scratch: hidden size (default 64·depth)")
    model.add_argument("--num_heads", type=int, default=None, help="from scratch: attention heads (default depth)")
    model.add_argument("--mlp_ratio", type=float, default=4.0)
    model.add_argument("--num_classes", type=int, default=None, help="number of classes (from scratch: default max label + 1; fine-tuning: resizes the class embedding if different)")
    model.add_argument("--shared_adaln", action="store_true", help="from scratch: shared AdaLN (upstream 'saln', as VAR-d36-s)")
    model.add_argument("--legacy_attention", action="store_true", help="from scratch: no l2-normalised attention (upstream anorm=False)")
    model.add_argument("--drop_path_rate", type=float, default=None, help="from scratch: stochastic depth (default 0.1·depth/24 as upstream)")
    model.add_argument("--class_dropout_prob", type=float, default=None, help="label dropout to the null class (default: the model's, 0.1)")
    model.add_argument("--init_adaln", type=float, default=0.5, help="from scratch: AdaLN scale/shift init multiplier (upstream aln)")
    model.add_argument("--init_adaln_gamma", type=float, default=None, help="from scratch: AdaLN gate init multiplier (upstream alng; default by depth: 1e-3 ≤d20, 1e-4 d24, 1e-5 d30, 5e-6 d36)")
    model.add_argument("--init_head", type=float, default=0.02, help="from scratch: head init multiplier (upstream hd)")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="image folder with one sub-folder per class (integer names are class ids; other names are numbered in sorted order)")
    data.add_argument("--dataset_name", type=str, default=None, help="a `datasets` dataset (Hub name, or a local folder/`save_to_disk` path) with image and label columns")
    data.add_argument("--dataset_split", type=str, default="train")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--resolution", type=int, default=None, help="image side; must be the tokenizer's (default: the tokenizer's)")
    data.add_argument("--center_crop", action="store_true", help="centre crop instead of upstream's random crop")
    data.add_argument("--random_flip", action="store_true", help="random horizontal flips (upstream: none)")
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N samples")
    data.add_argument("--cache_tokens", type=str, default=None, help="token cache folder: encoded once (scale indices + labels in safetensors), then training skips the tokenizer; refused if made by another tokenizer")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="var-model", help="where the pipeline, checkpoints, samples and logs go")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and per-step randomness")
    train.add_argument("--train_batch_size", type=int, default=16, help="batch size per device")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides --num_train_epochs)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass: far less memory, ~30%% slower")
    train.add_argument("--torch_compile", action="store_true", help="torch.compile every transformer block (faster steps after a one-off compilation)")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="peak lr, or with --scale_lr the base lr 'tblr' per 256 images")
    train.add_argument("--scale_lr", action="store_true", help="upstream: peak lr = learning_rate · global batch (batch · processes · accumulation) / 256")
    train.add_argument("--lr_scheduler", type=str, default="lin0", choices=SCHEDULE_TYPES, help="upstream schedules after the warm-up ('lin0': hold 5%%, then linear decay)")
    train.add_argument("--lr_warmup_steps", type=int, default=None, help="linear warm-up steps (default: 2%% of the run, upstream's ep/50)")
    train.add_argument("--lr_warmup_start", type=float, default=0.005, help="warm-up starts at this fraction of the peak (upstream wp0)")
    train.add_argument("--lr_end_factor", type=float, default=None, help="final lr / peak (upstream wpe; default 0.1 for depth ≤ 20, else 0.01)")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--adam_weight_decay", type=float, default=0.05, help="weight decay at the start (upstream twd)")
    train.add_argument("--adam_weight_decay_end", type=float, default=None, help="weight decay at the end, cosine in between (upstream twde; default constant)")
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=2.0, help="gradient clipping (upstream tclip 2)")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="default: accelerate config")
    train.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ (upstream: on)")
    train.add_argument("--use_ema", action="store_true", help="keep an EMA of the transformer; the exported pipeline uses it")
    train.add_argument("--ema_decay", type=float, default=0.9999)
    train.add_argument("--ema_warmup", action="store_true", help="EMA warm-up (decay grows as 1 - (1 + step)^-power)")
    train.add_argument("--ema_power", type=float, default=2 / 3)
    train.add_argument("--progressive_fraction", type=float, default=0.0, help="progressive training over scales (upstream pg): reach all scales at this fraction of the run; 0 disables")
    train.add_argument("--progressive_initial_scale", type=int, default=4, help="last scale index trained at the start (upstream pg0)")
    train.add_argument("--progressive_warmup_steps", type=int, default=0, help="steps over which a newly added scale ramps its loss weight (upstream pgwp)")

    lora = parser.add_argument_group("LoRA: low-rank adapters on a frozen pretrained transformer (needs peft: pip install 'var-hf[lora]')")
    lora.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of every weight; the exported pipeline has them merged in, lora_adapter/ holds them alone (peft format, safetensors)")
    lora.add_argument("--lora_rank", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator: scale = alpha / rank (default: the rank, scale 1)")
    lora.add_argument("--lora_dropout", type=float, default=0.0)
    lora.add_argument("--lora_target_modules", nargs="+", default=list(LORA_TARGET_MODULES), help="linears of every block to adapt (add adaln_modulation to adapt the AdaLN projections too)")
    lora.add_argument("--lora_freeze_class_embedding", action="store_true", help="keep the class embedding frozen too (default: trained in full, as new or resized classes need it)")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="save an accelerate state every N steps")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint-N folder of this --output_dir")

    log = parser.add_argument_group("logging, validation, Hub")
    log.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml, mlflow, aim, all or none")
    log.add_argument("--logging_dir", type=str, default="logs", help="tracker folder, relative to --output_dir")
    log.add_argument("--tracker_project_name", type=str, default="train_var")
    log.add_argument("--validation_steps", type=int, default=None, help="sample a grid every N steps (and at the end)")
    log.add_argument("--validation_class_labels", type=int, nargs="+", default=None, help="classes of the grids (default: up to 8 classes of the data)")
    log.add_argument("--num_validation_images", type=int, default=4, help="images per class in a grid; 0 disables validation")
    log.add_argument("--validation_guidance_scale", type=float, default=1.5)
    log.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline (json, safetensors, README only)")
    log.add_argument("--hub_model_id", type=str, default=None, help="repo id for --push_to_hub (default: the name of --output_dir)")
    log.add_argument("--hub_private_repo", action="store_true")

    args = parser.parse_args(argv)
    if (args.pretrained_model_name_or_path is None) == (args.vqvae_model_name_or_path is None):
        parser.error("pass either --pretrained_model_name_or_path (fine-tune a pipeline) or --vqvae_model_name_or_path (train from scratch)")
    if args.train_data_dir is None and args.dataset_name is None and args.cache_tokens is None:
        parser.error("pass --train_data_dir or --dataset_name (or an existing --cache_tokens folder)")
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("pass only one of --train_data_dir and --dataset_name")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error("--max_train_steps must be >= 1")
    if args.use_lora:
        if args.pretrained_model_name_or_path is None:
            parser.error("--use_lora adapts a pretrained transformer: pass --pretrained_model_name_or_path")
        if args.use_ema:
            parser.error("--use_lora and --use_ema together are not supported")
        if args.lora_rank < 1 or not 0 <= args.lora_dropout < 1 or (args.lora_alpha is not None and args.lora_alpha <= 0):
            parser.error("--lora_rank must be >= 1, --lora_alpha > 0 and --lora_dropout in [0, 1)")
    return args


# ----------------------------------------------------------------------------------------------------------------- models
LORA_TARGET_MODULES = ("qkv_proj", "out_proj", "fc1", "fc2")


def add_lora_adapters(transformer: VARTransformer, args) -> torch.nn.Module:
    """Freeze the transformer and wrap it with peft LoRA adapters (plus a trained copy of the class embedding)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise TrainingInputError("--use_lora needs peft: pip install 'var-hf[lora]' (or pip install peft)") from error
    config = LoraConfig(
        r=args.lora_rank, lora_alpha=lora_alpha(args), lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules), modules_to_save=None if args.lora_freeze_class_embedding else ["class_embed"],
    )
    try:
        return get_peft_model(transformer, config)
    except ValueError as error:  # e.g. a target module name that no layer has
        raise TrainingInputError(f"--lora_target_modules {' '.join(args.lora_target_modules)}: {error}") from None


def lora_alpha(args) -> float:
    return args.lora_rank if args.lora_alpha is None else args.lora_alpha


def save_lora_adapter(peft_model, folder: Path) -> None:
    """The adapters alone (adapter_config.json + adapter_model.safetensors, peft's format), written complete or not at all."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(staging, safe_serialization=True)
    (staging / "README.md").unlink(missing_ok=True)  # peft's blank card template; pipeline/README.md describes the run
    move_into_place(staging, folder)
    logger.info(f"saved the LoRA adapters to {folder}")


def move_into_place(staging: Path, folder: Path) -> None:
    """Replace `folder` by the finished `staging` folder, once it is checked to hold no pickles."""
    check_folder_has_no_pickles(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def var_model(model: torch.nn.Module) -> VARTransformer:
    """The VARTransformer inside a peft wrapper (its LoRA layers still active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_tokenizer(path: str, revision: str | None) -> MultiScaleVQModel:
    """A `MultiScaleVQModel` from a pipeline folder/repo (its vqvae/) or a vqvae folder; safetensors only."""
    folder = Path(path)
    if not folder.is_dir():
        folder = Path(VARPipeline.download(path, revision=revision))
    check_folder_has_no_pickles(folder)
    subfolder = "vqvae" if (folder / "vqvae" / "config.json").is_file() else None
    if subfolder is None and not (folder / "config.json").is_file():
        raise TrainingInputError(f"--vqvae_model_name_or_path {path}: no vqvae/config.json or config.json found")
    return MultiScaleVQModel.from_pretrained(str(folder), subfolder=subfolder, use_safetensors=True)


def new_transformer(args, vqvae: MultiScaleVQModel, num_classes: int) -> VARTransformer:
    """A freshly initialised transformer (upstream init) fitting the tokenizer."""
    depth = args.depth
    config = VARConfig(
        num_hidden_layers=depth,
        hidden_size=args.width or 64 * depth,
        num_attention_heads=args.num_heads or depth,
        mlp_ratio=args.mlp_ratio,
        num_classes=num_classes,
        codebook_size=vqvae.config.codebook_size,
        latent_channels=vqvae.config.latent_channels,
        patch_nums=list(vqvae.config.patch_nums),
        shared_adaln=args.shared_adaln,
        attn_l2_norm=not args.legacy_attention,
        class_dropout_prob=0.1 if args.class_dropout_prob is None else args.class_dropout_prob,
        drop_path_rate=0.1 * depth / 24 if args.drop_path_rate is None else args.drop_path_rate,
        init_adaln=args.init_adaln,
        init_adaln_gamma=upstream_init_adaln_gamma(depth) if args.init_adaln_gamma is None else args.init_adaln_gamma,
        init_head=args.init_head,
    )
    return VARTransformer(config)


def merged_id2label(base: dict[int, str] | None, data: dict[int, str], num_classes: int) -> dict[int, str]:
    """The base model's names, overridden by the data's class-folder names (bare integer folder names keep the base's)."""
    id2label = {i: str(i) for i in range(num_classes)}
    id2label.update({int(k): v for k, v in (base or {}).items() if int(k) < num_classes})
    id2label.update({int(k): v for k, v in data.items() if int(k) < num_classes and str(v) != str(k)})
    return id2label


# ------------------------------------------------------------------------------------------------------------------- data
def load_training_data(args, accelerator: Accelerator, vqvae: MultiScaleVQModel, num_classes: int | None):
    """The training dataset: images (encoded every step) or a token cache (built here if missing)."""
    resolution = vqvae.resolution

    def image_dataset(random_crop: bool, hflip: bool):
        try:
            dataset = load_class_image_dataset(
                train_data_dir=args.train_data_dir, dataset_name=args.dataset_name, resolution=resolution, num_classes=num_classes,
                image_column=args.image_column, label_column=args.label_column, split=args.dataset_split,
                random_crop=random_crop, hflip=hflip, seed=args.seed,
            )
        except (ValueError, FileNotFoundError) as error:
            hint = " (pass --num_classes N to resize the class embedding)" if "num_classes" in str(error) and args.pretrained_model_name_or_path else ""
            raise TrainingInputError(f"{error}{hint}") from None
        if args.max_train_samples is not None and args.max_train_samples < len(dataset):
            keep = subset_indices(len(dataset), args.max_train_samples, args.seed)
            dataset.samples = [dataset.samples[i] for i in keep] if isinstance(dataset.samples, list) else dataset.samples.select(keep)
        return dataset

    if args.cache_tokens is None:
        return image_dataset(random_crop=not args.center_crop, hflip=args.random_flip)

    cache_dir = Path(args.cache_tokens)
    fingerprint = tokenizer_fingerprint(vqvae)
    try:
        info = read_token_cache_info(cache_dir)
        if info is not None:
            check_token_cache(info, cache_dir, fingerprint, vqvae.patch_nums)
    except TokenCacheError as error:
        raise TrainingInputError(str(error)) from None
    if info is None:
        if args.train_data_dir is None and args.dataset_name is None:
            raise TrainingInputError(f"{cache_dir} holds no token cache yet: pass --train_data_dir or --dataset_name to build it")
        # Deterministic centre crops; with --random_flip a mirrored copy of every image is cached too.
        dataset = image_dataset(random_crop=False, hflip=False)
        if accelerator.is_main_process:
            clear_token_cache(cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        logger.info(f"encoding {len(dataset)} images into the token cache {cache_dir}")
        shards = encode_token_shards(
            vqvae, dataset, cache_dir, fingerprint, accelerator.process_index, accelerator.num_processes,
            batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers, device=accelerator.device,
            flip_copies=args.random_flip, progress=accelerator.is_local_main_process,
        )
        all_shards = sorted(gather_object(shards))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_token_cache_info(cache_dir, {
                "tokenizer_fingerprint": fingerprint,
                "patch_nums": vqvae.patch_nums,
                "codebook_size": vqvae.config.codebook_size,
                "resolution": resolution,
                "num_samples": len(dataset) * (2 if args.random_flip else 1),
                "flip_copies": bool(args.random_flip),
                "id2label": {str(k): v for k, v in dataset.id2label.items()},
                "source": data_source(args),
                "shards": all_shards,
            })
        accelerator.wait_for_everyone()
    else:
        logger.info(f"using the token cache {cache_dir} ({info['num_samples']} samples, made from {info.get('source')})")
    try:
        dataset = load_token_cache(cache_dir, fingerprint, vqvae.patch_nums)
    except TokenCacheError as error:
        raise TrainingInputError(str(error)) from None
    if num_classes is not None and len(dataset) and int(dataset.class_labels.max()) >= num_classes:
        raise TrainingInputError(f"token cache labels reach {int(dataset.class_labels.max())}, >= the model's num_classes ({num_classes})")
    if args.max_train_samples is not None and args.max_train_samples < len(dataset):
        keep = torch.tensor(subset_indices(len(dataset), args.max_train_samples, args.seed))
        dataset.scale_indices, dataset.class_labels = dataset.scale_indices[keep], dataset.class_labels[keep]
    return dataset


def subset_indices(total: int, count: int, seed: int) -> list[int]:
    """A seeded random subset (sorted), so --max_train_samples does not keep only the first classes."""
    return sorted(random.Random(seed).sample(range(total), count))


def data_source(args) -> str:
    if args.train_data_dir is not None:
        return f"image folder {Path(args.train_data_dir).name}"
    if args.dataset_name is not None:
        return f"dataset {args.dataset_name} (split {args.dataset_split})"
    return f"token cache {Path(args.cache_tokens).name}"


def dataset_labels(dataset) -> list[int]:
    if hasattr(dataset, "class_labels"):
        return dataset.class_labels.tolist()
    return [int(label) for _, label in dataset.samples] if isinstance(dataset.samples, list) else list(dataset.samples["label"])


# ------------------------------------------------------------------------------------------------------------ checkpoints
def resolve_resume_checkpoint(args, checkpoints_dir: Path) -> Path | None:
    """The checkpoint to resume from. Checkpoints hold pickles, so only this run's own checkpoints folder is read."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(checkpoints_dir)
    path = Path(args.resume_from_checkpoint)
    if not path.exists() and (checkpoints_dir / path.name).exists() and len(path.parts) == 1:
        path = checkpoints_dir / path.name
    path = path.resolve()
    if path.parent != checkpoints_dir.resolve():
        raise TrainingInputError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: checkpoints are read only from this run's own "
            f"{checkpoints_dir} (accelerate states are pickles; never load ones you did not write)"
        )
    if not path.is_dir():
        raise TrainingInputError(f"--resume_from_checkpoint: {path} does not exist (complete checkpoints: checkpoint-N)")
    checkpoint_step(path)
    return path


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, total_limit: int | None, ema=None, model=None) -> Path:
    """`save_state` into checkpoint-N.tmp, then rename: an interrupted save never looks complete."""
    final = checkpoints_dir / f"checkpoint-{step}"
    staging = checkpoints_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        prune_checkpoints(checkpoints_dir, total_limit)
        if final.exists():
            shutil.rmtree(final)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if ema is not None and accelerator.is_main_process:
        save_ema(ema, accelerator.unwrap_model(model), staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging.rename(final)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------------------- validation
def sampling_supported(accelerator: Accelerator) -> bool:
    """Sampling needs the full weights on one process: not available with sharded parameters."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return False
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return not (accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3)


@torch.no_grad()
def log_validation(transformer, vqvae, id2label, class_labels, args, accelerator, step: int, output_dir: Path) -> np.ndarray:
    """Sample `num_validation_images` per class with a seeded generator; save a grid (rows = classes) and log it."""
    was_training = transformer.training
    transformer.eval()
    pipe = VARPipeline(transformer=transformer, vqvae=vqvae, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    images = pipe(
        class_labels=class_labels, num_images_per_prompt=args.num_validation_images, guidance_scale=args.validation_guidance_scale,
        generator=generator, output_type="np",
    ).images  # (classes · n, H, W, 3) in [0, 1], sampled with the float32 master weights
    transformer.train(was_training)
    n, (h, w) = args.num_validation_images, images.shape[1:3]
    grid = images.reshape(len(class_labels), n, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(len(class_labels) * h, n * w, 3)
    grid = (grid * 255).round().clip(0, 255).astype(np.uint8)
    samples_dir = output_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(grid).save(samples_dir / f"step-{step}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{id2label.get(c, c)}") for im, c in zip(images, np.repeat(class_labels, n))]}, step=step)
    return grid


# ------------------------------------------------------------------------------------------------------------- model card
def training_card_text(args, argv: list[str], dataset, id2label: dict, class_dropout_prob: float, global_step: int, peak_lr: float, global_batch: int, num_processes: int) -> str:
    command = "accelerate launch pipelines/train_var.py " + shlex.join(argv)
    labels = dataset_labels(dataset)
    rows = [
        ("started from", args.pretrained_model_name_or_path or f"scratch (tokenizer {args.vqvae_model_name_or_path})"),
        ("data", f"{data_source(args)}: {len(dataset)} samples, {len(set(labels))} classes ({', '.join(id2label.get(c, str(c)) for c in sorted(set(labels))[:20])})"),
        ("steps", f"{global_step} optimizer steps, global batch {global_batch} ({num_processes} process(es) × {args.train_batch_size} × {args.gradient_accumulation_steps} accumulation)"),
        ("optimizer", f"AdamW ({args.adam_beta1}, {args.adam_beta2}), peak lr {peak_lr:.3g} ({args.lr_scheduler}), weight decay {args.adam_weight_decay}, clip {args.max_grad_norm}"),
        ("precision", args.mixed_precision or "accelerate default"),
        ("label dropout", f"{class_dropout_prob:g} to the null class"),
        ("EMA", f"yes (decay {args.ema_decay}), exported weights are the EMA" if args.use_ema else "no"),
    ]
    if args.use_lora:
        scale = lora_alpha(args) / args.lora_rank
        class_embedding = "frozen" if args.lora_freeze_class_embedding else "trained in full"
        targets = ", ".join(args.lora_target_modules)
        rows.append(("LoRA", f"rank {args.lora_rank}, scale {scale:g}, on {targets}; class embedding {class_embedding}; merged into the exported weights"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return (
        f"Trained with `pipelines/train_var.py` (var-hf {var_hf.__version__}, 🤗 Accelerate).\n\n"
        f"{table}\n\nTraining command:\n\n```bash\n{command}\n```"
    )


# ------------------------------------------------------------------------------------------------------------------- main
def main(args: list[str] | argparse.Namespace | None = None) -> dict:
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, argparse.Namespace) else []
    args = args if isinstance(args, argparse.Namespace) else parse_args(argv)
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_SUBFOLDER

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Without a GPU, CPU processes (e.g. 2 under `accelerate launch`) join over gloo.
        cpu=not torch.cuda.is_available(),
        # Upstream's fp16 loss scaler: initial scale 2^11, growth every 1000 steps.
        kwargs_handlers=[GradScalerKwargs(init_scale=2.0**11, growth_interval=1000)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.use_ema and not sampling_supported(accelerator):
        raise TrainingInputError("--use_ema needs unsharded parameters: not supported with FSDP or DeepSpeed ZeRO-3")
    if args.use_lora and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise TrainingInputError("--use_lora runs on one process or with DDP (multi-GPU, multi-node); FSDP and DeepSpeed are not supported")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    resume_path = resolve_resume_checkpoint(args, checkpoints_dir)
    hub_repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        hub_repo_id = create_repo(args.hub_model_id or output_dir.resolve().name, exist_ok=True, private=args.hub_private_repo or None).repo_id

    # 1. Tokenizer (frozen, float32, eval) and the transformer to train
    base_id2label = None
    if args.pretrained_model_name_or_path is not None:
        pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch.float32, revision=args.revision)
        transformer, vqvae, base_id2label = pipe.transformer, pipe.vqvae, pipe.id2label
        del pipe
        if args.use_lora and args.lora_freeze_class_embedding and (args.num_classes or 0) > transformer.config.num_classes:
            raise TrainingInputError(
                f"--num_classes {args.num_classes} adds classes to the model's {transformer.config.num_classes}: their embeddings "
                "must train, so drop --lora_freeze_class_embedding"
            )
        if args.num_classes is not None and args.num_classes != transformer.config.num_classes:
            logger.info(f"resizing the class embedding: {transformer.config.num_classes} -> {args.num_classes} classes")
            resize_class_embedding(transformer, args.num_classes)
        num_classes = transformer.config.num_classes
    else:
        vqvae = load_tokenizer(args.vqvae_model_name_or_path, args.revision)
        transformer, num_classes = None, args.num_classes
    vqvae.requires_grad_(False)
    vqvae.eval()
    if args.resolution is not None and args.resolution != vqvae.resolution:
        raise TrainingInputError(
            f"--resolution {args.resolution} is not the tokenizer's resolution {vqvae.resolution} "
            f"(last scale {vqvae.patch_nums[-1]} tokens × downsampling {vqvae.downsample_factor}); VAR trains at its tokenizer's resolution"
        )
    vqvae.to(accelerator.device)

    # 2. Data (checked before any training: empty folders, unreadable images, class ids >= num_classes)
    train_dataset = load_training_data(args, accelerator, vqvae, num_classes)
    if len(train_dataset) == 0:
        raise TrainingInputError("the training data is empty")
    labels = dataset_labels(train_dataset)
    if transformer is None:
        num_classes = num_classes or max(labels) + 1
        transformer = new_transformer(args, vqvae, num_classes)
        logger.info(f"new transformer: depth {transformer.config.num_hidden_layers}, width {transformer.config.hidden_size}, {num_classes} classes")
    if args.class_dropout_prob is not None:
        transformer.config.class_dropout_prob = args.class_dropout_prob
    id2label = merged_id2label(base_id2label, train_dataset.id2label, num_classes)
    bad_classes = [c for c in args.validation_class_labels or [] if not 0 <= c <= num_classes]
    if bad_classes:
        raise TrainingInputError(f"--validation_class_labels {bad_classes} outside [0, {num_classes}] ({num_classes} is the null class)")
    transformer.to(torch.float32).train()
    if args.gradient_checkpointing:
        if hasattr(transformer, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.use_lora:
        transformer = add_lora_adapters(transformer, args)  # peft model: only adapters (and the class embedding) train
        trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        logger.info(f"LoRA rank {args.lora_rank}: {trainable:,} trainable of {sum(p.numel() for p in transformer.parameters()):,} parameters")
    if args.torch_compile:
        compile_transformer_blocks(var_model(transformer))

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(transformer.parameters(), decay=args.ema_decay, use_ema_warmup=args.ema_warmup, power=args.ema_power)
        ema.to(accelerator.device)

    # 3. Optimizer (upstream's no-decay groups), data loader, schedule
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    peak_lr = upstream_peak_lr(args.learning_rate, global_batch) if args.scale_lr else args.learning_rate
    no_decay = set(no_weight_decay_names(transformer))  # by name: FSDP may flatten parameters
    fsdp1 = accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2
    if fsdp1:  # FSDP1 wants the model wrapped before the optimizer is built (needs fsdp_use_orig_params: true)
        transformer = accelerator.prepare(transformer)
    optimizer = torch.optim.AdamW(
        var_param_groups(transformer, args.adam_weight_decay, no_decay), lr=peak_lr, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, fused=torch.cuda.is_available() and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU),
    )
    sampler = EpochShuffleSampler(len(train_dataset), seed=args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=False,
    )
    if fsdp1:
        optimizer, train_dataloader = accelerator.prepare(optimizer, train_dataloader)
    else:
        transformer, optimizer, train_dataloader = accelerator.prepare(transformer, optimizer, train_dataloader)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    depth = var_model(accelerator.unwrap_model(transformer)).config.num_hidden_layers
    warmup_steps = args.lr_warmup_steps if args.lr_warmup_steps is not None else round(0.02 * max_train_steps)
    schedule = VARLRWDSchedule(
        peak_lr=peak_lr, total_steps=max_train_steps, warmup_steps=warmup_steps, schedule=args.lr_scheduler,
        warmup_start=args.lr_warmup_start, end_factor=upstream_lr_end_factor(depth) if args.lr_end_factor is None else args.lr_end_factor,
        weight_decay=args.adam_weight_decay, weight_decay_end=args.adam_weight_decay_end,
    )
    patch_nums = list(vqvae.patch_nums)
    validation_classes = args.validation_class_labels or sorted(set(labels))[:8]
    validate = args.num_validation_images > 0 and sampling_supported(accelerator)
    if args.num_validation_images > 0 and not validate:
        logger.warning("validation sampling is skipped: parameters are sharded (FSDP / ZeRO-3)")

    if accelerator.is_main_process:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    # 4. Resume: same step, same data order (seeded sampler + skipped batches), same per-step randomness
    global_step, first_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint is not None and resume_path is None:
        logger.info(f"no checkpoint in {checkpoints_dir}; starting a new run")
    if resume_path is not None:
        logger.info(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        if ema is not None:
            load_ema(ema, resume_path, accelerator.device)
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    logger.info("***** Running training *****")
    logger.info(f"  samples = {len(train_dataset)}, classes = {num_classes}, epochs = {num_train_epochs}, optimizer steps = {max_train_steps}")
    logger.info(f"  batch per device = {args.train_batch_size}, global batch = {global_batch}, peak lr = {peak_lr:.3g}, warm-up = {warmup_steps}")
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    metrics_file = output_dir / "metrics.jsonl"
    losses: list[float] = []
    micro = 0  # micro-batches since the last optimizer step
    unwrapped = accelerator.unwrap_model(transformer)
    step_started, step_images = time.perf_counter(), 0  # images/s of each optimizer step (its wall time)

    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_batches:
            loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        running = torch.zeros(4, device=accelerator.device)  # loss, last-scale loss, accuracy, last-scale accuracy
        for batch in loader:
            with accelerator.accumulate(transformer):
                # Randomness of this micro-batch (label dropout, drop path) depends only on (seed, step, rank).
                torch.manual_seed(step_seed(args.seed, global_step * args.gradient_accumulation_steps + micro, accelerator.process_index))
                class_labels = batch["class_labels"].long()
                step_images += class_labels.shape[0]
                with torch.no_grad():
                    if "scale_indices" in batch:  # token cache
                        tokens = batch["scale_indices"].long()
                        scale_indices = list(tokens.split([pn * pn for pn in patch_nums], dim=1))
                    else:  # frozen tokenizer, float32, outside autocast
                        scale_indices = vqvae.encode_scales(batch["pixel_values"].float())
                        tokens = torch.cat(scale_indices, dim=1)  # (B, L)
                    teacher_input = vqvae.teacher_forcing_input(scale_indices)  # (B, L - first, Cvae)
                lr, wd = schedule.apply(optimizer, global_step)
                prog_si, prog_weight = progressive_stage(
                    global_step, warmup_steps, max_train_steps, args.progressive_fraction, args.progressive_initial_scale,
                    len(patch_nums), args.progressive_warmup_steps,
                )
                logits = transformer(class_labels, teacher_input).logits  # (B, L, V) float32
                token_loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)  # (B, L)
                weights = progressive_token_weights(patch_nums, prog_si, prog_weight).to(token_loss.device)
                loss = token_loss.mul(weights).sum(dim=1).mean()  # plain mean over all tokens when not progressive
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            with torch.no_grad():
                last = patch_nums[-1] ** 2
                correct = logits.argmax(-1).eq(tokens).float()
                running += torch.stack([loss.detach(), token_loss[:, -last:].mean(), correct.mean(), correct[:, -last:].mean()])
            micro += 1
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done
            stats = accelerator.reduce(running / micro, reduction="mean").tolist()  # waits for the step
            img_per_s = step_images * accelerator.num_processes / (time.perf_counter() - step_started)  # equal batches on every process
            running.zero_()
            micro = 0
            global_step += 1
            progress_bar.update(1)
            if ema is not None:
                ema.step(unwrapped.parameters())
            logs = {"loss": stats[0], "loss_tail": stats[1], "acc": stats[2], "acc_tail": stats[3], "lr": lr, "weight_decay": wd, "img_per_s": img_per_s}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            if args.progressive_fraction > 0:
                logs["progressive_scale"] = prog_si if prog_si >= 0 else len(patch_nums) - 1
            losses.append(stats[0])
            accelerator.log(logs, step=global_step)
            progress_bar.set_postfix(loss=f"{stats[0]:.4f}", lr=f"{lr:.2e}", img_per_s=f"{img_per_s:.1f}")
            if accelerator.is_main_process:
                with open(metrics_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": global_step, **logs}) + "\n")

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, checkpoints_dir, global_step, args.checkpoints_total_limit, ema, transformer)
            if validate and args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                if accelerator.is_main_process:
                    if ema is not None:
                        ema.store(unwrapped.parameters())
                        ema.copy_to(unwrapped.parameters())
                    log_validation(var_model(unwrapped), vqvae, id2label, validation_classes, args, accelerator, global_step, output_dir)
                    if ema is not None:
                        ema.restore(unwrapped.parameters())
                accelerator.wait_for_everyone()
            if global_step >= max_train_steps:
                break
            step_started, step_images = time.perf_counter(), 0  # checkpoints and sample grids are not training time
    progress_bar.close()

    # 5. Export the pipeline (safetensors + model card only), optionally push it
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(transformer)  # gathers sharded (FSDP / ZeRO-3) weights on the main process
    pipeline_dir = output_dir / PIPELINE_SUBFOLDER
    if accelerator.is_main_process:
        if ema is not None:
            export = transformer_from_parameters(unwrapped, ema.shadow_params)
        elif args.use_lora:
            save_lora_adapter(unwrapped, output_dir / LORA_SUBFOLDER)
            export = unwrapped.merge_and_unload()  # in place (training is over): W + (alpha / rank) · B A, a plain VARTransformer
        else:
            export = transformer_from_state_dict(unwrapped.config, state_dict)
        export.config.class_dropout_prob = var_model(unwrapped).config.class_dropout_prob
        pipe = VARPipeline(transformer=export, vqvae=vqvae, id2label=id2label)
        staging = output_dir / f"{PIPELINE_SUBFOLDER}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging)
        card = training_card_text(
            args, argv, train_dataset, id2label, export.config.class_dropout_prob, global_step, peak_lr, global_batch, accelerator.num_processes
        )
        base_model = args.pretrained_model_name_or_path if args.pretrained_model_name_or_path and not Path(args.pretrained_model_name_or_path).exists() else None
        datasets = [args.dataset_name] if args.dataset_name and not Path(args.dataset_name).exists() else None
        from var_hf.model_card import write_model_card

        write_model_card(staging, pipe, repo_id=hub_repo_id or "path/to/pipeline", training=card, base_model=base_model, datasets=datasets)
        move_into_place(staging, pipeline_dir)
        logger.info(f"saved the pipeline to {pipeline_dir}")
        if validate:
            pipe.to(accelerator.device)
            log_validation(pipe.transformer, pipe.vqvae, id2label, validation_classes, args, accelerator, global_step, output_dir)
        if args.push_to_hub:
            from var_hf.hub import push_folder_to_hub

            url = push_folder_to_hub(pipeline_dir, hub_repo_id, private=args.hub_private_repo or None, commit_message=f"Train VAR: step {global_step}")
            logger.info(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "pipeline_dir": pipeline_dir, "output_dir": output_dir}


if __name__ == "__main__":
    try:
        main()
    except TrainingInputError as error:
        print(f"train_var.py: error: {error}", file=sys.stderr)
        sys.exit(2)
