"""Convert upstream FoundationVision/VAR state dicts into a var-hf pipeline folder (safetensors only).

Upstream names in, var-hf names out; the model variant is read from the keys and shapes. An unknown or missing key is
an error. Pickled `.pth` files are parsed by `var_hf.checkpoint_reader`, which executes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .configuration_var import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig
from .modeling_var import VARTransformer, var_block_causal_mask
from .checkpoint_reader import FORMAT_SAFETENSORS, detect_format, load_torch_checkpoint
from .vq_var import MultiScaleVQModel

CONVERTER_VERSION = "1"
OFFICIAL_VAE_FILE = "vae_ch160v4096z32.pth"
KNOWN_SCHEDULES = {sum(p * p for p in s): list(s) for s in (PATCH_NUMS_256, PATCH_NUMS_512)}

OFFICIAL_FILE_NAME = re.compile(r"var_d\d+\.pth|vae_ch160v4096z32\.pth")
# Official release files (Hugging Face FoundationVision/var) and their sha256 (var_d30.pth: not known to us yet).
OFFICIAL_SHA256 = {
    "vae_ch160v4096z32.pth": "7c3ec27ae28a3f87055e83211ea8cc8558bd1985d7b51742d074fb4c2fcf186c",
    "var_d16.pth": "4f6151aad91c94e03e224dd7358d8389fa05301c0c291279566998efb54b0ecb",
    "var_d20.pth": "f7d232978e6fe82a4f2e0f5d82b012e01b1aa5abfe93ce2b56104ec0e878a10f",
    "var_d24.pth": "1f5fa9cfec7be1c60034511eeacde06e24892f416d3d1e5fd227fdac56293dfc",
    "var_d36.pth": "660201c829c6f7b775b9119867c12c11aaa68c72770dc33653eec1fa67e27d4d",
}


class ConversionError(ValueError):
    """The input is not an upstream VAR/VQVAE state dict this converter understands."""


# ------------------------------------------------------------------------------------------------------------ reading
def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path, nested_key: str | None = None, ignore_unknown_objects: bool = False) -> dict[str, torch.Tensor]:
    """
    Read a flat upstream state dict from `.safetensors` or an upstream `torch.save` file (never unpickled: parsed by
    a non-executing reader). Training checkpoints nest the state dict under `trainer` -> `nested_key`.
    """
    path = Path(path)
    if detect_format(path) == FORMAT_SAFETENSORS:  # by content; anything but safetensors or a torch zip is refused
        return load_file(str(path))
    obj = load_torch_checkpoint(path, ignore_unknown_objects=ignore_unknown_objects)
    state = _flat_state_dict(obj, path, nested_key)
    for key, tensor in state.items():
        # The reader returns views; one addressing more elements than its storage holds (zero strides) is a broadcast
        # that would only be materialised here, by the converter: a memory bomb, never a weight.
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise ConversionError(f"{path.name}: {key} is a broadcast view of {tensor.untyped_storage().nbytes()} stored bytes "
                                  f"(shape {tuple(tensor.shape)}, strides {tensor.stride()}): not a weight")
    stored = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in state.values()}
    addressed = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    if addressed > 2 * sum(stored.values()) + (1 << 20):  # tensors sharing storages: a model far larger than the file
        raise ConversionError(f"{path.name}: its tensors address {addressed} bytes of {sum(stored.values())} stored: "
                              "storages shared between many weights, not a state dict")
    return state


def _flat_state_dict(obj: object, path: Path, nested_key: str | None) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict):
        if nested_key is None or nested_key not in obj["trainer"]:
            raise ConversionError(f"{path.name}: a training checkpoint without trainer.{nested_key}")
        obj = obj["trainer"][nested_key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConversionError(f"{path.name}: expected a flat state dict of tensors")
    return dict(obj)


# ----------------------------------------------------------------------------------------------------- VAR transformer
VAR_KEY_RULES = [  # (upstream regex, var-hf template)
    (r"class_emb\.weight", "class_embed.weight"),
    (r"word_embed\.(weight|bias)", r"input_proj.\1"),
    (r"pos_start", "start_pos_embed"),
    (r"pos_1LC", "pos_embed"),
    (r"lvl_embed\.weight", "scale_embed.weight"),
    (r"shared_ada_lin\.1\.(weight|bias)", r"shared_adaln.\1"),
    (r"blocks\.(\d+)\.ada_lin\.1\.(weight|bias)", r"layers.\1.adaln_modulation.\2"),
    (r"blocks\.(\d+)\.ada_gss", r"layers.\1.adaln_table"),
    (r"blocks\.(\d+)\.attn\.mat_qkv\.weight", r"layers.\1.attn.qkv_proj.weight"),
    (r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"layers.\1.attn.\2"),
    (r"blocks\.(\d+)\.attn\.scale_mul_1H11", r"layers.\1.attn.logit_scale"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"layers.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"head_nm\.ada_lin\.1\.(weight|bias)", r"head_norm.adaln_modulation.\1"),
    (r"head\.(weight|bias)", r"lm_head.\1"),
]
VAR_BUFFERS = re.compile(r"lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias")


def var_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None, patch_nums=None) -> VARConfig:
    """Derive the transformer config from upstream keys and shapes (see var_reference.md §3.9)."""
    for key in ("pos_1LC", "class_emb.weight", "head.weight", "word_embed.weight", "lvl_embed.weight"):
        if key not in state:
            raise ConversionError(f"not an upstream VAR state dict: missing {key!r}")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise ConversionError("no transformer blocks (blocks.N.*) found")
    _, seq_len, hidden = state["pos_1LC"].shape
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state
    if attn_l2_norm:
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1]
        if num_heads is not None and num_heads != heads:
            raise ConversionError(f"--num-heads {num_heads} contradicts the checkpoint's {heads} heads")
    else:
        heads = num_heads or hidden // 64  # head_dim 64 in every release
    if hidden % heads:
        raise ConversionError(f"width {hidden} is not divisible by {heads} heads")

    num_levels = state["lvl_embed.weight"].shape[0]
    if "lvl_1L" in state:
        levels = state["lvl_1L"].reshape(-1).tolist()
        counts = [levels.count(i) for i in range(num_levels)]
        derived = [math.isqrt(c) for c in counts]
        if any(p * p != c for p, c in zip(derived, counts)):
            raise ConversionError(f"lvl_1L does not describe square token maps: {counts}")
        if patch_nums is not None and list(patch_nums) != derived:
            raise ConversionError(f"--patch-nums {list(patch_nums)} contradicts the checkpoint's {derived}")
        patch_nums = derived
    elif patch_nums is None:
        if seq_len not in KNOWN_SCHEDULES:
            raise ConversionError(f"cannot infer the patch schedule for L={seq_len}; pass --patch-nums")
        patch_nums = KNOWN_SCHEDULES[seq_len]
    patch_nums = [int(p) for p in patch_nums]
    if sum(p * p for p in patch_nums) != seq_len or len(patch_nums) != num_levels:
        raise ConversionError(f"patch_nums {patch_nums} do not fit L={seq_len} tokens in {num_levels} scales")

    return VARConfig(
        num_hidden_layers=depth,
        hidden_size=hidden,
        num_attention_heads=heads,
        mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / hidden,
        num_classes=state["class_emb.weight"].shape[0] - 1,
        codebook_size=state["head.weight"].shape[0],
        latent_channels=state["word_embed.weight"].shape[1],
        patch_nums=patch_nums,
        shared_adaln="shared_ada_lin.1.weight" in state,
        attn_l2_norm=attn_l2_norm,
        drop_path_rate=0.1 * depth / 24,
    )


def _check_var_buffers(state: dict[str, torch.Tensor], config: VARConfig) -> None:
    """Upstream's non-parameter buffers must be what the config regenerates; then they are dropped."""
    if "lvl_1L" in state:
        expected = torch.cat([torch.full((p * p,), i) for i, p in enumerate(config.patch_nums)])
        if not torch.equal(state["lvl_1L"].reshape(-1).long(), expected):
            raise ConversionError("lvl_1L does not match the patch schedule")
    if "attn_bias_for_masking" in state:
        mask = state["attn_bias_for_masking"].reshape(config.seq_len, config.seq_len).float()
        if not torch.equal(mask, var_block_causal_mask(config.patch_nums)):
            raise ConversionError("attn_bias_for_masking is not the block-causal mask of the patch schedule")
    for key, value in state.items():
        if key.endswith("attn.zero_k_bias") and value.abs().max() != 0:
            raise ConversionError(f"{key} is not zero; upstream never trains the key bias")


