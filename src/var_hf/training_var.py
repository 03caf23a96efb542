"""Reusable pieces of the VAR training recipe (`pipelines/train_var.py`).

* parameter groups with upstream's weight-decay exclusions,
* upstream's learning-rate schedule (linear warm-up, then 'lin0' decay) and cosine weight-decay schedule,
* upstream's progressive training over scales (as a per-token loss weight),
* a seeded epoch sampler (same data order after a resume),
* the token cache (scale indices + labels in safetensors shards, tied to a tokenizer fingerprint),
* checkpoint folders (`checkpoint-N`, written as `checkpoint-N.tmp` and renamed when complete),
* EMA persistence as a plain `VARTransformer` folder (diffusers' `EMAModel.save_pretrained` needs a diffusers model),
* resizing the class embedding to another number of classes.

Everything here is plain PyTorch and usable without accelerate.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, Sampler

from .modeling_var import compile_transformer_blocks  # noqa: F401  (re-exported: the training recipe's compile step)

# --------------------------------------------------------------------------------------------------- weight decay groups
# Upstream (`VAR/utils/lr_control.filter_params` + `train.py`) excludes 1-D parameters, names ending in `bias`, and names
# containing any of these keys. The first group are upstream's names, the second their var-hf equivalents
# (pos_start -> start_pos_embed, pos_1LC -> pos_embed, lvl_embed -> scale_embed, ada_gss -> adaln_table,
# scale_mul -> logit_scale). Class embedding, input projection, all matrices and shared AdaLN weights are decayed.
UPSTREAM_NO_WEIGHT_DECAY_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)
VAR_HF_NO_WEIGHT_DECAY_KEYS = ("start_pos_embed", "scale_embed", "adaln_table", "logit_scale")
NO_WEIGHT_DECAY_KEYS = UPSTREAM_NO_WEIGHT_DECAY_KEYS + VAR_HF_NO_WEIGHT_DECAY_KEYS


def is_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Upstream's rule: 1-D tensors, biases and the named embeddings/scales are not decayed."""
    return param.ndim <= 1 or name.endswith("bias") or any(key in name for key in NO_WEIGHT_DECAY_KEYS)


def canonical_parameter_name(name: str) -> str:
    """The parameter name without the prefixes of DDP/FSDP/activation-checkpointing wrappers."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name[len("module."):] if name.startswith("module.") else name


def var_param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str] | None = None) -> list[dict]:
    """
    Two AdamW parameter groups (decayed, not decayed) of the trainable parameters. Each group carries `wd_scale`
    (1 or 0) so a weight-decay schedule can rescale it, as upstream's `wd_sc`. `no_decay_names` (from
    `no_weight_decay_names` of the unwrapped model) classifies by name, for wrappers that flatten parameters (FSDP1).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if no_decay_names is not None:
            excluded = canonical_parameter_name(name) in no_decay_names
        else:
            excluded = is_no_weight_decay(name, param)
        (no_decay if excluded else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0, "lr_scale": 1.0, "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0, "lr_scale": 1.0, "group_name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def no_weight_decay_names(model: nn.Module) -> list[str]:
    return [canonical_parameter_name(name) for name, param in model.named_parameters() if is_no_weight_decay(name, param)]


# -------------------------------------------------------------------------------------------------------- lr schedule
SCHEDULE_TYPES = ("lin0", "lin", "lin00", "cos", "exp", "constant")


def upstream_lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "lin0",
    warmup_start: float = 0.005,
    end_factor: float = 0.01,
) -> float:
    """
    Learning-rate multiplier of optimizer step `step` (0-based), upstream's `lr_wd_annealing`: linear warm-up from
    `warmup_start` to 1 over `warmup_steps`, then (with p the fraction of the remaining steps done)
    'lin0': hold 1 while p < 0.05, then linear to `end_factor` at the last step; 'lin': the same with 0.15;
    'lin00': linear from 1 to `end_factor`; 'cos': half cosine to `end_factor`; 'exp': hold while p < 0.15, then
    exponential to `end_factor`; 'constant': 1 after the warm-up.
    """
    if schedule not in SCHEDULE_TYPES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULE_TYPES}")
    warmup_steps = round(warmup_steps)
    if step < warmup_steps:
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = total_steps - 1 - warmup_steps
    passed = min(max((step - warmup_steps) / span, 0.0), 1.0) if span > 0 else 1.0  # [0, 1]
    rest = 1 - passed
    if schedule == "cos":
        return end_factor + (1 - end_factor) * (0.5 + 0.5 * math.cos(math.pi * passed))
    if schedule == "lin00":
        return end_factor + (1 - end_factor) * rest
    hold = 0.05 if schedule == "lin0" else 0.15
    if passed < hold:
        return 1.0
    if schedule == "exp":
        return math.exp((passed - hold) / (1 - hold) * math.log(end_factor))
    return end_factor + (1 - end_factor) * rest / (1 - hold)


