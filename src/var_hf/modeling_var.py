"""PyTorch VAR transformer: class-conditional next-scale prediction (Tian et al., NeurIPS 2024).

Weight-compatible with the official FoundationVision/VAR checkpoints once converted
(`conversion/convert_original_var.py`). Notation in shape comments: B batch, L tokens over all scales,
l tokens of one scale, C hidden size, H heads, D head dim, V codebook size, Cvae latent channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_var import VARConfig
from .safety import safetensors_only


@dataclass
class VARTransformerOutput(ModelOutput):
    """
    Output of [`VARTransformer.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean cross-entropy over all tokens of all scales, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, seq_len, codebook_size)`):
            Next-scale token logits (float32).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


def var_scale_of_token(patch_nums: list[int]) -> torch.LongTensor:
    """Scale index of every token of the flattened sequence, (L,)."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def var_block_causal_mask(patch_nums: list[int]) -> torch.Tensor:
    """Additive (L, L) mask: 0 where the query's scale >= the key's scale, -inf elsewhere."""
    scale_of_token = var_scale_of_token(patch_nums)  # (L,)
    allowed = scale_of_token[:, None] >= scale_of_token[None, :]
    return torch.where(allowed, 0.0, -torch.inf)


def var_drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm semantics)."""
    if not training or drop_prob == 0.0:  # `training` first: no per-layer guard on drop_prob under torch.compile
        return hidden_states
    keep_prob = 1.0 - drop_prob
    keep = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep_prob)
    return hidden_states * keep.div_(keep_prob)


class VARKVCache(nn.Module):
    """Static key/value cache of one attention layer: the total token count L is known in advance."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, num_heads, seq_len, head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("value_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, begin: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the keys/values of tokens [begin, begin + l) and return all keys/values up to there."""
        end = begin + key.shape[2]
        self.key_cache[:, :, begin:end] = key
        self.value_cache[:, :, begin:end] = value
        return self.key_cache[:, :, :end], self.value_cache[:, :, :end]


def var_allow_recompiles(minimum: int = 64) -> None:
    """Raise dynamo's per-function recompile limit (default 8) to `minimum`: compiled VAR blocks get one entry per
    scale shape, batch size or progressive-training stage, and past the limit dynamo silently falls back to eager."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), minimum))


def compile_transformer_blocks(transformer: nn.Module, **compile_kwargs) -> nn.Module:
    """
    `torch.compile` every transformer block in place (`nn.Module.compile`: parameter names and checkpoints unchanged).
    All blocks share one compiled graph (their code and shapes are the same), so compiling costs about one block's
    time; fuses the AdaLN modulation, normalisations and activations of forward and backward. Used by training
    (`train_var.py --torch_compile`) and by `VARPipeline.compile()`.
    """
    var_allow_recompiles()  # one entry per scale shape, batch size or progressive-training stage
    for layer in transformer.layers:
        layer.compile(**compile_kwargs)
    return transformer


@torch.compiler.disable
def var_kv_cached_attention(kv_cache: VARKVCache, begin: int, query, key, value, scale: float, eager: bool) -> torch.Tensor:
    """
    Sampling attention of one scale's queries (B, H, l, D) over the cached keys/values of all tokens so far.

    Kept out of `torch.compile` graphs: the cache's fixed sizes would otherwise pin every compiled block to one batch
    size and scale, while without it one dynamic-shape compilation serves them all.
    """
    key, value = kv_cache.update(begin, key, value)  # (B, H, begin + l, D)
    if eager:
        return var_eager_attention(query, key, value, None, scale, 0.0)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn value


def var_float8_rowwise(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (float8_e4m3fn (M, K), float32 scale (M, 1)) with matrix ≈ float8 · scale, one scale per row."""
    scale = matrix.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FLOAT8_MAX
    return (matrix.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn), scale