def map_keys(state: dict[str, torch.Tensor], rules, drop: re.Pattern) -> dict[str, torch.Tensor]:
    mapped, unknown = {}, []
    for key, value in state.items():
        if drop.fullmatch(key):
            continue
        for pattern, template in rules:
            if re.fullmatch(pattern, key):
                mapped[re.sub(pattern, template, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"unknown upstream key(s): {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return mapped


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConversionError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


def convert_var_transformer(state: dict[str, torch.Tensor], num_heads: int | None = None, patch_nums=None) -> VARTransformer:
    config = var_config_from_state_dict(state, num_heads=num_heads, patch_nums=patch_nums)
    _check_var_buffers(state, config)
    mapped = map_keys(state, VAR_KEY_RULES, VAR_BUFFERS)
    model = VARTransformer(config)
    _load_strict(model, mapped, "VAR transformer")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------- tokenizer
VAE_KEY_RULES = [
    (r"((?:encoder|decoder)\..+)", r"\1"),
    (r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
    (r"quantize\.embedding\.weight", "quantizer.embedding.weight"),
    (r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)", r"quantizer.phis.\1.\2"),  # partially shared
    (r"quantize\.quant_resi\.qresi\.(weight|bias)", r"quantizer.phis.0.\1"),  # one shared Phi
    (r"quantize\.quant_resi\.(\d+)\.(weight|bias)", r"quantizer.phis.\1.\2"),  # one Phi per scale
]
VAE_BUFFERS = re.compile(r"quantize\.ema_vocab_hit_SV")


def vqvae_config_from_state_dict(state: dict[str, torch.Tensor], patch_nums, phi_residual_ratio: float = 0.5) -> dict:
    for key in ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_in.weight"):
        if key not in state:
            raise ConversionError(f"not an upstream VQVAE state dict: missing {key!r}")
    codebook_size, latent_channels = state["quantize.embedding.weight"].shape
    base_channels, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    multipliers = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base_channels for i in levels]
    num_res_blocks = len({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    phis = sorted({m.group(1) for k in state if (m := re.match(r"quantize\.quant_resi\.(?:qresi_ls\.)?(\d+)\.", k))})
    phi_count = len(phis) or (1 if "quantize.quant_resi.qresi.weight" in state else 0)
    return dict(
        codebook_size=int(codebook_size),
        latent_channels=int(latent_channels),
        base_channels=int(base_channels),
        in_channels=int(in_channels),
        channel_multipliers=multipliers,
        num_res_blocks=num_res_blocks,
        use_attention=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in state,
        use_mid_attention="encoder.mid.attn_1.qkv.weight" in state,
        patch_nums=list(patch_nums),
        phi_count=phi_count,
        phi_residual_ratio=phi_residual_ratio if phi_count else 0.0,
    )


def convert_vqvae(state: dict[str, torch.Tensor], patch_nums, phi_residual_ratio: float = 0.5) -> MultiScaleVQModel:
    config = vqvae_config_from_state_dict(state, patch_nums, phi_residual_ratio)
    mapped = map_keys(state, VAE_KEY_RULES, VAE_BUFFERS)
    model = MultiScaleVQModel(**config)
    _load_strict(model, mapped, "VQVAE")
    return model.eval()


# ------------------------------------------------------------------------------------------------------------ pipeline
def imagenet_id2label() -> dict[int, str]:
    path = Path(__file__).with_name("imagenet_labels.json")
    with open(path, encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}


def default_id2label(num_classes: int) -> dict[int, str]:
    return imagenet_id2label() if num_classes == 1000 else {i: str(i) for i in range(num_classes)}


def verify_saved_pipeline(folder: Path, sources: dict[str, dict[str, torch.Tensor]]) -> None:
    """Reload every written tensor and compare it bit for bit with the (key-mapped) source tensor."""
    from tqdm.auto import tqdm

    files = {"transformer": "model.safetensors", "vqvae": "diffusion_pytorch_model.safetensors"}
    for sub, source in sources.items():
        saved = load_file(str(folder / sub / files[sub]))
        if set(saved) != set(source):
            raise ConversionError(f"{sub}: written keys differ from the source: {sorted(set(saved) ^ set(source))[:10]}")
        for key in tqdm(sorted(source), desc=f"verifying {sub}", leave=False):
            expected = source[key].float() if source[key].is_floating_point() else source[key]
            same_bits = saved[key].reshape(-1).view(torch.uint8).equal(expected.contiguous().reshape(-1).view(torch.uint8))
            if saved[key].dtype != expected.dtype or saved[key].shape != expected.shape or not same_bits:
                raise ConversionError(f"{sub}: {key} did not round-trip bit for bit")


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and (where the OS allows it: not Windows) the folders, to disk."""
    for path in [*sorted(folder.rglob("*")), folder]:
        if path.is_dir() and os.name == "nt":
            continue
        descriptor = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def convert_to_pipeline_folder(
    vae_path: str | Path,
    var_path: str | Path,
    output_dir: str | Path,
    num_heads: int | None = None,
    patch_nums=None,
    phi_residual_ratio: float = 0.5,
    id2label: dict[int, str] | None = None,
    overwrite: bool = False,
    ignore_unknown_objects: bool = False,
    expected_sha256: dict[str, str] | None = None,
    allow_sha256_mismatch: bool = False,
    log=print,
) -> Path:
    """
    Convert upstream VQVAE + VAR state dicts into a pipeline folder. Writes to a temporary folder beside `output_dir`,
    verifies it, then moves it into place: a failure leaves nothing behind.
    """
    from .model_card import write_model_card
    from .pipeline_var import VARPipeline

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it")
    pinned = expected_sha256 or OFFICIAL_SHA256
    sources, official_sources = {}, {}
    for path in (Path(vae_path), Path(var_path)):
        digest = sha256_of(path)
        sources[path.name] = digest
        # identified by content, whatever the file is called (a renamed release file is verified too)
        official_sources[path.name] = next((name for name, pinned_digest in pinned.items() if pinned_digest == digest), None)
        if official_sources[path.name] not in (None, path.name):
            log(f"{path.name}: sha256 matches the official {official_sources[path.name]}")
        known = pinned.get(path.name)
        if known is None and OFFICIAL_FILE_NAME.fullmatch(path.name):
            log(f"warning: {path.name}: no pinned sha256 for this release file; its digest {digest} goes into the model card, check it yourself")
        if known is not None and known != digest:
            message = f"{path.name}: sha256 {digest} differs from the official {known}"
            if not allow_sha256_mismatch:
                raise ConversionError(message + " (pass --allow-sha256-mismatch to convert it anyway)")
            log("warning: " + message)

    log(f"reading {var_path}")
    var_state = read_state_dict(var_path, "var_wo_ddp", ignore_unknown_objects)
    transformer = convert_var_transformer(var_state, num_heads=num_heads, patch_nums=patch_nums)
    log(f"reading {vae_path}")
    vae_state = read_state_dict(vae_path, "vae_local", ignore_unknown_objects)
    vqvae = convert_vqvae(vae_state, transformer.config.patch_nums, phi_residual_ratio)
    if vqvae.config.codebook_size != transformer.config.codebook_size or vqvae.config.latent_channels != transformer.config.latent_channels:
        raise ConversionError("the VQVAE and the VAR checkpoint disagree on codebook size or latent channels")

    pipe = VARPipeline(transformer=transformer, vqvae=vqvae, id2label=id2label or default_id2label(transformer.config.num_classes))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)
    try:
        log(f"writing {output_dir}")
        pipe.save_pretrained(staging)
        write_model_card(staging, pipe, sources=sources, official_sources=official_sources, converter_version=CONVERTER_VERSION)
        verify_saved_pipeline(
            staging,
            {
                "transformer": map_keys(var_state, VAR_KEY_RULES, VAR_BUFFERS),
                "vqvae": map_keys(vae_state, VAE_KEY_RULES, VAE_BUFFERS),
            },
        )
        fsync_tree(staging)  # on disk before it takes the output's name
        if output_dir.exists():  # the old folder steps aside, the new one takes its name, then the old one goes
            previous = output_dir.with_name(f".{output_dir.name}.previous-{os.getpid()}")
            output_dir.rename(previous)
            try:
                staging.rename(output_dir)
            except BaseException:
                previous.rename(output_dir)
                raise
            shutil.rmtree(previous)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# ------------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert upstream FoundationVision/VAR checkpoints into a var-hf pipeline folder (safetensors only).", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=None, help="upstream VQVAE state dict (.safetensors or .pth)")
    parser.add_argument("--var", default=None, help="upstream VAR state dict (.safetensors or .pth)")
    parser.add_argument("--from-hub", default=None, metavar="REPO", help="download the official files from this Hub repo (FoundationVision/var) instead")
    parser.add_argument("--depth", type=int, default=None, help="with --from-hub: which transformer (16, 20, 24, 30, 36)")
    parser.add_argument("--revision", default=None, help="with --from-hub: the repo revision to download")
    parser.add_argument("--output", required=True, help="pipeline folder to write")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (needed for legacy-attention checkpoints whose head_dim is not 64)")
    parser.add_argument("--patch-nums", type=str, default=None, help="comma-separated patch schedule, e.g. 1,2,3,4,5,6,8,10,13,16 (read from the checkpoint when possible)")
    parser.add_argument("--phi-residual-ratio", type=float, default=0.5, help="Phi residual ratio of the tokenizer (0.5 in every release)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--ignore-unknown-objects", action="store_true", help="downgrade non-tensor objects of training checkpoints to warnings (never imported or called)")
    parser.add_argument("--allow-sha256-mismatch", action="store_true", help="convert an official file name whose sha256 differs from the release")
    return parser.parse_args(argv)


def download_official(repo_id: str, depth: int, revision: str | None = None) -> tuple[Path, Path]:
    """Fetch the official tokenizer and the depth-`depth` transformer from the Hub (files are only read, never loaded)."""
    from huggingface_hub import hf_hub_download

    vae = hf_hub_download(repo_id, OFFICIAL_VAE_FILE, revision=revision)
    var = hf_hub_download(repo_id, f"var_d{depth}.pth", revision=revision)
    return Path(vae), Path(var)


def main(argv=None) -> int:
    args = parse_args(argv)
    patch_nums = [int(p) for p in args.patch_nums.split(",")] if args.patch_nums else None
    try:
        if args.from_hub:
            if args.depth is None:
                raise ConversionError("--from-hub needs --depth (16, 20, 24, 30 or 36)")
            args.vae, args.var = download_official(args.from_hub, args.depth, args.revision)
        elif args.vae is None or args.var is None:
            raise ConversionError("pass --vae and --var, or --from-hub REPO --depth N")
        folder = convert_to_pipeline_folder(
            args.vae,
            args.var,
            args.output,
            num_heads=args.num_heads,
            patch_nums=patch_nums,
            phi_residual_ratio=args.phi_residual_ratio,
            overwrite=args.overwrite,
            ignore_unknown_objects=args.ignore_unknown_objects,
            allow_sha256_mismatch=args.allow_sha256_mismatch,
        )
    except KeyError as error:  # a key the converter needs is missing
        print(f"error: not a complete upstream state dict: missing {error}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: the checkpoint nests objects too deeply to be a state dict", file=sys.stderr)
        return 2
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError, OSError, SafetensorError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {Path(folder).resolve()}")
    return 0



__all__ = [
    "ConversionError",
    "main",
    "convert_to_pipeline_folder",
    "convert_var_transformer",
    "convert_vqvae",
    "read_state_dict",
    "var_config_from_state_dict",
    "vqvae_config_from_state_dict",
]