def upstream_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from `start` (step 0) to `end` (last step) over the whole run, as upstream."""
    passed = step / (total_steps - 1) if total_steps > 1 else 1.0
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * passed))


@dataclass
class VARLRWDSchedule:
    """
    Upstream's lr and weight-decay schedules as a pure function of the optimizer step: nothing to checkpoint, and a
    resumed run continues exactly. Call `apply(optimizer, step)` before every optimizer step.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "lin0"
    warmup_start: float = 0.005
    end_factor: float = 0.01
    weight_decay: float = 0.05
    weight_decay_end: float | None = None

    def lr(self, step: int) -> float:
        return self.peak_lr * upstream_lr_factor(step, self.warmup_steps, self.total_steps, self.schedule, self.warmup_start, self.end_factor)

    def wd(self, step: int) -> float:
        end = self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
        return upstream_weight_decay(step, self.total_steps, self.weight_decay, end)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        lr, wd = self.lr(step), self.wd(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        return lr, wd


def upstream_peak_lr(base_lr: float, global_batch_size: int) -> float:
    """Upstream's linear scaling: peak = tblr · global_batch / 256 (global batch counts accumulation steps)."""
    return base_lr * global_batch_size / 256


def upstream_init_adaln_gamma(depth: int) -> float:
    """`alng` of the upstream README commands: 1e-3 (d16/d20), 1e-4 (d24), 1e-5 (d30), 5e-6 (d36)."""
    if depth <= 20:
        return 1e-3
    if depth <= 24:
        return 1e-4
    if depth <= 30:
        return 1e-5
    return 5e-6


def upstream_lr_end_factor(depth: int) -> float:
    """`wpe` of the upstream README commands: 0.1 for d16/d20, 0.01 for deeper models."""
    return 0.1 if depth <= 20 else 0.01


# -------------------------------------------------------------------------------------------- progressive training
def progressive_scale_index(step: int, warmup_steps: int, total_steps: int, fraction: float, initial_scale: int, num_scales: int) -> int:
    """
    Upstream's progressive schedule (`pg`, `pg0`): the last scale index trained at `step`. Until the warm-up ends it
    is `initial_scale`; it then grows linearly to the last scale, reached at `fraction · total_steps`. Returns -1 when
    progressive training is off or complete (all scales).
    """
    if fraction <= 0:
        return -1
    last = num_scales - 1
    initial_scale = min(max(initial_scale, 0), last)
    if step <= warmup_steps:
        scale = initial_scale
    elif step >= total_steps * fraction:
        scale = last
    else:
        progress = min(max((step - warmup_steps) / (total_steps * fraction - warmup_steps), 0), 1)
        scale = initial_scale + round(progress * (last - initial_scale))
    return -1 if scale == last else scale


def progressive_stage(step: int, warmup_steps: int, total_steps: int, fraction: float, initial_scale: int, num_scales: int, stage_warmup_steps: int) -> tuple[int, float]:
    """
    `(scale index, weight of that newest scale)` at `step`. As upstream, a scale that joins ramps its loss weight
    from 1/stage_warmup_steps (at least 0.01) to 1 over `stage_warmup_steps`; the first stage has no ramp. A pure
    function of the step (the stage start is found by bisection), so a resumed run matches.
    """
    current = progressive_scale_index(step, warmup_steps, total_steps, fraction, initial_scale, num_scales)
    if current < 0:
        return -1, 1.0
    first = progressive_scale_index(0, warmup_steps, total_steps, fraction, initial_scale, num_scales)
    if current == first or stage_warmup_steps <= 0:
        return current, 1.0
    # The scale index is non-decreasing in the step (-1 = all scales, last): find where this stage began.
    key = lambda s: (lambda si: num_scales if si < 0 else si)(progressive_scale_index(s, warmup_steps, total_steps, fraction, initial_scale, num_scales))  # noqa: E731
    stage_start = bisect.bisect_left(range(step + 1), current, key=key)
    ramp = (step - stage_start + 1) / stage_warmup_steps
    return current, max(min(ramp, 1.0), 0.01)


def progressive_token_weights(patch_nums: list[int], scale_index: int, newest_weight: float = 1.0) -> torch.Tensor:
    """
    Per-token loss weights (L,): 1/L for the scales up to `scale_index`, `newest_weight`/L for that scale, 0 after
    (upstream's `loss_weight`); `scale_index` -1 weights every token 1/L (the plain mean).
    """
    lengths = [pn * pn for pn in patch_nums]
    total = sum(lengths)
    weights = torch.full((total,), 1.0 / total)
    if scale_index < 0:
        return weights
    begin = sum(lengths[:scale_index])
    end = begin + lengths[scale_index]
    weights[begin:end] *= newest_weight
    weights[end:] = 0
    return weights


# ------------------------------------------------------------------------------------------------------- data order
class EpochShuffleSampler(Sampler[int]):
    """
    A permutation of the dataset that depends only on (seed, epoch): every process draws the same order (accelerate
    shards the batches), and a resumed run replays it. Uses its own generator, never the global RNG.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def step_seed(seed: int, micro_step: int, process_index: int) -> int:
    """Seed of the global RNG for one micro-batch (label dropout, drop path): depends on the step, not on history."""
    return (seed * 1_000_003 + micro_step * 1_009 + process_index) % (2**63 - 1)


# --------------------------------------------------------------------------------------------------------- token cache
TOKEN_CACHE_FORMAT = "var-hf-token-cache"
TOKEN_CACHE_VERSION = 1
TOKEN_CACHE_INFO = "cache_info.json"


class TokenCacheError(ValueError):
    """A token cache that does not belong to this tokenizer or is malformed."""


def tokenizer_fingerprint(vqvae) -> str:
    """
    sha256 of the tokenizer's config (without `_`-prefixed bookkeeping keys) and of every tensor of its state dict
    (name, dtype, shape, bytes, in name order): what its safetensors + config.json hold, wherever it was loaded from.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vqvae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vqvae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def token_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def read_token_cache_info(cache_dir: str | Path) -> dict | None:
    """The cache's `cache_info.json`, or None when there is no complete cache in `cache_dir`."""
    path = Path(cache_dir) / TOKEN_CACHE_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != TOKEN_CACHE_FORMAT:
        raise TokenCacheError(f"{path} is not a var-hf token cache")
    if info.get("version") != TOKEN_CACHE_VERSION:
        raise TokenCacheError(f"{path}: unsupported token cache version {info.get('version')} (expected {TOKEN_CACHE_VERSION})")
    return info


def check_token_cache(info: dict, cache_dir: str | Path, fingerprint: str, patch_nums: list[int]) -> None:
    """Refuse a cache made with another tokenizer (fingerprint) or patch schedule."""
    if info["tokenizer_fingerprint"] != fingerprint:
        raise TokenCacheError(
            f"token cache {cache_dir} was made with another tokenizer (fingerprint {info['tokenizer_fingerprint'][:16]}…, "
            f"this tokenizer is {fingerprint[:16]}…); its tokens would be meaningless for this model. Delete the folder "
            "or pass another --cache_tokens folder to re-encode the data."
        )
    if list(info["patch_nums"]) != list(patch_nums):
        raise TokenCacheError(f"token cache {cache_dir} has patch_nums {info['patch_nums']}, the model uses {list(patch_nums)}")


@torch.no_grad()
def encode_token_shards(
    vqvae,
    dataset: Dataset,
    cache_dir: str | Path,
    fingerprint: str,
    process_index: int = 0,
    num_processes: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    flip_copies: bool = False,
    shard_size: int = 50_000,
    progress: bool = False,
) -> list[str]:
    """
    Encode this process's share of `dataset` (items i ≡ process_index mod num_processes; items give "pixel_values" in
    [-1, 1] and "class_labels") into `tokens-rRRR-SSSSS.safetensors` shards of (scale indices (N, L), labels (N,),
    sample index (N,)). With `flip_copies` a mirrored copy of every image is added (sample index + len(dataset)).
    Returns the shard file names written.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(process_index, len(dataset), num_processes))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    dtype = token_dtype(vqvae.config.codebook_size)
    names: list[str] = []
    buffer: dict[str, list[torch.Tensor]] = {"scale_indices": [], "class_labels": [], "sample_index": []}

    def flush() -> None:
        if not buffer["sample_index"]:
            return
        name = f"tokens-r{process_index:03d}-{len(names):05d}.safetensors"
        tensors = {key: torch.cat(values).contiguous() for key, values in buffer.items()}
        save_file(tensors, str(cache_dir / name), metadata={"format": TOKEN_CACHE_FORMAT, "tokenizer_fingerprint": fingerprint})
        names.append(name)
        for values in buffer.values():
            values.clear()

    position = 0
    for batch in tqdm(loader, desc="encoding tokens", disable=not progress):
        pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)
        labels = torch.as_tensor(batch["class_labels"], dtype=torch.long)
        sample_index = torch.tensor(indices[position : position + pixels.shape[0]], dtype=torch.long)
        position += pixels.shape[0]
        variants = [(pixels, sample_index)]
        if flip_copies:
            variants.append((pixels.flip(-1), sample_index + len(dataset)))
        for images, index in variants:
            tokens = torch.cat(vqvae.encode_scales(images), dim=1).to("cpu", dtype)  # (B, L)
            buffer["scale_indices"].append(tokens)
            buffer["class_labels"].append(labels)
            buffer["sample_index"].append(index)
        if sum(len(i) for i in buffer["sample_index"]) >= shard_size:
            flush()
    flush()
    return names


def write_token_cache_info(cache_dir: str | Path, info: dict) -> Path:
    """Written last, atomically: its presence marks the cache as complete."""
    path = Path(cache_dir) / TOKEN_CACHE_INFO
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": TOKEN_CACHE_FORMAT, "version": TOKEN_CACHE_VERSION, **info}, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def clear_token_cache(cache_dir: str | Path) -> None:
    """Remove the shards and info of an (incomplete) cache; other files are left alone."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return
    for path in cache_dir.glob("tokens-r*.safetensors"):
        path.unlink()
    for name in (TOKEN_CACHE_INFO, TOKEN_CACHE_INFO + ".tmp"):
        (cache_dir / name).unlink(missing_ok=True)


class TokenCacheDataset(Dataset):
    """Items `{"scale_indices": (L,) int64, "class_labels": int}` from a token cache, in sample-index order."""

    def __init__(self, scale_indices: torch.Tensor, class_labels: torch.Tensor, id2label: dict[int, str], info: dict):
        self.scale_indices = scale_indices  # (N, L) int16/int32
        self.class_labels = class_labels  # (N,) int64
        self.id2label = id2label
        self.info = info

    def set_epoch(self, epoch: int) -> None:  # same interface as ClassImageDataset
        pass

    def __len__(self) -> int:
        return self.scale_indices.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"scale_indices": self.scale_indices[index].long(), "class_labels": int(self.class_labels[index])}


