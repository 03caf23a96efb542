"""Configuration of the VAR transformer (next-scale prediction, Tian et al. 2024)."""

from __future__ import annotations

import inspect

from transformers import PreTrainedConfig

# Token-map side lengths of the released checkpoints.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


VAR_ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa")  # None: transformers' default (sdpa where available)


class VARConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VARTransformer`]. The defaults describe VAR-d16 (ImageNet 256 px).

    Args:
        num_hidden_layers (`int`, *optional*, defaults to 16):
            Number of transformer blocks (upstream `depth`).
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the transformer (upstream `embed_dim`, 64 × depth in every release).
        num_attention_heads (`int`, *optional*, defaults to 16):
            Number of attention heads (upstream `num_heads`, = depth in every release).
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the MLP relative to `hidden_size`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the affine-free LayerNorms.
        num_classes (`int`, *optional*, defaults to 1000):
            Number of classes; the class embedding has one more row, the null (unconditional) class `num_classes`.
        codebook_size (`int`, *optional*, defaults to 4096):
            Vocabulary of the multi-scale VQ tokenizer (size of the logits).
        latent_channels (`int`, *optional*, defaults to 32):
            Channels of the tokenizer latent (input width of the teacher-forcing features).
        patch_nums (`tuple[int]`, *optional*, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`):
            Side length of every scale's token map, smallest first.
        shared_adaln (`bool`, *optional*, defaults to `False`):
            One AdaLN projection shared by all blocks plus a per-block learned table (as in VAR-d36-s).
        attn_l2_norm (`bool`, *optional*, defaults to `True`):
            l2-normalised queries/keys with a learned, clamped per-head scale (released checkpoints). `False` selects the
            legacy fixed softmax scale 0.25 / sqrt(head_dim).
        class_dropout_prob (`float`, *optional*, defaults to 0.1):
            Probability of replacing a label by the null class in training mode (classifier-free guidance).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Maximal stochastic-depth rate; block `i` uses `linspace(0, drop_path_rate, depth)[i]`.
        attn_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention weights during training.
        init_std (`float`, *optional*, defaults to -1):
            Std of the truncated-normal init; negative means `sqrt(1 / (3 * hidden_size))` as upstream.
        init_adaln (`float`, *optional*, defaults to 0.5):
            Multiplier of the scale/shift rows of the AdaLN projections at init.
        init_adaln_gamma (`float`, *optional*, defaults to 1e-5):
            Multiplier of the gate (gamma) rows of the AdaLN projections at init.
        init_head (`float`, *optional*, defaults to 0.02):
            Multiplier of the output head weight at init.
    """

    model_type = "var_hf"
    attribute_map = {"depth": "num_hidden_layers", "embed_dim": "hidden_size", "num_heads": "num_attention_heads"}

    def __init__(
        self,
        num_hidden_layers: int = 16,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        layer_norm_eps: float = 1e-6,
        num_classes: int = 1000,
        codebook_size: int = 4096,
        latent_channels: int = 32,
        patch_nums: tuple[int, ...] | list[int] = PATCH_NUMS_256,
        shared_adaln: bool = False,
        attn_l2_norm: bool = True,
        class_dropout_prob: float = 0.1,
        drop_path_rate: float = 0.0,
        attn_dropout: float = 0.0,
        init_std: float = -1.0,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        **kwargs,
    ):
        for key in ("attn_implementation", "_attn_implementation", "_attn_implementation_internal"):
            # A config.json naming a Hub kernel repo here would make transformers download and run its code.
            if kwargs.get(key) not in VAR_ATTENTION_IMPLEMENTATIONS:
                raise ValueError(f"{key}={kwargs[key]!r}: VAR attention is one of {VAR_ATTENTION_IMPLEMENTATIONS[1:]}")
        for key in kwargs:
            attribute = inspect.getattr_static(VARConfig, key, None)  # the class hierarchy, descriptors unevaluated
            if isinstance(attribute, (staticmethod, classmethod)) or callable(attribute) or isinstance(VARConfig.__dict__.get(key), property):
                raise ValueError(f"config key {key!r} is not a setting: VARConfig.{key} is derived or a method")
        # Upstream names are accepted as aliases.
        num_hidden_layers = kwargs.pop("depth", num_hidden_layers)
        hidden_size = kwargs.pop("embed_dim", hidden_size)
        num_attention_heads = kwargs.pop("num_heads", num_attention_heads)
        self.num_hidden_layers = int(num_hidden_layers)
        self.hidden_size = int(hidden_size)
        self.num_attention_heads = int(num_attention_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.layer_norm_eps = float(layer_norm_eps)
        self.num_classes = int(num_classes)
        self.codebook_size = int(codebook_size)
        self.latent_channels = int(latent_channels)
        self.patch_nums = [int(p) for p in patch_nums]
        self.shared_adaln = bool(shared_adaln)
        self.attn_l2_norm = bool(attn_l2_norm)
        self.class_dropout_prob = float(class_dropout_prob)
        self.drop_path_rate = float(drop_path_rate)
        self.attn_dropout = float(attn_dropout)
        self.init_std = float(init_std)
        self.init_adaln = float(init_adaln)
        self.init_adaln_gamma = float(init_adaln_gamma)
        self.init_head = float(init_head)
        self._check()
        super().__init__(**kwargs)

    def _check(self) -> None:
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if len(self.patch_nums) < 2 or any(p < 1 for p in self.patch_nums):
            raise ValueError(f"patch_nums needs at least two positive scales, got {self.patch_nums}")
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"patch_nums must be increasing, got {self.patch_nums}")
        if self.num_classes < 1 or self.codebook_size < 2 or self.latent_channels < 1:
            raise ValueError("num_classes, codebook_size and latent_channels must be positive")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")

    # Derived sizes (not serialised).
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Total number of tokens over all scales (upstream `L`)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def first_scale_len(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def scale_ranges(self) -> list[tuple[int, int]]:
        """`(begin, end)` token range of every scale in the flattened sequence."""
        ranges, begin = [], 0
        for pn in self.patch_nums:
            ranges.append((begin, begin + pn * pn))
            begin += pn * pn
        return ranges


__all__ = ["VARConfig", "PATCH_NUMS_256", "PATCH_NUMS_512", "VAR_ATTENTION_IMPLEMENTATIONS"]
