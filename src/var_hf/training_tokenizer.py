"""Training pieces of the multi-scale VQ tokenizer (used by `pipelines/train_tokenizer.py`).

* `multiscale_vq_training_forward(model, images)`: the differentiable training forward of a `MultiScaleVQModel`
  (VAR's multi-scale residual quantization with a straight-through estimator and the VQ loss), without changing the
  model class;
* `CodebookUsageTracker` + `restart_dead_codes`: codebook-usage statistics and dead-code re-initialisation;
* `reconstruction_loss`, `FeatureNetworkPerceptualLoss` (LPIPS-style, weights from a user-provided safetensors file),
  `PatchGANDiscriminator` with hinge losses and the VQGAN adaptive generator weight;
* `load_tokenizer_image_dataset`: unlabelled images from a (flat or nested) folder or a `datasets` dataset.

Shapes: B batch, Cvae latent channels, h = w = last patch number, pn one scale's side, V codebook size, S scales.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.data import Dataset, Sampler

from .training_data import IMAGE_SUFFIXES, upstream_transform


# ------------------------------------------------------------------------------------------------ sizes
def check_tokenizer_resolution(resolution: int, patch_nums, channel_multipliers) -> None:
    """Raise `ValueError` unless resolution == last patch number × 2^(len(channel_multipliers) - 1)."""
    factor = 2 ** (len(channel_multipliers) - 1)
    expected = int(patch_nums[-1]) * factor
    if int(resolution) != expected:
        raise ValueError(
            f"--resolution {resolution} does not fit the tokenizer: the resolution must equal the last patch number "
            f"({patch_nums[-1]}) × the downsampling factor 2^(len(channel_multipliers) - 1) = {factor}, i.e. {expected}. "
            f"Use --resolution {expected}, or change --patch_nums / --channel_multipliers "
            f"(e.g. last patch number {resolution // factor} if {resolution} is a multiple of {factor})."
        )


# ------------------------------------------------------------------------------------- training forward
@dataclass
class MultiScaleVQTrainingOutput(BaseOutput):
    """
    Args:
        reconstruction (`torch.FloatTensor` of shape `(B, 3, H, W)`): decoder output (not clamped) of the
            straight-through quantized latent.
        vq_loss (`torch.FloatTensor`, scalar): mean over scales of beta·||sg(f_hat_k) - f||² + ||f_hat_k - sg(f)||².
        code_hits (`torch.FloatTensor` of shape `(V,)`): how often each code was picked, all scales together.
        scale_code_hits (`torch.FloatTensor` of shape `(S, V)`): the same per scale.
        restart_candidates (`torch.FloatTensor` of shape `(N, Cvae)`): detached vectors to re-initialise dead codes
            from (rows of the encoder output f, or the per-scale residuals the quantizer matched; see `restart_source`).
    """

    reconstruction: torch.FloatTensor
    vq_loss: torch.FloatTensor
    code_hits: torch.FloatTensor
    scale_code_hits: torch.FloatTensor
    restart_candidates: torch.FloatTensor | None = None


def multiscale_vq_training_forward(
    model,
    images: torch.Tensor,
    beta: float | None = None,
    restart_source: str = "latent",
    max_restart_candidates: int = 4096,
) -> MultiScaleVQTrainingOutput:
    """
    Differentiable forward of a `MultiScaleVQModel` for training (VAR's `VectorQuantizer2.forward` semantics).

    f = quant_conv(encoder(x)); for each scale k (small to large): the residual r_k = f - f_hat_{k-1} is area-pooled to
    pn_k × pn_k (the last scale is used as is), each position takes its nearest code (squared L2, no gradient), and
    f_hat_k = f_hat_{k-1} + Phi_k(bicubic_up(embedding)) keeps the gradient into the codebook and the Phi convs. The
    VQ loss is the mean over scales of beta·||sg(f_hat_k) - f||² (commitment, into the encoder) + ||f_hat_k - sg(f)||²
    (codebook and Phi). The decoder gets the straight-through f + sg(f_hat - f), so the reconstruction gradient reaches
    the encoder unchanged. The quantization runs in float32 with autocast disabled.

    Args:
        model (`MultiScaleVQModel`): the tokenizer (its `encoder`, `quant_conv`, `quantizer`, `post_quant_conv`,
            `decoder` are used; the model is not modified).
        images (`torch.Tensor` of shape `(B, 3, H, W)`): in [-1, 1], H = W = `model.resolution`.
        beta (`float`, *optional*): commitment weight; defaults to `model.config.beta`.
        restart_source (`str`): `"latent"` (rows of the encoder output f) or `"residual"` (the area-pooled residuals
            every scale quantized) for `restart_candidates`; `"none"` returns no candidates.
        max_restart_candidates (`int`): at most this many candidate rows (a random subset).
    """
    quantizer = model.quantizer
    patch_nums = list(quantizer.patch_nums)
    expected = patch_nums[-1] * 2 ** (len(model.config.channel_multipliers) - 1)
    if images.ndim != 4 or images.shape[-2:] != (expected, expected):
        raise ValueError(f"training images must have shape (B, 3, {expected}, {expected}), got {tuple(images.shape)}")
    beta = float(model.config.beta if beta is None else beta)
    vocab = quantizer.embedding.num_embeddings

    f_raw = model.quant_conv(model.encoder(images))  # (B, Cvae, h, w), maybe low precision under autocast
    with torch.autocast(device_type=images.device.type, enabled=False):
        f = f_raw.float()
        batch, channels = f.shape[:2]
        f_detached = f.detach()
        f_rest = f_detached.clone()
        f_hat = torch.zeros_like(f_detached)
        vq_loss = f.new_zeros(())
        scale_hits = []
        residual_rows = []
        last = len(patch_nums) - 1
        for si, pn in enumerate(patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            z_rows = z.permute(0, 2, 3, 1).reshape(-1, channels)
            indices = quantizer.nearest_code(z_rows)  # (B·pn²,), no gradient
            scale_hits.append(torch.bincount(indices, minlength=vocab).float())
            if restart_source == "residual":
                residual_rows.append(z_rows)
            h = quantizer.upsampled_scale(si, quantizer.lookup(indices.view(batch, pn * pn), pn))  # (B, Cvae, h, w)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
        vq_loss = vq_loss / len(patch_nums)
        f_hat_st = f + (f_hat.detach() - f_detached)  # straight-through: value f_hat, gradient of f

    reconstruction = model.decoder(model.post_quant_conv(f_hat_st.to(model.post_quant_conv.weight.dtype)))

    candidates = None
    if restart_source == "latent":
        candidates = f_detached.permute(0, 2, 3, 1).reshape(-1, channels)
    elif restart_source == "residual":
        candidates = torch.cat(residual_rows, dim=0)
    elif restart_source != "none":
        raise ValueError(f"restart_source must be 'latent', 'residual' or 'none', got {restart_source!r}")
    if candidates is not None and candidates.shape[0] > max_restart_candidates:
        keep = torch.randperm(candidates.shape[0], device=candidates.device)[:max_restart_candidates]
        candidates = candidates[keep]
    scale_code_hits = torch.stack(scale_hits)
    return MultiScaleVQTrainingOutput(
        reconstruction=reconstruction,
        vq_loss=vq_loss,
        code_hits=scale_code_hits.sum(0),
        scale_code_hits=scale_code_hits,
        restart_candidates=candidates,
    )


class MultiScaleVQTrainingWrapper(nn.Module):
    """
    `nn.Module` whose forward is `multiscale_vq_training_forward(self.vq, images)`, so that Accelerate/DDP wrap a
    module whose forward runs the whole training graph (gradient sync and autocast hook into `forward`). Returns a
    plain dict with the `MultiScaleVQTrainingOutput` fields (Accelerate's fp32 output conversion rebuilds mappings).
    """

    def __init__(self, vq, restart_source: str = "latent"):
        super().__init__()
        self.vq = vq
        self.restart_source = restart_source

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(multiscale_vq_training_forward(self.vq, images, restart_source=self.restart_source).items())


def unused_phi_convs(model) -> list[int]:
    """Indices of Phi convolutions no scale uses (they get no gradient; DDP then needs find_unused_parameters)."""
    used = {int(i) for i in model.quantizer.phi_index_per_scale}
    return [i for i in range(len(model.quantizer.phis)) if i not in used]


# ----------------------------------------------------------------------------------------- codebook usage
class CodebookUsageTracker:
    """
    Codebook-usage statistics over optimisation steps: the last step each code was picked (any scale), an EMA of the
    per-code hit frequency, and per-step usage/perplexity. A code is *dead* when it has not been picked for
    `dead_after_steps` steps (counted from its last use, its last restart, or the start of tracking).
    `state_dict`/`load_state_dict` hold tensors only (saved as safetensors next to a checkpoint).
    """

    def __init__(self, codebook_size: int, dead_after_steps: int = 0, ema_decay: float = 0.99):
        self.codebook_size = int(codebook_size)
        self.dead_after_steps = int(dead_after_steps)
        self.ema_decay = float(ema_decay)
        self.last_used_step = torch.zeros(self.codebook_size, dtype=torch.long)
        self.ema_frequency = torch.zeros(self.codebook_size, dtype=torch.float64)
        self.num_updates = 0
        self.total_restarts = 0

    def update(self, code_hits: torch.Tensor, step: int) -> dict[str, float]:
        """Record one optimisation step's hit counts `(V,)` (summed over micro-batches/processes); returns statistics."""
        hits = code_hits.detach().double().cpu()
        total = float(hits.sum())
        used = hits > 0
        self.last_used_step[used] = int(step)
        frequency = hits / max(total, 1.0)
        decay = 0.0 if self.num_updates == 0 else self.ema_decay
        self.ema_frequency.mul_(decay).add_(frequency, alpha=1 - decay)
        self.num_updates += 1
        probs = frequency[frequency > 0]
        perplexity = float(torch.exp(-(probs * probs.log()).sum())) if total > 0 else 0.0
        return {
            "codebook/usage": float(used.double().mean()),
            "codebook/perplexity": perplexity,
            "codebook/ema_usage": float((self.ema_frequency > 0.01 / self.codebook_size).double().mean()),
        }

    def dead_codes(self, step: int) -> torch.Tensor:
        """Codes unused for at least `dead_after_steps` steps at `step` (empty when restarts are disabled)."""
        if self.dead_after_steps <= 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(int(step) - self.last_used_step >= self.dead_after_steps).flatten()

    def mark_restarted(self, codes: torch.Tensor, step: int) -> None:
        self.last_used_step[codes.cpu()] = int(step)
        self.ema_frequency[codes.cpu()] = 1.0 / self.codebook_size
        self.total_restarts += int(codes.numel())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "last_used_step": self.last_used_step.clone(),
            "ema_frequency": self.ema_frequency.clone(),
            "num_updates": torch.tensor([self.num_updates], dtype=torch.long),
            "total_restarts": torch.tensor([self.total_restarts], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["last_used_step"].shape != (self.codebook_size,):
            raise ValueError(f"codebook usage state is for {state['last_used_step'].shape[0]} codes, not {self.codebook_size}")
        self.last_used_step = state["last_used_step"].long().clone()
        self.ema_frequency = state["ema_frequency"].double().clone()
        self.num_updates = int(state["num_updates"][0])
        self.total_restarts = int(state["total_restarts"][0])


@torch.no_grad()
def sample_restart_vectors(candidates: torch.Tensor, count: int, generator: torch.Generator | None = None, noise_std: float = 0.01) -> torch.Tensor:
    """`count` random rows of `candidates` (N, Cvae) (with replacement when N < count), plus small relative noise."""
    candidates = candidates.detach().float()
    if candidates.shape[0] == 0:
        raise ValueError("no candidate vectors to re-initialise dead codes from")
    cpu = candidates.cpu()
    if cpu.shape[0] >= count:
        rows = torch.randperm(cpu.shape[0], generator=generator)[:count]
    else:
        rows = torch.randint(cpu.shape[0], (count,), generator=generator)
    picked = cpu[rows]
    scale = picked.std().clamp_min(1e-6) * noise_std
    return (picked + scale * torch.randn(picked.shape, generator=generator)).to(candidates.device)


@torch.no_grad()
def restart_dead_codes(model, codes: torch.Tensor, new_vectors: torch.Tensor, optimizer=None) -> None:
    """Overwrite codebook rows `codes` of `model.quantizer.embedding` with `new_vectors` and clear their Adam moments."""
    if codes.numel() == 0:
        return
    weight = model.quantizer.embedding.weight
    codes = codes.to(weight.device)
    weight.data[codes] = new_vectors.to(device=weight.device, dtype=weight.dtype)
    if optimizer is not None:
        reset_optimizer_state_rows(optimizer, weight, codes)


def reset_optimizer_state_rows(optimizer, parameter: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the per-row optimizer state (e.g. Adam's exp_avg / exp_avg_sq) of `parameter` for `rows`."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    state = inner.state.get(parameter, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value[rows.to(value.device)] = 0


@torch.no_grad()
def initialize_codebook(model, method: str, images: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
    """
    Re-initialise the codebook of a new tokenizer. `"uniform"`: U(-1/V, 1/V) (taming-transformers / upstream `eini<0`);
    `"data"`: random rows of the encoder output f = quant_conv(encoder(images)) plus small noise, so that every code
    starts where encoder outputs are; `"none"`: keep the weights.
    """
    weight = model.quantizer.embedding.weight
    vocab = weight.shape[0]
    if method == "none":
        return
    if method == "uniform":
        new = (torch.rand(weight.shape, generator=generator) * 2 - 1) / vocab
    elif method == "data":
        if images is None:
            raise ValueError("codebook initialisation from data needs a batch of images")
        f = model.quant_conv(model.encoder(images.to(weight.device, weight.dtype))).float()
        new = sample_restart_vectors(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), vocab, generator, noise_std=0.1)
    else:
        raise ValueError(f"unknown codebook initialisation {method!r} (data, uniform, none)")
    weight.data.copy_(new.to(weight.device, weight.dtype))


# -------------------------------------------------------------------------------------------------- losses
def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, l2_weight: float = 1.0, l1_weight: float = 0.0) -> torch.Tensor:
    """l2_weight·MSE + l1_weight·L1 (means over all pixels), computed in float32."""
    reconstruction, target = reconstruction.float(), target.float()
    loss = reconstruction.new_zeros(())
    if l2_weight:
        loss = loss + l2_weight * F.mse_loss(reconstruction, target)
    if l1_weight:
        loss = loss + l1_weight * F.l1_loss(reconstruction, target)
    return loss


# LPIPS' input normalisation (its ScalingLayer): images in [-1, 1] -> (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class FeatureNetworkPerceptualLoss(nn.Module):
    """
    LPIPS-style distance with a frozen VGG-type feature network: for each tapped layer l, the unit-normalised
    (over channels) features of both images are subtracted, squared, weighted per channel by w_l (LPIPS' linear
    layers; ones when absent), summed over channels and averaged over positions; the layers are summed. Returns
    `(B,)`. Build it from a safetensors file with `from_safetensors`.

    Args:
        convs (`list[nn.Conv2d]`): the 3×3 convolutions in order, each followed by ReLU.
        pool_after (`list[bool]`): whether a 2×2 max-pool follows each convolution's ReLU.
        taps (`list[int]`): indices of the convolutions whose ReLU output is compared.
        channel_weights (`list[torch.Tensor] | None`): per-tap non-negative channel weights `(C_l,)`.
    """

    def __init__(self, convs, pool_after, taps, channel_weights=None, shift=LPIPS_SHIFT, scale=LPIPS_SCALE):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.pool_after = list(pool_after)
        self.taps = list(taps)
        if channel_weights is None:
            channel_weights = [torch.ones(self.convs[t].out_channels) for t in self.taps]
        if len(channel_weights) != len(self.taps):
            raise ValueError(f"{len(channel_weights)} linear layers for {len(self.taps)} tapped feature layers")
        for i, (tap, weight) in enumerate(zip(self.taps, channel_weights)):
            weight = weight.reshape(-1).float()
            if weight.numel() != self.convs[tap].out_channels:
                raise ValueError(f"linear layer {i} has {weight.numel()} weights for {self.convs[tap].out_channels} channels")
            self.register_buffer(f"channel_weight_{i}", weight.view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def min_resolution(self) -> int:
        """Smallest input side that keeps every tapped layer at least 1×1."""
        return 2 ** sum(self.pool_after[: max(self.taps)])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        outputs = []
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            if i in self.taps:
                outputs.append(h)
            if i >= max(self.taps):
                break
            if self.pool_after[i]:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
        return outputs

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = reconstruction.shape[0]
        feats = self.features(torch.cat([reconstruction, target], dim=0))
        total = 0.0
        for i, feat in enumerate(feats):
            feat = feat.float()
            feat = feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (feat[:batch] - feat[batch:]).square()
            total = total + (diff * getattr(self, f"channel_weight_{i}")).sum(dim=1).mean(dim=(1, 2))
        return total

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> FeatureNetworkPerceptualLoss:
        """
        Accepted key layouts (safetensors of a VGG-type feature network, e.g. LPIPS-VGG):
        * torchvision VGG: `features.{i}.weight` / `features.{i}.bias` (ReLU after each conv; a max-pool where the
          next conv index jumps by 3, as in torchvision's `vgg*.features`);
        * the `lpips` package: `net.slice{k}.{i}.weight` / `.bias` (the same indices), taps at the end of each slice;
        * optional LPIPS linear layers `lin{k}.model.1.weight` (or `lins.{k}.model.1.weight`, `lin{k}.weight`),
          shape (1, C_k, 1, 1); optional `scaling_layer.shift` / `scaling_layer.scale`.
        Without linear layers every channel weighs 1.
        """
        conv_keys: dict[int, str] = {}
        slice_of: dict[int, int] = {}
        for key in state:
            m = re.fullmatch(r"features\.(\d+)\.weight", key) or re.fullmatch(r"net\.slice(\d+)\.(\d+)\.weight", key)
            if m is None:
                continue
            index = int(m.group(m.lastindex))
            conv_keys[index] = key[: -len(".weight")]
            if key.startswith("net.slice"):
                slice_of[index] = int(m.group(1))
        if not conv_keys:
            raise ValueError(
                "the perceptual weights hold no VGG feature convolutions (expected keys 'features.<i>.weight' as in "
                "torchvision's VGG or 'net.slice<k>.<i>.weight' as in the lpips package)"
            )
        indices = sorted(conv_keys)
        convs, pool_after = [], []
        for n, index in enumerate(indices):
            weight, bias = state[conv_keys[index] + ".weight"], state.get(conv_keys[index] + ".bias")
            if weight.ndim != 4:
                raise ValueError(f"{conv_keys[index]}.weight is not a convolution weight: shape {tuple(weight.shape)}")
            if n > 0 and convs[-1].out_channels != weight.shape[1]:
                raise ValueError(f"{conv_keys[index]} expects {weight.shape[1]} input channels, previous layer gives {convs[-1].out_channels}")
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=weight.shape[2:], padding=weight.shape[2] // 2, bias=bias is not None)
            conv.weight.data.copy_(weight.float())
            if bias is not None:
                conv.bias.data.copy_(bias.float())
            convs.append(conv)
            gap = indices[n + 1] - index if n + 1 < len(indices) else 3
            if gap not in (2, 3):
                raise ValueError(f"unsupported layer layout between feature layers {index} and {indices[n + 1]} (only conv-ReLU[-maxpool] VGG stacks)")
            pool_after.append(gap == 3)
        if slice_of:
            taps = [n for n, index in enumerate(indices) if n + 1 == len(indices) or slice_of[indices[n + 1]] != slice_of[index]]
        else:
            taps = [n for n in range(len(indices)) if pool_after[n]]
            taps = taps[:-1] + [len(indices) - 1] if taps else [len(indices) - 1]  # the final conv's ReLU, not past it
        weights = []
        for k in range(len(taps)):
            for name in (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight", f"lin{k}.weight"):
                if name in state:
                    weights.append(state[name])
                    break
        if weights and len(weights) != len(taps):
            raise ValueError(f"found {len(weights)} LPIPS linear layers for {len(taps)} tapped feature layers")
        shift = state["scaling_layer.shift"].flatten().tolist() if "scaling_layer.shift" in state else LPIPS_SHIFT
        scale = state["scaling_layer.scale"].flatten().tolist() if "scaling_layer.scale" in state else LPIPS_SCALE
        return cls(convs, pool_after, taps, weights or None, shift, scale)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> FeatureNetworkPerceptualLoss:
        from safetensors.torch import load_file

        path = Path(path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ValueError(f"--lpips_weights must be an existing .safetensors file, got {path}")
        return cls.from_state_dict(load_file(str(path)))


def vgg16_perceptual_state_dict(seed: int = 0, channels=(64, 128, 256, 512, 512)) -> dict[str, torch.Tensor]:
    """Random weights in torchvision's VGG16 `features.*` + LPIPS `lin*` layout (for tests and format examples)."""
    generator = torch.Generator().manual_seed(seed)
    state, index, in_ch = {}, 0, 3
    for block, (out_ch, convs) in enumerate(zip(channels, (2, 2, 3, 3, 3))):
        for _ in range(convs):
            state[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * math.sqrt(2 / (9 * in_ch))
            state[f"features.{index}.bias"] = torch.zeros(out_ch)
            in_ch, index = out_ch, index + 2
        index += 1  # the max-pool
        state[f"lin{block}.model.1.weight"] = torch.rand(1, out_ch, 1, 1, generator=generator)
    return state


class PatchGANDiscriminator(nn.Module):
    """
    PatchGAN discriminator (pix2pix `NLayerDiscriminator` shape) with GroupNorm instead of BatchNorm (no cross-process
    batch statistics): conv4×4/2 + LeakyReLU, (num_layers - 1) × [conv4×4/2 + GN + LeakyReLU], conv4×4/1 + GN +
    LeakyReLU, conv4×4/1 -> one logit per patch.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            layers += [
                nn.Conv2d(channels, out, 4, stride=2 if n < num_layers else 1, padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.num_layers = num_layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @staticmethod
    def output_side(resolution: int, num_layers: int) -> int:
        side = resolution
        for _ in range(num_layers):
            side //= 2
        return side - 2  # two 4×4 stride-1 convolutions with padding 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def adaptive_generator_weight(nll_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance ||∇_last nll|| / (||∇_last g|| + 1e-4), clamped to [0, max_weight] and detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------- data
def scan_images(root: str | Path) -> list[Path]:
    """All images under `root` (flat or nested folders, hidden entries skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    paths = [
        p for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not paths:
        raise ValueError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


class TokenizerImageDataset(Dataset):
    """Items `{"pixel_values": (3, R, R) in [-1, 1]}` from image paths or a `datasets` split (column "image")."""

    def __init__(self, samples, resolution: int, random_crop: bool = True, hflip: bool = False, seed: int = 0):
        self.samples = samples
        self.resolution = int(resolution)
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Crops and flips depend on (seed, epoch, index) only, so a resumed run sees the same augmentations."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> PIL.Image.Image:
        item = self.samples[index]
        if isinstance(item, (str, Path)):
            with PIL.Image.open(item) as image:
                return image.convert("RGB")
        image = item["image"]
        if isinstance(image, np.ndarray):
            image = PIL.Image.fromarray(image)
        return image.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        return {"pixel_values": upstream_transform(self.load(index), self.resolution, self.random_crop, self.hflip, rng)}


def load_tokenizer_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    resolution: int = 256,
    image_column: str = "image",
    split: str = "train",
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    random_crop: bool = True,
    hflip: bool = False,
    seed: int = 0,
    max_samples: int | None = None,
) -> TokenizerImageDataset:
    """An image folder (flat or nested; labels ignored) or a `datasets` dataset name/path with an image column."""
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("pass exactly one of --train_data_dir or --dataset_name")
    if train_data_dir is not None:
        samples = scan_images(train_data_dir)
    else:
        import datasets

        path = Path(dataset_name)
        saved = path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json"))
        if saved:
            data = datasets.load_from_disk(dataset_name)
        else:
            data = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        if image_column not in data.column_names:
            raise ValueError(f"dataset {dataset_name} has no column {image_column!r} (columns: {data.column_names})")
        data = data.select_columns([image_column])
        if image_column != "image":
            data = data.rename_column(image_column, "image")
        if len(data) == 0:
            raise ValueError(f"dataset {dataset_name} is empty")
        samples = data
    if max_samples is not None:
        samples = samples[:max_samples] if isinstance(samples, list) else samples.select(range(min(max_samples, len(samples))))
    return TokenizerImageDataset(samples, resolution, random_crop, hflip, seed)


class EpochShuffleSampler(Sampler):
    """A permutation of range(n) that depends on (seed, epoch) only: resumed runs replay the same order."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


# -------------------------------------------------------------------------------------------------- images
def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    array = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return array


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, padding: int = 2) -> PIL.Image.Image:
    """Two rows: originals on top, reconstructions below (images in [-1, 1])."""
    top, bottom = to_uint8_images(originals), to_uint8_images(reconstructions)
    count, height, width, _ = top.shape
    grid = np.full((2 * height + 3 * padding, count * (width + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(count):
        x = padding + i * (width + padding)
        grid[padding : padding + height, x : x + width] = top[i]
        grid[2 * padding + height : 2 * padding + 2 * height, x : x + width] = bottom[i]
    return PIL.Image.fromarray(grid)


@torch.no_grad()
def reconstruction_metrics(model, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """MSE / PSNR (images in [-1, 1], PSNR on [0, 1]) of `model(images)` (encode + decode, clamped), and of the
    per-image mean-colour baseline."""
    errors, baseline = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        reconstruction = model(chunk).sample.float()
        errors.append((reconstruction - chunk.float()).square().mean(dim=(1, 2, 3)))
        mean_colour = chunk.float().mean(dim=(2, 3), keepdim=True)
        baseline.append((mean_colour - chunk.float()).square().mean(dim=(1, 2, 3)))
    mse, base = torch.cat(errors).mean().item(), torch.cat(baseline).mean().item()
    return {
        "mse": mse,
        "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
        "mean_colour_mse": base,
    }


__all__ = [
    "CodebookUsageTracker",
    "EpochShuffleSampler",
    "FeatureNetworkPerceptualLoss",
    "MultiScaleVQTrainingOutput",
    "MultiScaleVQTrainingWrapper",
    "PatchGANDiscriminator",
    "TokenizerImageDataset",
    "adaptive_generator_weight",
    "check_tokenizer_resolution",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "initialize_codebook",
    "load_tokenizer_image_dataset",
    "multiscale_vq_training_forward",
    "reconstruction_grid",
    "reconstruction_loss",
    "reconstruction_metrics",
    "reset_optimizer_state_rows",
    "restart_dead_codes",
    "sample_restart_vectors",
    "scan_images",
    "unused_phi_convs",
    "vgg16_perceptual_state_dict",
]