def load_token_cache(cache_dir: str | Path, fingerprint: str, patch_nums: list[int]) -> TokenCacheDataset:
    """Load a complete cache after checking that it was made by this tokenizer (`TokenCacheError` otherwise)."""
    cache_dir = Path(cache_dir)
    info = read_token_cache_info(cache_dir)
    if info is None:
        raise TokenCacheError(f"{cache_dir} holds no complete token cache ({TOKEN_CACHE_INFO} is missing)")
    check_token_cache(info, cache_dir, fingerprint, patch_nums)
    parts: dict[str, list[torch.Tensor]] = {"scale_indices": [], "class_labels": [], "sample_index": []}
    for name in info["shards"]:
        path = cache_dir / name
        if not path.is_file():
            raise TokenCacheError(f"token cache {cache_dir} lacks shard {name}; delete the folder to re-encode")
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("tokenizer_fingerprint") != fingerprint:
                raise TokenCacheError(f"shard {path} was made with another tokenizer; delete {cache_dir} to re-encode")
            for key in parts:
                parts[key].append(f.get_tensor(key))
    tokens = torch.cat(parts["scale_indices"])
    labels = torch.cat(parts["class_labels"])
    order = torch.argsort(torch.cat(parts["sample_index"]))
    seq_len = sum(p * p for p in patch_nums)
    if tokens.ndim != 2 or tokens.shape[1] != seq_len or tokens.shape[0] != info["num_samples"]:
        raise TokenCacheError(f"token cache {cache_dir} is malformed: tokens {tuple(tokens.shape)}, expected ({info['num_samples']}, {seq_len})")
    id2label = {int(k): v for k, v in info.get("id2label", {}).items()}
    return TokenCacheDataset(tokens[order], labels[order], id2label, info)


