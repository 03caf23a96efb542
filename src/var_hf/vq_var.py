"""Multi-scale residual VQ tokenizer of VAR (VQGAN encoder/decoder + residual quantizer with shared Phi convolutions).

Shapes: B batch, Cvae latent channels, h = w = last patch number (latent side), pn side of one scale's token map,
V codebook size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import logger as diffusers_modeling_logger
from diffusers.utils import BaseOutput
from torch import nn

from .safety import safetensors_only


def upstream_phi_index_per_scale(num_scales: int, phi_count: int) -> list[int]:
    """
    Which Phi convolution each scale uses, exactly as upstream picks it: scale `si` at ratio r = si / (K - 1) takes the
    Phi whose tick is nearest (first on ties, float64). Ticks are evenly spaced from 1/(3n) to 1 - 1/(3n) for n = 4
    Phis (the released tokenizer), else from 1/(2n) to 1 - 1/(2n).
    """
    if phi_count <= 0:
        return [0] * num_scales
    if phi_count == 1:
        return [0] * num_scales
    n = phi_count
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


@dataclass
class MultiScaleVQEncoderOutput(BaseOutput):
    """
    Args:
        scale_indices (`list[torch.LongTensor]`): token ids of every scale, each `(B, pn * pn)`, row-major.
        f_hat (`torch.FloatTensor` of shape `(B, Cvae, h, w)`): the accumulated quantized latent.
    """

    scale_indices: list[torch.LongTensor]
    f_hat: torch.FloatTensor


@dataclass
class MultiScaleVQDecoderOutput(BaseOutput):
    """
    Args:
        sample (`torch.FloatTensor` of shape `(B, 3, H, W)`): decoded images in [-1, 1].
    """

    sample: torch.FloatTensor


# --------------------------------------------------------------------------------------------------- encoder / decoder
def vq_group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """
    `F.group_norm` of a channels-last (B, C, H, W) tensor, computed from per-channel statistics: mean and variance of
    every channel over H·W (a reduction along the contiguous channel axis), combined per group by the law of total
    variance, then one affine pass in float32. The same function as `F.group_norm`, written for `torch.compile`:
    reducing each group directly reads its few channels with a stride of C (uncoalesced on GPUs).
    """
    batch, channels = x.shape[:2]
    var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # (B, C)
    var_c, mean_c = var_c.view(batch, num_groups, -1), mean_c.view(batch, num_groups, -1)  # (B, G, C/G)
    mean = mean_c.mean(dim=-1, keepdim=True)  # (B, G, 1)
    var = var_c.mean(dim=-1, keepdim=True) + (mean_c - mean).square().mean(dim=-1, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.float().view(1, num_groups, -1)  # (B, G, C/G)
    shift = bias.float().view(1, num_groups, -1) - mean * scale
    return (x.float() * scale.view(batch, channels, 1, 1) + shift.view(batch, channels, 1, 1)).to(x.dtype)


class VQGroupNorm(nn.GroupNorm):
    """
    GroupNorm of the VQ encoder/decoder. Eager calls are `F.group_norm` (the reference). Under `torch.compile` with
    channels-last input (the compiled decoder of `VARPipeline.compile`) it is [`vq_group_norm_channels_last`], which
    inductor turns into one coalesced reduction and a pass fused with the following SiLU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.compiler.is_compiling()
            and x.ndim == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        ):
            return vq_group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def vq_group_norm(channels: int) -> VQGroupNorm:
    return VQGroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class VQResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = vq_group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = vq_group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class VQAttnBlock(nn.Module):
    """Single-head self-attention over all positions, with one fused 1×1 qkv convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = vq_group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        query, key, value = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)  # (B, C, N)
        weights = torch.bmm(query.permute(0, 2, 1), key).mul_(channels**-0.5).softmax(dim=2)  # (B, N_q, N_k)
        attended = torch.bmm(value, weights.permute(0, 2, 1)).view(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(attended)


class VQDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Which rows of a 3x3 kernel land on each of the two low-resolution rows an output row of phase a (= 0, 1) reads, when
# the kernel runs over a 2x nearest-upsampled image: phase 0 reads rows (i - 1, i, i), phase 1 rows (i, i, i + 1).
VQ_SUBPIXEL_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, tap, row)


def vq_upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """
    `conv(F.interpolate(x, scale_factor=2, mode="nearest"))` for a 3x3, padding-1 convolution, computed sub-pixel: every
    output pixel (2i + a, 2j + b) reads only a 2x2 window of x, so one 2x2 convolution of x with 4·C_out output channels
    (the 3x3 weights summed per phase, in at least float32) gives the four phases, which are interleaved. The same
    function with 4/9 of the multiply-adds and no upsampled copy of x; used by the compiled decoder (the eager one is
    the reference).
    """
    batch, _, height, width = x.shape
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    taps = VQ_SUBPIXEL_TAPS.to(device=conv.weight.device, dtype=dtype)
    weight = torch.einsum("aru,oiuv,bcv->aboirc", taps, conv.weight.to(dtype), taps)  # (2, 2, C_out, C_in, 2, 2)
    weight = weight.reshape(-1, *weight.shape[3:]).to(conv.weight.dtype)  # (4·C_out, C_in, 2, 2)
    phases = F.conv2d(x, weight, padding=1).unflatten(1, (2, 2, -1))  # (B, 2, 2, C_out, H + 1, W + 1)
    rows = [torch.stack([phases[:, a, b, :, a : a + height, b : b + width] for b in (0, 1)], dim=-1) for a in (0, 1)]
    out = torch.stack(rows, dim=-3).reshape(batch, -1, 2 * height, 2 * width)  # (B, C_out, 2H, 2W)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else out


class VQUpsample(nn.Module):
    """2x nearest upsampling and a 3x3 convolution. Eager: exactly that (the reference); under `torch.compile` (the
    compiled decoder of `VARPipeline.compile`) the same function sub-pixel ([`vq_upsample_conv`])."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return vq_upsample_conv(self.conv, x)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def vq_run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The ResNet blocks of one resolution level, each followed by its attention block when the level has them."""
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn) > 0:
            h = stage.attn[i](h)
    return h


class VQEncoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, Cvae, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, in_channels, base_channels, channel_multipliers, num_res_blocks, latent_channels, dropout, use_attention, use_mid_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        num_levels = len(channel_multipliers)
        in_multipliers = (1,) + tuple(channel_multipliers)
        self.down = nn.ModuleList()
        for level in range(num_levels):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = base_channels * in_multipliers[level], base_channels * channel_multipliers[level]
            for _ in range(num_res_blocks):
                stage.block.append(VQResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == num_levels - 1 and use_attention:
                    stage.attn.append(VQAttnBlock(block_in))
            if level != num_levels - 1:
                stage.downsample = VQDownsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = VQResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = VQAttnBlock(block_in) if use_mid_attention else nn.Identity()
        self.mid.block_2 = VQResnetBlock(block_in, block_in, dropout)
        self.norm_out = vq_group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = vq_run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


def vq_conv_to_rgb(conv: nn.Conv2d, h: torch.Tensor, pad_channels: bool | None = None) -> torch.Tensor:
    """
    The decoder's last convolution (few output channels). By default on CUDA in half precision its output channels are
    padded with zeros to a multiple of 8: cuDNN has no tensor-core kernel for 3 and fell back to one that took 26 ms
    for 64 images at 256 px on an H100 (a profile of 2026-11-27). The real channels come from the same weights.
    """
    pad = -conv.out_channels % 8
    if pad_channels is None:
        pad_channels = h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)
    if not (pad_channels and pad):
        return conv(h)
    layout = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, pad)).contiguous(memory_format=layout)
    bias = F.pad(conv.bias, (0, pad)) if conv.bias is not None else None
    return F.conv2d(h, weight, bias, stride=conv.stride, padding=conv.padding)[:, : conv.out_channels]