class VARFloat8Linear(nn.Linear):
    """
    Inference `nn.Linear` computed in float8 (e4m3): per-row scales for the activations (per token) and the weight (per
    output channel), one `torch._scaled_mm`, bias added in the compute dtype. Shares `weight` and `bias` with the linear
    it replaces (same parameter names, same checkpoints); the float8 weight is a snapshot taken at construction.
    Made by [`VARTransformer.set_float8_matmuls`].
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        weight_float8, weight_scale = var_float8_rowwise(linear.weight.detach())  # (N, K), (N, 1)
        self.register_buffer("weight_float8", weight_float8, persistent=False)
        self.register_buffer("weight_float8_scale", weight_scale.t().contiguous(), persistent=False)  # (1, N)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight_float8.dtype != torch.float8_e4m3fn:
            raise RuntimeError("the float8 weights were cast (model.to(dtype) after set_float8_matmuls): call set_float8_matmuls(True) again")
        rows = hidden_states.reshape(-1, self.in_features)  # (M, K)
        rows_float8, rows_scale = var_float8_rowwise(rows)
        out = torch._scaled_mm(
            rows_float8,
            self.weight_float8.t(),
            scale_a=rows_scale,
            scale_b=self.weight_float8_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,  # Hopper's fast float8 accumulation, as inference recipes use (torchao's forward)
        ).to(hidden_states.dtype)  # (M, N)
        bias = self.bias if bias is None else bias
        if bias is not None:
            out = out + bias
        return out.view(*hidden_states.shape[:-1], self.out_features)


def var_eager_attention(query, key, value, attention_mask, scale: float, dropout: float) -> torch.Tensor:
    """Reference attention: softmax(q·kᵀ·scale + mask)·v. Shapes (B, H, l, D) -> (B, H, l, D)."""
    weights = torch.matmul(query, key.transpose(-2, -1)) * scale  # (B, H, l, L)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(dim=-1), p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


def var_block_causal_attention(query, key, value, scale_ranges: list[tuple[int, int]], scale: float, dropout: float) -> torch.Tensor:
    """
    Block-causal attention over a whole sequence (B, H, L, D) -> (B, H, L, D) without a mask: the queries of each scale
    attend to every key up to the end of that scale, one unmasked SDPA call per scale. The same function as SDPA with
    `var_block_causal_mask`, but flash attention applies (an (L, L) additive mask needs SDPA's slower masked kernels)
    and the masked-out ~40 % of the score matrix is never computed. Used by compiled blocks (which fuse the backward's
    sum of key/value slice gradients) and without gradients.
    """
    outputs = [
        F.scaled_dot_product_attention(query[:, :, begin:end], key[:, :, :end], value[:, :, :end], dropout_p=dropout, scale=scale)
        for begin, end in scale_ranges
    ]
    return torch.cat(outputs, dim=2)


class VARAttention(nn.Module):
    """
    Multi-head self-attention of a VAR block.

    One bias-free projection to [q; k; v] with the effective bias concat(q_bias, 0, v_bias). In l2 mode q and k are
    l2-normalised, q is multiplied by exp(min(logit_scale, ln 100)) per head and the softmax scale is 1; in legacy mode
    there is no normalisation and the softmax scale is 0.25 / sqrt(head_dim).
    """

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attn_l2_norm = config.attn_l2_norm
        hidden = config.hidden_size
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(hidden))
        self.v_bias = nn.Parameter(torch.zeros(hidden))
        if self.attn_l2_norm:
            self.logit_scale = nn.Parameter(torch.full((1, self.num_heads, 1, 1), math.log(4.0)))
            self.max_logit_scale = math.log(100.0)
            self.softmax_scale = 1.0
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.out_proj = nn.Linear(hidden, hidden)
        self.kv_cache: VARKVCache | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, l, C)
        attention_mask: torch.Tensor | None = None,  # additive (l, L) or None
        cache_position: int | None = None,  # first token index of `hidden_states` when decoding with the KV cache
        block_causal: bool = False,  # `attention_mask` is the block-causal mask of the whole sequence
    ) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        if isinstance(self.qkv_proj, VARFloat8Linear):
            qkv = self.qkv_proj(hidden_states, bias)  # (B, l, 3C)
        elif isinstance(self.qkv_proj, nn.Linear):
            qkv = F.linear(hidden_states, self.qkv_proj.weight, bias)  # (B, l, 3C), upstream's op
        else:  # a wrapped projection (a LoRA adapter): its own forward must run, reading `.weight` would skip it
            qkv = self.qkv_proj(hidden_states)  # (B, l, 3C)
            qkv = qkv + bias.to(qkv.dtype)  # (under autocast F.linear casts the bias too)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, l, D)
        query, key, value = qkv.unbind(0)
        if self.attn_l2_norm:
            scale = self.logit_scale.clamp_max(self.max_logit_scale).exp()  # (1, H, 1, 1)
            query = F.normalize(query, dim=-1).mul(scale)
            key = F.normalize(key, dim=-1)
        dropout = self.config.attn_dropout if self.training else 0.0
        eager = self.config._attn_implementation == "eager"
        if block_causal and (attention_mask is None or length != self.config.seq_len):
            raise ValueError(f"block_causal: the whole sequence ({self.config.seq_len} tokens) with its block-causal attention_mask")
        if self.kv_cache is not None and cache_position is not None:
            if attention_mask is not None:
                raise ValueError("KV-cached attention is block-causal by construction and takes no attention_mask")
            attn = var_kv_cached_attention(self.kv_cache, cache_position, query, key, value, self.softmax_scale, eager)
        elif block_causal and not eager and (torch.compiler.is_compiling() or not torch.is_grad_enabled()):
            # Per scale, without the mask. Compiled or without gradients only: in eager autograd the backward of the
            # key/value slices (ten full-size gradients summed) costs more than the masked kernel saves.
            attn = var_block_causal_attention(query, key, value, self.config.scale_ranges, self.softmax_scale, dropout)
        elif eager:
            attn = var_eager_attention(query, key, value, attention_mask, self.softmax_scale, dropout)
        else:
            attn = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=self.softmax_scale
            )
        attn = attn.transpose(1, 2).reshape(batch, length, hidden)  # (B, l, C)
        return self.out_proj(attn)


class VARMLP(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        intermediate = round(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, intermediate)
        self.fc2 = nn.Linear(intermediate, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh"))


class VARBlock(GradientCheckpointingLayer):
    """
    AdaLN transformer block. The condition gives six (B, 1, C) vectors, in this order:
    gamma1, gamma2, scale1, scale2, shift1, shift2;
    x += gamma1 · Attn(LN(x)·(1 + scale1) + shift1);  x += gamma2 · MLP(LN(x)·(1 + scale2) + shift2).
    """

    def __init__(self, config: VARConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.attn = VARAttention(config)
        self.mlp = VARMLP(config)
        if config.shared_adaln:
            # Per-block table added to the shared projection of the condition.
            self.adaln_table = nn.Parameter(torch.zeros(1, 1, 6, config.hidden_size))
        else:
            self.adaln_modulation = nn.Linear(config.hidden_size, 6 * config.hidden_size)
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers)
        self.drop_path_rate = float(rates[layer_idx])

    def modulation(self, condition: torch.Tensor) -> torch.Tensor:
        """The six AdaLN vectors (B, 1, 6, C) from the class embedding (B, C), or from the shared AdaLN output
        (B, 1, 6, C). They depend on the class only, so sampling computes them once for all scales."""
        if self.config.shared_adaln:
            return self.adaln_table + condition  # (B, 1, 6, C)
        return self.adaln_modulation(F.silu(condition)).view(-1, 1, 6, self.hidden_size)  # (B, 1, 6, C)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, l, C)
        condition: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_position: int | None = None,
        modulation: torch.Tensor | None = None,  # this block's `modulation(condition)` (B, 1, 6, C), if computed already
        block_causal: bool = False,  # `attention_mask` is the whole sequence's block-causal mask (see `VARAttention`)
    ) -> torch.Tensor:
        if modulation is None:
            modulation = self.modulation(condition)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)  # 6 × (B, 1, C)
        eps = self.config.layer_norm_eps
        normed = F.layer_norm(hidden_states, (self.hidden_size,), eps=eps).mul(scale1.add(1)).add_(shift1)
        attn = self.attn(normed, attention_mask=attention_mask, cache_position=cache_position, block_causal=block_causal).mul_(gamma1)
        hidden_states = hidden_states + var_drop_path(attn, self.drop_path_rate, self.training)
        normed = F.layer_norm(hidden_states, (self.hidden_size,), eps=eps).mul(scale2.add(1)).add_(shift2)
        mlp = self.mlp(normed).mul(gamma2)
        return hidden_states + var_drop_path(mlp, self.drop_path_rate, self.training)


class VARPreTrainedModel(PreTrainedModel):
    config: VARConfig
    config_class = VARConfig
    base_model_prefix = ""
    main_input_name = "class_labels"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VARBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"attn_bias_for_masking", r"lvl_1L", r"zero_k_bias"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, safetensors only: pickled weights are refused, never unpickled."""
        kwargs = safetensors_only(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream initialisation (`VAR.init_weights`): truncated normal with std sqrt(1/(3C)), scaled AdaLN and head.

        Uses `transformers.initialization`, which leaves weights that were loaded from a checkpoint untouched.
        """
        config = self.config
        std = config.init_std if config.init_std >= 0 else math.sqrt(1.0 / (3 * config.hidden_size))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.trunc_normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VARAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
            if module.attn_l2_norm:
                init.constant_(module.logit_scale, math.log(4.0))
        elif isinstance(module, VARTransformer):
            # Visited last (children first). Containers without parameters of their own are skipped by transformers'
            # initialiser, so the block- and head-specific scalings are applied here.
            init.trunc_normal_(module.start_pos_embed, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
            # Non-persistent buffers are rebuilt from the config (they are not in checkpoints).
            init.copy_(module.scale_of_token, var_scale_of_token(config.patch_nums).view(1, -1))
            init.copy_(module.attn_mask, var_block_causal_mask(config.patch_nums))
            hidden = config.hidden_size
            gate_rows = 2 * hidden  # gamma1, gamma2 come first in the six-way split
            depth_scale = math.sqrt(2 * config.num_hidden_layers)
            for layer in module.layers:
                init.trunc_normal_(layer.attn.out_proj.weight, std=std / depth_scale)
                init.trunc_normal_(layer.mlp.fc2.weight, std=std / depth_scale)
                if config.shared_adaln:
                    table = torch.randn(layer.adaln_table.shape) / math.sqrt(hidden)
                    table[:, :, 2:] *= config.init_adaln
                    table[:, :, :2] *= config.init_adaln_gamma
                    init.copy_(layer.adaln_table, table)
                else:
                    weight = nn.init.trunc_normal_(torch.empty(layer.adaln_modulation.weight.shape), std=std)
                    weight[gate_rows:] *= config.init_adaln
                    weight[:gate_rows] *= config.init_adaln_gamma
                    init.copy_(layer.adaln_modulation.weight, weight)
            head_weight = nn.init.trunc_normal_(torch.empty(module.head_norm.adaln_modulation.weight.shape), std=std)
            init.copy_(module.head_norm.adaln_modulation.weight, head_weight * config.init_adaln)
            if config.init_head >= 0:
                init.copy_(module.lm_head.weight, module.lm_head.weight * config.init_head)


class VARHeadNorm(nn.Module):
    """AdaLN before the output head: LN(x)·(1 + scale) + shift from the class embedding."""

    def __init__(self, config: VARConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.eps = config.layer_norm_eps
        self.adaln_modulation = nn.Linear(config.hidden_size, 2 * config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaln_modulation(F.silu(class_embeds)).view(-1, 1, 2, self.hidden_size).unbind(2)
        return F.layer_norm(hidden_states, (self.hidden_size,), eps=self.eps).mul(scale.add(1)).add_(shift)


class VARTransformer(VARPreTrainedModel):
    r"""
    The VAR transformer. Token 0 is the class embedding (start token); the other tokens embed the continuous
    teacher-forcing features of the multi-scale latent ([`MultiScaleVQModel.teacher_forcing_input`]). Every token adds
    its scale embedding and absolute position embedding. Attention is block-causal across scales.

    Training/teacher forcing: [`~VARTransformer.forward`]. Sampling: [`VARPipeline`], which uses
    [`~VARTransformer.setup_kv_cache`], [`~VARTransformer.first_scale_embeds`], [`~VARTransformer.next_scale_embeds`]
    and [`~VARTransformer.forward_scale`].
    """

    def __init__(self, config: VARConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.class_embed = nn.Embedding(config.num_classes + 1, hidden)  # last row: null class
        self.input_proj = nn.Linear(config.latent_channels, hidden)  # upstream `word_embed`
        self.start_pos_embed = nn.Parameter(torch.zeros(1, config.first_scale_len, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.seq_len, hidden))
        self.scale_embed = nn.Embedding(config.num_scales, hidden)
        if config.shared_adaln:
            self.shared_adaln = nn.Linear(hidden, 6 * hidden)
        self.layers = nn.ModuleList([VARBlock(config, i) for i in range(config.num_hidden_layers)])
        self.head_norm = VARHeadNorm(config)
        self.lm_head = nn.Linear(hidden, config.codebook_size)

        self.register_buffer("scale_of_token", var_scale_of_token(config.patch_nums).view(1, -1), persistent=False)  # (1, L)
        self.register_buffer("attn_mask", var_block_causal_mask(config.patch_nums), persistent=False)  # (L, L)
        self.gradient_checkpointing = False
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------- helpers
    def get_input_embeddings(self) -> nn.Module:
        """VAR's token embedding: the projection of each scale's continuous input (upstream `word_embed`). transformers
        and peft hook its output so that, with frozen weights (adapters), checkpointed blocks still pass gradients."""
        return self.input_proj

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.input_proj = value

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def scale_pos_embeds(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Scale embedding + absolute position embedding of tokens [begin, end), (1, end - begin, C)."""
        end = self.config.seq_len if end is None else end
        return self.scale_embed(self.scale_of_token[:, begin:end]) + self.pos_embed[:, begin:end]

    def adaln_condition(self, class_embeds: torch.Tensor) -> torch.Tensor:
        """What the blocks receive: the class embedding, or the shared AdaLN output (B, 1, 6, C)."""
        if self.config.shared_adaln:
            return self.shared_adaln(F.silu(class_embeds)).view(-1, 1, 6, self.config.hidden_size)
        return class_embeds

    def logits_from_hidden(self, hidden_states: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
        """Head: (B, l, C) -> float32 logits (B, l, V). Computed in the head's dtype (float32 in reference mode)."""
        dtype = self.lm_head.weight.dtype
        return self.lm_head(self.head_norm(hidden_states.to(dtype), class_embeds.to(dtype))).float()

    # ------------------------------------------------------------------------------------------------------ teacher forcing
    def forward(
        self,
        class_labels: torch.LongTensor,  # (B,)
        teacher_input: torch.Tensor,  # (B, L - first_scale_len, Cvae)
        labels: torch.LongTensor | None = None,  # (B, L) target token ids of all scales
        return_dict: bool | None = None,
        **kwargs,
    ) -> VARTransformerOutput | tuple:
        """
        Teacher-forced logits of every token of every scale. In training mode each label is replaced by the null class
        with probability `config.class_dropout_prob` (classifier-free guidance training); in eval mode never.
        """
        config = self.config
        batch = teacher_input.shape[0]
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        expected = (config.seq_len - config.first_scale_len, config.latent_channels)
        if tuple(teacher_input.shape[1:]) != expected:
            raise ValueError(f"teacher_input must have shape (B, {expected[0]}, {expected[1]}), got {tuple(teacher_input.shape)}")
        if self.training and config.class_dropout_prob > 0:
            drop = torch.rand(batch, device=class_labels.device) < config.class_dropout_prob
            class_labels = torch.where(drop, self.null_class_id, class_labels)

        class_embeds = self.class_embed(class_labels)  # (B, C)
        start = class_embeds.unsqueeze(1).expand(batch, config.first_scale_len, -1) + self.start_pos_embed
        tokens = self.input_proj(teacher_input.to(self.input_proj.weight.dtype))  # (B, L - first, C)
        hidden_states = torch.cat((start, tokens), dim=1) + self.scale_pos_embeds()  # (B, L, C)

        condition = self.adaln_condition(class_embeds)
        attn_mask = self.attn_mask.to(hidden_states.dtype)
        for layer in self.layers:
            # block_causal: SDPA may run unmasked per scale instead (`var_block_causal_attention`), the same function
            hidden_states = layer(hidden_states, condition, attn_mask, block_causal=True)
        logits = self.logits_from_hidden(hidden_states, class_embeds)  # (B, L, V)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return VARTransformerOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------------------------------------------ sampling
    def set_float8_matmuls(self, enabled: bool = True) -> None:
        """
        Inference speed on GPUs with float8 tensor cores (compute capability >= 8.9: Ada, Hopper and newer): the four
        matmuls of every block (qkv, attention output, MLP) in float8 e4m3 with per-row scales ([`VARFloat8Linear`]);
        embeddings, AdaLN and the head stay in the model's dtype. Half the block weights' bytes, and tensor cores with
        twice their bfloat16 peak, at a cost in accuracy (teacher-forced logits within 5 % relative error of float32 on
        the test checkpoints, against 2 % for bfloat16): a speed mode, not the reference. Parameters and checkpoints
        are unchanged; the float8 weights are a snapshot, so call this again after changing the weights. `False` restores
        the plain linears. Inference only (`torch._scaled_mm` has no backward).
        """
        device = self.lm_head.weight.device
        if enabled and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                f"float8 matmuls need a GPU of compute capability 8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} "
                f"has {torch.cuda.get_device_capability(device)}"
            )
        if enabled:  # a 16 x 16 probe: an unsupported device or build fails here, with nothing changed yet
            try:
                VARFloat8Linear(nn.Linear(16, 16, device=device, dtype=self.lm_head.weight.dtype))(torch.ones(1, 16, device=device))
            except RuntimeError as error:
                raise ValueError(f"float8 matmuls (torch._scaled_mm) are not available on {device}: {error}") from error
        targets = [
            (parent, name)
            for layer in self.layers
            for parent, name in ((layer.attn, "qkv_proj"), (layer.attn, "out_proj"), (layer.mlp, "fc1"), (layer.mlp, "fc2"))
        ]
        if enabled and not all(isinstance(getattr(parent, name), nn.Linear) for parent, name in targets):
            raise ValueError("float8 matmuls replace plain linears; merge adapters (e.g. LoRA: `merge_and_unload()`) first")
        for parent, name in targets:
            linear = getattr(parent, name)
            if enabled:
                # float8 matmuls need both dimensions to be multiples of 16; other linears stay as they are.
                if linear.in_features % 16 == 0 and linear.out_features % 16 == 0:
                    setattr(parent, name, VARFloat8Linear(linear))
            elif isinstance(linear, VARFloat8Linear):
                plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
                plain.weight, plain.bias = linear.weight, linear.bias
                setattr(parent, name, plain)

    def setup_kv_cache(self, batch_size: int | None, dtype: torch.dtype | None = None, device=None) -> None:
        """Preallocate a static KV cache for `batch_size` rows (the CFG-doubled batch); `None` removes it."""
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = None if batch_size is None else VARKVCache(
                batch_size, attn.num_heads, self.config.seq_len, attn.head_dim,
                dtype or attn.qkv_proj.weight.dtype, device or attn.qkv_proj.weight.device,
            )

    def first_scale_embeds(self, class_embeds: torch.Tensor) -> torch.Tensor:
        """Input of the first scale: class embedding + start position + scale/position embedding, (B, first_l, C)."""
        first = self.config.first_scale_len
        batch = class_embeds.shape[0]
        return (
            class_embeds.unsqueeze(1).expand(batch, first, -1)
            + self.start_pos_embed.expand(batch, first, -1)
            + self.scale_pos_embeds(0, first)
        )

    def next_scale_embeds(self, scale_index: int, latent_tokens: torch.Tensor) -> torch.Tensor:
        """Embed the continuous input of scale `scale_index` (B, pn², Cvae) -> (B, pn², C)."""
        begin, end = self.config.scale_ranges[scale_index]
        tokens = self.input_proj(latent_tokens.to(self.input_proj.weight.dtype))
        return tokens + self.scale_pos_embeds(begin, end)

    def block_modulations(self, condition: torch.Tensor) -> list[torch.Tensor]:
        """Every block's AdaLN vectors for `condition` (see [`VARBlock.modulation`]), each (B, 1, 6, C): computed once per
        sampling run instead of once per scale (at batch 1 they are a third of the blocks' weights)."""
        return [layer.modulation(condition) for layer in self.layers]

    def forward_scale(
        self,
        scale_index: int,
        hidden_states: torch.Tensor,  # (B, pn², C)
        condition: torch.Tensor,
        class_embeds: torch.Tensor,
        modulations: list[torch.Tensor] | None = None,  # `block_modulations(condition)`, if computed already
    ) -> torch.Tensor:
        """Run all blocks on one scale's tokens (B, pn², C) with the KV cache; returns float32 logits (B, pn², V)."""
        begin, _ = self.config.scale_ranges[scale_index]
        modulations = modulations if modulations is not None else [None] * len(self.layers)
        for layer, modulation in zip(self.layers, modulations):
            hidden_states = layer(hidden_states, condition, None, begin, modulation)
        return self.logits_from_hidden(hidden_states, class_embeds)


__all__ = ["VARTransformer", "VARPreTrainedModel", "VARTransformerOutput", "VARBlock", "VARAttention", "VARFloat8Linear"]