# --------------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint-N` sorted by step; `checkpoint-N.tmp` (an interrupted save) is ignored."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def checkpoint_step(path: str | Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500)")
    return int(match.group(1))


def prune_checkpoints(checkpoints_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Before saving a new checkpoint: delete the oldest so that at most `total_limit` remain after it, and leftovers
    of interrupted saves (`*.tmp`). Returns what was removed."""
    checkpoints_dir = Path(checkpoints_dir)
    removed = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if total_limit is not None and total_limit > 0:
        found = list_checkpoints(checkpoints_dir)
        for _, path in found[: max(len(found) - total_limit + 1, 0)]:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------------------------- EMA
EMA_SUBFOLDER = "transformer_ema"
EMA_STATE_FILE = "ema_state.json"


def transformer_from_parameters(template: nn.Module, parameters: Iterable[torch.Tensor]):
    """A new `VARTransformer` on the CPU (float32) with `template`'s config and the given parameter values (in
    `template.named_parameters()` order), e.g. EMA shadow parameters."""
    names = [name for name, _ in template.named_parameters()]
    state = {name: value.detach().to("cpu", torch.float32) for name, value in zip(names, parameters, strict=True)}
    return transformer_from_state_dict(template.config, state)


def transformer_from_state_dict(config, state_dict: dict[str, torch.Tensor]):
    """A new float32 `VARTransformer` on the CPU holding `state_dict` (strict)."""
    from .modeling_var import VARTransformer

    model = VARTransformer(config)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def save_ema(ema, template: nn.Module, folder: str | Path) -> None:
    """Write the EMA weights as a plain `VARTransformer` folder (`transformer_ema/`) plus its counters (JSON)."""
    folder = Path(folder)
    transformer_from_parameters(template, ema.shadow_params).save_pretrained(folder / EMA_SUBFOLDER)
    state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    state["cur_decay_value"] = getattr(ema, "cur_decay_value", None)
    (folder / EMA_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def load_ema(ema, folder: str | Path, device) -> None:
    """Restore what `save_ema` wrote into an existing `EMAModel`."""
    from .modeling_var import VARTransformer

    folder = Path(folder)
    if not (folder / EMA_SUBFOLDER).is_dir():
        raise FileNotFoundError(f"{folder} has no {EMA_SUBFOLDER}/ (was the run started without --use_ema?)")
    loaded = VARTransformer.from_pretrained(folder / EMA_SUBFOLDER, use_safetensors=True, dtype=torch.float32)
    values = [p.detach() for p in loaded.parameters()]
    if len(values) != len(ema.shadow_params):
        raise ValueError(f"{folder / EMA_SUBFOLDER} does not match the model being trained")
    for shadow, value in zip(ema.shadow_params, values):
        shadow.data.copy_(value.to(device=shadow.device, dtype=shadow.dtype))
    state = json.loads((folder / EMA_STATE_FILE).read_text(encoding="utf-8"))
    ema.optimization_step = int(state["optimization_step"])
    if state.get("cur_decay_value") is not None:
        ema.cur_decay_value = state["cur_decay_value"]


# ------------------------------------------------------------------------------------------------------------- classes
@torch.no_grad()
def resize_class_embedding(transformer, num_classes: int) -> None:
    """
    Change the number of classes of a (pre-trained) transformer in place: rows of the kept class ids are copied, the
    null-class row moves to the new last row, new classes start from the null-class embedding (an unconditional
    start that the fine-tuning specialises).
    """
    old = transformer.config.num_classes
    if num_classes == old:
        return
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    weight = transformer.class_embed.weight  # (old + 1, C)
    new = nn.Embedding(num_classes + 1, weight.shape[1], device=weight.device, dtype=weight.dtype)
    keep = min(old, num_classes)
    new.weight[:keep] = weight[:keep]
    new.weight[keep:num_classes] = weight[old]
    new.weight[num_classes] = weight[old]  # null class
    transformer.class_embed = new
    transformer.config.num_classes = num_classes


__all__ = [
    "compile_transformer_blocks",
    "EpochShuffleSampler",
    "NO_WEIGHT_DECAY_KEYS",
    "SCHEDULE_TYPES",
    "TokenCacheDataset",
    "TokenCacheError",
    "VARLRWDSchedule",
    "check_token_cache",
    "canonical_parameter_name",
    "checkpoint_step",
    "clear_token_cache",
    "encode_token_shards",
    "is_no_weight_decay",
    "latest_checkpoint",
    "list_checkpoints",
    "load_ema",
    "load_token_cache",
    "no_weight_decay_names",
    "progressive_scale_index",
    "progressive_stage",
    "progressive_token_weights",
    "prune_checkpoints",
    "read_token_cache_info",
    "resize_class_embedding",
    "save_ema",
    "step_seed",
    "token_dtype",
    "tokenizer_fingerprint",
    "transformer_from_parameters",
    "transformer_from_state_dict",
    "upstream_init_adaln_gamma",
    "upstream_lr_end_factor",
    "upstream_lr_factor",
    "upstream_peak_lr",
    "upstream_weight_decay",
    "var_param_groups",
    "write_token_cache_info",
]