class VQDecoder(nn.Module):
    """Latent (B, Cvae, h, w) -> image (B, 3, h · 2^(levels-1), w · 2^(levels-1)). Stages are stored low to high
    resolution index (`up.0` is the full-resolution stage) and run from the last to the first."""

    def __init__(self, out_channels, base_channels, channel_multipliers, num_res_blocks, latent_channels, dropout, use_attention, use_mid_attention):
        super().__init__()
        num_levels = len(channel_multipliers)
        block_in = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(latent_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = VQResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = VQAttnBlock(block_in) if use_mid_attention else nn.Identity()
        self.mid.block_2 = VQResnetBlock(block_in, block_in, dropout)
        stages = []
        for level in reversed(range(num_levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = base_channels * channel_multipliers[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(VQResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == num_levels - 1 and use_attention:
                    stage.attn.append(VQAttnBlock(block_in))
            if level != 0:
                stage.upsample = VQUpsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = vq_group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            h = vq_run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return vq_conv_to_rgb(self.conv_out, F.silu(self.norm_out(h)))


def compile_vq_decoder(decoder: VQDecoder, **compile_kwargs) -> VQDecoder:
    """
    The fast decoder of `VARPipeline.compile()`: weights in channels-last layout (cuDNN's tensor-core convolutions take
    it without transposes), `torch.compile` of its forward (static shapes, dynamic from a second batch size), and
    cuDNN's benchmark mode during its calls only (the fastest convolution algorithm of each shape, timed once; the
    global setting is restored after every call). The eager forward is kept, so compiling again starts from it.
    """
    decoder.to(memory_format=torch.channels_last)
    if not hasattr(decoder, "_eager_forward"):
        decoder._eager_forward = decoder.forward
    compiled_forward = torch.compile(decoder._eager_forward, **compile_kwargs)

    def forward(z: torch.Tensor) -> torch.Tensor:
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return compiled_forward(z)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    decoder.forward = forward
    return decoder


# --------------------------------------------------------------------------------------------------------- quantizer
class VQPhi(nn.Conv2d):
    """Phi(h) = (1 - ratio)·h + ratio·Conv3x3(h): the residual refinement after upsampling a scale."""

    def __init__(self, channels: int, residual_ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.residual_ratio = abs(residual_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.residual_ratio) + super().forward(h).mul_(self.residual_ratio)


class MultiScaleResidualQuantizer(nn.Module):
    """Codebook + shared Phi convolutions; the per-scale residual quantization of VAR (paper Algorithm 1)."""

    def __init__(self, codebook_size: int, latent_channels: int, patch_nums, phi_count: int, phi_residual_ratio: float, phi_index_per_scale):
        super().__init__()
        self.patch_nums = list(patch_nums)
        self.phi_index_per_scale = list(phi_index_per_scale)
        self.embedding = nn.Embedding(codebook_size, latent_channels)
        self.phis = nn.ModuleList([VQPhi(latent_channels, phi_residual_ratio) for _ in range(phi_count)])

    def phi(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        if len(self.phis) == 0:  # phi_residual_ratio == 0: identity
            return h
        return self.phis[self.phi_index_per_scale[scale_index]](h)

    def upsampled_scale(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        """Phi(bicubic_up(h)) for scales before the last, Phi(h) for the last; (B, Cvae, pn, pn) -> (B, Cvae, h, w)."""
        side = self.patch_nums[-1]
        if scale_index != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(scale_index, h)

    def lookup(self, indices: torch.LongTensor, side: int) -> torch.Tensor:
        """Token ids (B, pn²) -> embeddings (B, Cvae, pn, pn)."""
        return self.embedding(indices).transpose(1, 2).reshape(indices.shape[0], -1, side, side)

    def nearest_code(self, z: torch.Tensor) -> torch.LongTensor:
        """Squared-L2 nearest codebook entry of each row of z (N, Cvae) -> (N,)."""
        codebook = self.embedding.weight.data.float()
        distances = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
        distances.addmm_(z, codebook.T, alpha=-2, beta=1)  # (N, V)
        return torch.argmin(distances, dim=1)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.LongTensor], torch.Tensor]:
        """Latent f (B, Cvae, h, w) -> (token ids per scale, accumulated f_hat)."""
        batch, channels, height, width = f.shape
        if height != self.patch_nums[-1] or width != self.patch_nums[-1]:
            raise ValueError(f"latent of side {height}x{width} does not match the last scale {self.patch_nums[-1]}")
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        scale_indices = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            indices = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, channels)).view(batch, pn * pn)
            h = self.upsampled_scale(si, self.lookup(indices, pn))
            f_hat.add_(h)
            f_rest.sub_(h)
            scale_indices.append(indices)
        return scale_indices, f_hat


# ------------------------------------------------------------------------------------------------------------- model
class MultiScaleVQModel(ModelMixin, ConfigMixin):
    r"""
    VAR's multi-scale VQ tokenizer. Defaults describe the released `vae_ch160v4096z32` (ImageNet 256 px).

    Parameters:
        codebook_size (`int`): vocabulary V.
        latent_channels (`int`): latent channels Cvae.
        base_channels (`int`): channels of the first encoder level (upstream `ch`).
        channel_multipliers (`tuple[int]`): per-level channel multipliers; the downsampling factor is 2^(levels-1).
        num_res_blocks (`int`): ResNet blocks per encoder level (the decoder has one more).
        dropout (`float`): dropout inside the ResNet blocks.
        use_attention (`bool`): self-attention after each block of the lowest-resolution level.
        use_mid_attention (`bool`): self-attention in the middle block.
        patch_nums (`tuple[int]`): side of each scale's token map; the last equals the latent side.
        phi_count (`int`): number of shared Phi convolutions (0 when `phi_residual_ratio` is 0).
        phi_residual_ratio (`float`): Phi(h) = (1 - ratio)·h + ratio·conv(h).
        phi_index_per_scale (`tuple[int]`, *optional*): Phi used by each scale; upstream's nearest-tick rule if `None`.
        beta (`float`): commitment-loss weight (training only).
    """

    _supports_gradient_checkpointing = False
    _skip_layerwise_casting_patterns = ["quantizer"]
    _keep_in_fp32_modules = ["quantizer"]

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 4096,
        latent_channels: int = 32,
        base_channels: int = 160,
        channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        use_attention: bool = True,
        use_mid_attention: bool = True,
        in_channels: int = 3,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        phi_count: int = 4,
        phi_residual_ratio: float = 0.5,
        phi_index_per_scale: tuple[int, ...] | None = None,
        beta: float = 0.25,
    ):
        super().__init__()
        if len(patch_nums) < 2 or list(patch_nums) != sorted(patch_nums) or min(patch_nums) < 1:
            raise ValueError(f"patch_nums must be at least two increasing positive sides, got {patch_nums}")
        if base_channels % 32 or any(base_channels * m % 32 for m in channel_multipliers):
            raise ValueError("every level's channel count must be a multiple of 32 (GroupNorm with 32 groups)")
        if abs(phi_residual_ratio) <= 1e-6:
            phi_count = 0
        if phi_index_per_scale is None:
            phi_index_per_scale = upstream_phi_index_per_scale(len(patch_nums), phi_count)
            self.register_to_config(phi_index_per_scale=list(phi_index_per_scale), phi_count=phi_count)
        if len(phi_index_per_scale) != len(patch_nums) or (phi_count and max(phi_index_per_scale) >= phi_count):
            raise ValueError(f"phi_index_per_scale {phi_index_per_scale} does not fit {len(patch_nums)} scales and {phi_count} Phis")

        args = (base_channels, channel_multipliers, num_res_blocks, latent_channels, dropout, use_attention, use_mid_attention)
        self.encoder = VQEncoder(in_channels, *args)
        self.decoder = VQDecoder(in_channels, *args)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1)
        self.quantizer = MultiScaleResidualQuantizer(
            codebook_size, latent_channels, patch_nums, phi_count, phi_residual_ratio, phi_index_per_scale
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ModelMixin.from_pretrained`, safetensors only: pickled weights are refused, never unpickled."""
        return super().from_pretrained(pretrained_model_name_or_path, **safetensors_only(pretrained_model_name_or_path, kwargs))

    # ------------------------------------------------------------------------------------------------ dtype
    def _apply(self, fn, recurse: bool = True):
        """Casting to half precision (`.to(torch.bfloat16)`, `.half()`, a pipeline's `.to(dtype)`) leaves the quantizer
        (codebook, Phi convolutions: the latent arithmetic) in float32, as `from_pretrained(dtype=...)` does; it still
        moves with the model."""
        quantizer = self._modules.pop("quantizer")
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["quantizer"] = quantizer

        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dtype == torch.float32:
                target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # where `fn` sends a float32 tensor
                if target.dtype in (torch.float16, torch.bfloat16):
                    return tensor.to(device=target.device)
            return fn(tensor)

        quantizer._apply(keep_float32, recurse)
        return self

    def to(self, *args, **kwargs):
        # diffusers' `ModelMixin.to` (its group-offload and quantization checks included) without its warning that a
        # dtype cast also casts the float32 modules, which `_apply` above prevents.
        level = diffusers_modeling_logger.level
        diffusers_modeling_logger.setLevel(max(level, logging.ERROR))
        try:
            return super().to(*args, **kwargs)
        finally:
            diffusers_modeling_logger.setLevel(level)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def patch_nums(self) -> list[int]:
        return list(self.config.patch_nums)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_multipliers) - 1)

    @property
    def resolution(self) -> int:
        """Image side the patch schedule is made for."""
        return self.patch_nums[-1] * self.downsample_factor

    # -------------------------------------------------------------------------------------------- tokenizer
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> MultiScaleVQEncoderOutput | tuple:
        """Images in [-1, 1] (B, 3, H, W) -> token ids of every scale and the quantized latent f_hat."""
        expected = self.resolution
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[-2:] != (expected, expected):
            raise ValueError(
                f"images must have shape (B, {self.config.in_channels}, {expected}, {expected}) for this tokenizer, "
                f"got {tuple(images.shape)}"
            )
        f = self.quant_conv(self.encoder(images))  # (B, Cvae, h, w)
        scale_indices, f_hat = self.quantizer.quantize(f.float())
        if not return_dict:
            return scale_indices, f_hat
        return MultiScaleVQEncoderOutput(scale_indices=scale_indices, f_hat=f_hat)

    def encode_scales(self, images: torch.Tensor) -> list[torch.LongTensor]:
        """Images in [-1, 1] (B, 3, H, W) -> list over scales of (B, pn²) token ids."""
        return self.encode(images).scale_indices

    def decode(self, f_hat: torch.Tensor, return_dict: bool = True) -> MultiScaleVQDecoderOutput | tuple:
        """Quantized latent (B, Cvae, h, w) -> images clamped to [-1, 1]."""
        weight = self.post_quant_conv.weight
        images = self.decoder(self.post_quant_conv(f_hat.to(weight.dtype))).clamp(-1, 1)
        if not return_dict:
            return (images,)
        return MultiScaleVQDecoderOutput(sample=images)

    def scales_to_f_hat(self, scale_indices: list[torch.LongTensor]) -> torch.Tensor:
        """Token ids of all scales -> accumulated latent f_hat (B, Cvae, h, w), float32."""
        self._check_scale_indices(scale_indices)
        batch, side = scale_indices[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(batch, self.config.latent_channels, side, side, device=scale_indices[0].device)
        for si, (indices, pn) in enumerate(zip(scale_indices, self.patch_nums)):
            f_hat.add_(self.quantizer.upsampled_scale(si, self.quantizer.lookup(indices, pn)))
        return f_hat

    def decode_scales(self, scale_indices: list[torch.LongTensor]) -> torch.Tensor:
        """Token ids of all scales -> images in [-1, 1]."""
        return self.decode(self.scales_to_f_hat(scale_indices)).sample

    def teacher_forcing_input(self, scale_indices: list[torch.LongTensor]) -> torch.Tensor:
        """Token ids of all scales -> the transformer's continuous input (B, L - first_scale_len, Cvae), float32."""
        self._check_scale_indices(scale_indices)
        batch, side = scale_indices[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(batch, self.config.latent_channels, side, side, device=scale_indices[0].device)
        next_inputs = []
        for si in range(len(self.patch_nums) - 1):
            h = self.quantizer.lookup(scale_indices[si], self.patch_nums[si])
            f_hat = self.accumulate_scale(si, f_hat, h)
            next_inputs.append(self.next_scale_input(si + 1, f_hat))
        return torch.cat(next_inputs, dim=1)

    # ------------------------------------------------------------------------------------- sampling helpers
    def accumulate_scale(self, scale_index: int, f_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """f_hat += Phi(up(h)) in place; h is one scale's embedding map (B, Cvae, pn, pn). Returns f_hat."""
        return f_hat.add_(self.quantizer.upsampled_scale(scale_index, h.float()))

    def next_scale_input(self, scale_index: int, f_hat: torch.Tensor) -> torch.Tensor:
        """The input tokens of scale `scale_index`: area_down(f_hat) flattened to (B, pn², Cvae)."""
        pn = self.patch_nums[scale_index]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def _check_scale_indices(self, scale_indices) -> None:
        if len(scale_indices) != len(self.patch_nums):
            raise ValueError(f"expected token ids for {len(self.patch_nums)} scales, got {len(scale_indices)}")
        for si, (indices, pn) in enumerate(zip(scale_indices, self.patch_nums)):
            if indices.ndim != 2 or indices.shape[1] != pn * pn or indices.shape[0] != scale_indices[0].shape[0]:
                raise ValueError(f"scale {si}: expected shape (B, {pn * pn}), got {tuple(indices.shape)}")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.codebook_size):
                raise ValueError(f"scale {si}: token ids must lie in [0, {self.config.codebook_size})")

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> MultiScaleVQDecoderOutput | tuple:
        """Reconstruction: encode to tokens and decode the quantized latent."""
        return self.decode(self.encode(images).f_hat, return_dict=return_dict)


__all__ = [
    "MultiScaleVQModel",
    "MultiScaleVQEncoderOutput",
    "MultiScaleVQDecoderOutput",
    "VQGroupNorm",
    "compile_vq_decoder",
    "upstream_phi_index_per_scale",
    "vq_group_norm_channels_last",
]
