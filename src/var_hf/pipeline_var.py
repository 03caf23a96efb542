"""VARPipeline: class-conditional image generation and zero-shot editing by next-scale prediction."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging

from .modeling_var import VARTransformer, compile_transformer_blocks, var_allow_recompiles
from .hub import DEFAULT_COMMIT_MESSAGE, UPLOAD_ALLOW_PATTERNS
from .safety import safetensors_only
from .sampling_var import gumbel_soft_embedding, guided_filtered_logits, sample_tokens, sampling_generator
from .vq_var import MultiScaleVQModel, compile_vq_decoder

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from var_hf import VARPipeline, DEFAULT_MODEL

        >>> pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
        >>> out = pipe(class_labels=[7, 7], generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("seven.png")
        ```
"""


def drop_local_paths(folder: str | os.PathLike) -> None:
    """Remove the `_name_or_path` diffusers records in a saved pipeline's configs (model_index.json, transformer/,
    vqvae/): the local folder it was loaded from is nobody's business on the Hub and means nothing elsewhere."""
    for config in (Path(folder) / name for name in ("model_index.json", "transformer/config.json", "vqvae/config.json")):
        values = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
        if isinstance(values, dict) and values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def images_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """
    (B, 3, H, W) images in [0, 1] -> PIL images, quantised exactly as diffusers' `numpy_to_pil` does (x·255 rounded half
    to even) but on the images' device: a quarter of the bytes cross to the host and the CPU does no arithmetic (at
    batch 64 on a GPU that is ~50 ms less).
    """
    pixels = images.float().mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3)
    return [PIL.Image.fromarray(image) for image in pixels.cpu().numpy()]


@dataclass
class VARPipelineOutput(BaseOutput):
    """
    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(B, H, W, 3)` or `torch.Tensor` of shape `(B, 3, H, W)`):
            Generated images in [0, 1] (`"np"`, `"pt"`) or PIL images.
        scale_indices (`list[torch.LongTensor]`):
            The tokens the model drew at every scale, each `(B, pn * pn)`. When editing, kept positions take the given
            image's tokens in the latent, but this list still holds what was drawn there (as upstream).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    scale_indices: list[torch.LongTensor]


class VARPipeline(DiffusionPipeline):
    r"""
    Class-conditional generation with VAR (next-scale prediction) and zero-shot in-painting, out-painting and
    class-conditional editing.

    Args:
        transformer ([`VARTransformer`]): predicts the token map of the next scale.
        vqvae ([`MultiScaleVQModel`]): multi-scale VQ tokenizer (encoder, residual quantizer, decoder).
        id2label (`dict[int, str]`, *optional*): class names; names separated by commas are all accepted.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _optional_components = []
    _callback_tensor_inputs = ["tokens", "f_hat", "logits"]

    def __init__(self, transformer: VARTransformer, vqvae: MultiScaleVQModel, id2label: dict | None = None):
        super().__init__()
        for name, component, expected in (("transformer", transformer, VARTransformer), ("vqvae", vqvae, MultiScaleVQModel)):
            if not isinstance(getattr(component, "_orig_mod", component), expected):  # e.g. a model_index.json naming another class
                raise TypeError(f"{name} must be a {expected.__name__}, got {type(component).__name__}")
        if list(transformer.config.patch_nums) != list(vqvae.config.patch_nums):
            raise ValueError(
                f"transformer and vqvae disagree on patch_nums: {transformer.config.patch_nums} vs {vqvae.config.patch_nums}"
            )
        if transformer.config.codebook_size != vqvae.config.codebook_size or transformer.config.latent_channels != vqvae.config.latent_channels:
            raise ValueError("transformer and vqvae disagree on codebook_size or latent_channels")
        self.register_modules(transformer=transformer, vqvae=vqvae)
        if id2label is None:
            id2label = {i: str(i) for i in range(transformer.config.num_classes)}
        id2label = {int(k): str(v) for k, v in id2label.items()}
        self.register_to_config(id2label=id2label)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # ----------------------------------------------------------------------------------------------------- loading
    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Download a pipeline repo: only configs, safetensors weights and the card (never pickles or code)."""
        from huggingface_hub import snapshot_download

        return snapshot_download(
            pretrained_model_name,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=kwargs.get("local_files_only", False),
            force_download=kwargs.get("force_download", False),
            allow_patterns=UPLOAD_ALLOW_PATTERNS,  # configs, safetensors, card: never pickles or code
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "VARPipeline":
        """
        Load from a folder written by `save_pretrained` or a Hub repo id. Only safetensors weights are read; a folder
        holding weights in any pickle format is refused before anything is loaded. `dtype=` sets the compute dtype
        (default float32; the quantizer stays float32 in any dtype).
        """
        kwargs = safetensors_only(None, kwargs)  # use_safetensors=True; the folder is checked once it is local
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        # Default float32 (the reference mode) for both components, whatever dtype a folder was saved in (transformers
        # alone would load the saved dtype, diffusers float32).
        kwargs.setdefault("dtype", torch.float32)
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(cls.download(str(pretrained_model_name_or_path), **kwargs))
        kwargs = safetensors_only(folder, kwargs)
        for key in ("cache_dir", "force_download", "local_files_only", "token", "revision"):
            kwargs.pop(key, None)
        pipe = super().from_pretrained(str(folder), **kwargs)
        pipe.transformer.eval()
        pipe.vqvae.eval()
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `model_index.json`, `transformer/` and `vqvae/` (safetensors only) and a model card (`README.md`)."""
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("var-hf saves safetensors only")
        repo_id = kwargs.pop("repo_id", None)
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        drop_local_paths(save_directory)
        card = Path(save_directory) / "README.md"
        if not card.exists():
            from .model_card import PLACEHOLDER_REPO_ID, write_model_card

            write_model_card(save_directory, self, repo_id=repo_id or PLACEHOLDER_REPO_ID)
        if push_to_hub:
            if repo_id is None:
                raise ValueError("push_to_hub=True needs repo_id=")
            from .hub import push_folder_to_hub

            push_folder_to_hub(
                save_directory, repo_id, private=kwargs.get("private"), token=kwargs.get("token"),
                commit_message=kwargs.get("commit_message") or DEFAULT_COMMIT_MESSAGE, revision=kwargs.get("revision"),
                create_pr=bool(kwargs.get("create_pr", False)),
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = DEFAULT_COMMIT_MESSAGE,
        revision: str | None = None,
        create_pr: bool = False,
        model_card_kwargs: dict | None = None,
    ) -> str:
        """
        Save to a temporary folder with our model card and upload only configs, safetensors and the card, as one commit
        to `revision` (default `main`) or, with `create_pr=True`, as a pull request. Returns the commit or PR URL.
        """
        import tempfile

        from .hub import push_folder_to_hub
        from .model_card import write_model_card

        with tempfile.TemporaryDirectory() as folder:
            super().save_pretrained(folder, safe_serialization=True)
            drop_local_paths(folder)
            write_model_card(folder, self, repo_id=repo_id, **(model_card_kwargs or {}))
            return push_folder_to_hub(
                folder, repo_id, private=private, token=token, commit_message=commit_message, revision=revision,
                create_pr=create_pr,
            )

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """Not supported: use `enable_model_cpu_offload()` (whole models move to the device for each call)."""
        raise NotImplementedError(
            "VARPipeline does not support enable_sequential_cpu_offload: its sampling loop reads weights through helper "
            "methods (static KV cache, fused qkv), which per-layer offload hooks never see. Use "
            "pipe.enable_model_cpu_offload() instead; even VAR-d30 needs only ~8 GiB in float32 (4 GiB in bfloat16)."
        )

    def enable_group_offload(self, *args, **kwargs):
        """Not supported, for the same reason as `enable_sequential_cpu_offload`: use `enable_model_cpu_offload()`."""
        raise NotImplementedError(
            "VARPipeline does not support enable_group_offload: its sampling loop reads weights through helper methods "
            "that group offload hooks never see. Use pipe.enable_model_cpu_offload() instead."
        )

    def compile(
        self,
        *,
        cuda_graphs: bool = True,
        compile_transformer: bool = True,
        compile_decoder: bool = True,
        float8: bool = False,
        **compile_kwargs,
    ) -> "VARPipeline":
        """
        Opt-in speed, one call: `pipe = VARPipeline.from_pretrained(path, dtype=torch.bfloat16).to("cuda").compile()`.

        - `cuda_graphs`: sampling runs from preallocated buffers (static KV cache) and, on CUDA, a whole sampling run —
          every scale's transformer step, guidance, top-k/top-p, token draw and latent update — is one captured CUDA
          graph per batch size and sampling settings (captured on the first call with them; a few seconds). The run's
          random numbers are drawn before the replay, scale by scale as the plain loop draws them, so the tokens are
          the plain loop's. Runs that need the host between scales (editing, `more_smooth`, `callback_on_step_end`)
          replay one graph per transformer step instead. Removes the kernel-launch and host overhead that dominates
          small batches. Same kernels, same results; the run's buffers (with the random numbers of every scale,
          B · L · V floats) stay allocated between calls; `compile(cuda_graphs=False, compile_transformer=False,
          compile_decoder=False)` releases them (and keeps what was compiled).
        - `compile_transformer`: `torch.compile` of every transformer block (fused normalisation, modulation and
          activations); one compilation with dynamic shapes serves all scales and batch sizes.
        - `compile_decoder`: `torch.compile` of the VQ decoder in channels-last layout (GroupNorm from per-channel
          statistics, fused with SiLU; upsampling convolutions computed sub-pixel), with cuDNN's benchmark mode during
          its calls only ([`compile_vq_decoder`]).
        - `float8` (off by default): the transformer blocks' matmuls in float8 with per-row scales
          ([`VARTransformer.set_float8_matmuls`]; GPUs of compute capability >= 8.9). Faster, approximate: a speed
          mode beside bfloat16, not the reference. `compile(float8=False)` switches it off again.

        Compiled kernels round differently from eager ones, so compiled float32 results are within float tolerance of
        the reference path, not bit-identical; `cuda_graphs` alone changes nothing. Random numbers are drawn on the
        pipeline's device except for a float32/float64 pipeline given a generator on another device (see `generator`).
        `compile_kwargs` go to `torch.compile`. Returns the pipeline, so `.to("cuda").compile()` chains.
        """
        self._use_sampling_graphs = cuda_graphs
        self._sampling_graphs = None
        self.transformer.set_float8_matmuls(float8)
        if compile_transformer:  # one dynamic-shape compilation for all scales and batch sizes
            compile_transformer_blocks(self.transformer, **{"dynamic": True, **compile_kwargs})
        if compile_decoder:
            var_allow_recompiles()
            compile_vq_decoder(self.vqvae.decoder, **compile_kwargs)
        return self

    def _sampling_runner(self, batch_rows: int, dtype: torch.dtype, device: torch.device):
        """The static-buffer / CUDA-graph sampler for this batch (see `compile`), or None."""
        if not getattr(self, "_use_sampling_graphs", False):
            return None
        from .cuda_graphs_var import VARSamplingGraphs

        runner = self._sampling_graphs
        if runner is None or not runner.matches(self.transformer, batch_rows, dtype, device):
            self._sampling_graphs = None  # free the previous batch size's buffers and graphs first
            runner = VARSamplingGraphs(self.transformer, batch_rows, dtype, device)
            self._sampling_graphs = runner
        return runner

    # ------------------------------------------------------------------------------------------------- labels
    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config.id2label.items()}

    @property
    def labels(self) -> dict[str, int]:
        """Every accepted class name (each comma-separated alias, and the full name) -> class id."""
        names: dict[str, int] = {}
        for class_id, full_name in sorted(self.id2label.items()):
            for alias in [full_name] + [part.strip() for part in full_name.split(",")]:
                if alias:
                    names.setdefault(alias, class_id)
        return names

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (e.g. "goldfish") to class ids."""
        if isinstance(label, str):
            label = [label]
        labels = self.labels
        missing = [name for name in label if name not in labels]
        if missing:
            preview = ", ".join(list(labels)[:20])
            raise ValueError(f"unknown class name(s) {missing}; known names include: {preview}, ... (see pipe.labels)")
        return [labels[name] for name in label]

    def _class_ids(self, class_labels, batch_size: int | None, generator) -> torch.LongTensor:
        num_classes = self.transformer.config.num_classes
        device = self._execution_device
        if class_labels is None:
            # Upstream: one multinomial over a uniform distribution of classes, drawn from the generator.
            uniform = torch.full((1, num_classes), 1.0 / num_classes, device=generator.device if generator is not None else device)
            return torch.multinomial(uniform, num_samples=batch_size, replacement=True, generator=generator).reshape(batch_size).to(device)
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                if not 0 <= int(label) <= num_classes:
                    raise ValueError(f"class id {label} is outside [0, {num_classes}] ({num_classes} is the null class)")
                ids.append(int(label))
            else:
                raise ValueError(f"class labels must be ints or class names, got {label!r}")
        if not ids:
            raise ValueError("class_labels is empty")
        return torch.tensor(ids, dtype=torch.long, device=device)

    # ------------------------------------------------------------------------------------------------ editing
    def _prepare_edit(self, image, edit_mask, batch_size: int) -> tuple[list[torch.LongTensor], torch.Tensor]:
        """Tokens of the image to edit (list of (B, pn²)) and the keep-mask at the last scale (B, 1, pn_K, pn_K)."""
        resolution = self.vqvae.resolution
        device = self._execution_device
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list):
            if not all(isinstance(im, PIL.Image.Image) for im in image):
                raise ValueError("image lists must hold PIL images")
            for im in image:
                if im.size != (resolution, resolution):
                    raise ValueError(
                        f"image size {im.size} is not the model's resolution {resolution}x{resolution}; resize it first, "
                        f"e.g. image.resize(({resolution}, {resolution}), PIL.Image.LANCZOS)"
                    )
            image = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in image])
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
            if image.ndim == 3:
                image = image[None]
            if image.shape[-1] == 3 and image.shape[1] != 3:
                image = image.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (resolution, resolution):
            raise ValueError(
                f"image must be (B, 3, {resolution}, {resolution}) in [0, 1] at the model's resolution, got {tuple(image.shape)}; "
                "resize it first (e.g. torch.nn.functional.interpolate or PIL resize)"
            )
        if float(image.min()) < 0 or float(image.max()) > 1:
            raise ValueError("image values must lie in [0, 1]")
        if image.shape[0] == 1 and batch_size > 1:
            image = image.expand(batch_size, -1, -1, -1)
        if image.shape[0] != batch_size:
            raise ValueError(f"got {image.shape[0]} images for a batch of {batch_size}")
        vq_dtype = self.vqvae.encoder.conv_in.weight.dtype
        scale_indices = self.vqvae.encode_scales(image.to(device=device, dtype=vq_dtype) * 2 - 1)

        mask = edit_mask
        if isinstance(mask, PIL.Image.Image):
            mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"edit_mask must be a tensor, numpy array or PIL image, got {type(mask).__name__}")
        mask = mask.to(device=device, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch_size):
            raise ValueError(f"edit_mask must be (h, w), (B, h, w) or (B, 1, h, w) with B in (1, {batch_size}), got {tuple(edit_mask.shape)}")
        if mask.shape[-1] != mask.shape[-2]:
            raise ValueError(f"edit_mask must be square, got {tuple(mask.shape[-2:])}")
        if float(mask.min()) < 0 or float(mask.max()) > 1:
            raise ValueError("edit_mask values must lie in [0, 1] (1 keeps the image's tokens, 0 lets the model draw)")
        side = self.vqvae.patch_nums[-1]
        if mask.shape[-1] != side:
            mask = F.interpolate(mask, size=(side, side), mode="area")  # pixel or other resolution -> token grid
        return scale_indices, mask.expand(batch_size, -1, -1, -1)

    @staticmethod
    def _mask_at_scale(mask: torch.Tensor, pn: int) -> torch.Tensor:
        """Upstream's per-scale keep mask: bilinear resize, > 0.5; scales of at most 3 tokens are always kept."""
        keep = F.interpolate(mask, size=(pn, pn), mode="bilinear", align_corners=False).gt(0.5).int()
        if pn * pn <= 3:
            keep.fill_(1)
        return keep

    # ------------------------------------------------------------------------------------------------ sampling
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 0

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(self, guidance_scale, top_k, top_p, num_images_per_prompt, output_type, image, edit_mask, generator, callback_on_step_end_tensor_inputs, decode_batch_size=None):
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 disables it), got {top_p!r}")
        if decode_batch_size is not None and (not isinstance(decode_batch_size, int) or decode_batch_size < 1):
            raise ValueError(f"decode_batch_size must be a positive int, got {decode_batch_size!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if (image is None) != (edit_mask is None):
            raise ValueError("editing needs both `image` and `edit_mask`")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("generator must be a single torch.Generator (one stream drives the whole batch, as upstream)")
        for name in callback_on_step_end_tensor_inputs or []:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r} is not one of {self._callback_tensor_inputs}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        more_smooth: bool = False,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        image: PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None,
        edit_mask: torch.Tensor | np.ndarray | PIL.Image.Image | None = None,
        batch_size: int | None = None,
        decode_batch_size: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VARPipelineOutput | tuple:
        r"""
        Generate images, or edit `image` where `edit_mask` is 0.

        Args:
            class_labels: class ids or names ("goldfish"), one per image. `None` draws random classes from the
                generator (as upstream) — or, when editing, uses the null class (plain in/out-painting).
                `num_classes` (the null class id) samples unconditionally.
            guidance_scale: VAR's ramped classifier-free guidance: t = guidance_scale · si / (K - 1), logits =
                (1 + t)·cond - t·uncond. 0 disables it; at the last scale it equals diffusers' w = 1 + guidance_scale.
            top_k: keep the k most likely tokens (ties kept); 0 disables. Values >= the vocabulary keep everything.
            top_p: nucleus sampling threshold in [0, 1]; 0 disables.
            more_smooth: Gumbel-softmax soft tokens for smoother pictures (visualisation only, not for FID).
            num_images_per_prompt: images per class label.
            generator: one `torch.Generator`; seeded, it reproduces upstream's `g_seed` samples exactly in float32.
                In float32 a generator on another device than the pipeline's draws the random numbers there (a CPU
                generator gives the CPU's samples on any device, slowly); in bfloat16/float16 the pipeline draws them on
                its own device from a seed taken from the generator (reproducible per seed, dtype and device model).
            output_type: "pil", "np" ((B, H, W, 3) in [0, 1]) or "pt" ((B, 3, H, W) in [0, 1]).
            return_dict: return a [`VARPipelineOutput`] instead of a tuple `(images, scale_indices)`.
            image: the image(s) to edit, in [0, 1] (PIL, numpy (B, H, W, 3) or tensor (B, 3, H, W)), at the model's
                resolution.
            edit_mask: 1 keeps the image's tokens, 0 lets the model draw. At the last scale's token grid
                (pn_K × pn_K), or at any square resolution (reduced by area averaging); (h, w), (B, h, w) or (B, 1, h, w).
            batch_size: number of images when `class_labels` is `None` (default 1, or the number of images to edit).
            decode_batch_size: decode the latents in chunks of this many images (less memory for big batches).
            callback_on_step_end: `fn(pipe, scale_index, scale_index, callback_kwargs) -> dict` after every scale;
                may replace "f_hat". Set `pipe._interrupt = True` inside it to stop early.
            callback_on_step_end_tensor_inputs: names passed in `callback_kwargs`: "tokens" (the scale's token ids,
                (B, pn²)), "f_hat" (the accumulated latent; a returned replacement is used) and "logits" (the filtered
                logits the tokens were drawn from).

        Returns:
            [`VARPipelineOutput`] with `images` and `scale_indices`, or a tuple.
        """
        # 1. Check inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["f_hat"]
        self.check_inputs(guidance_scale, top_k, top_p, num_images_per_prompt, output_type, image, edit_mask, generator, callback_on_step_end_tensor_inputs, decode_batch_size)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        transformer, vqvae = self.transformer, self.vqvae
        config = transformer.config
        device = self._execution_device
        editing = image is not None
        generator = sampling_generator(generator, device, transformer.dtype)  # half precision: drawn on `device`
        if generator is not None and generator.device.type != device.type and not getattr(self, "_warned_generator_device", False):
            self._warned_generator_device = True
            logger.warning(
                f"The generator is on {generator.device.type} and the pipeline on {device.type}: in {transformer.dtype} "
                f"every scale's random numbers are drawn on {generator.device.type} and copied over (reproducible "
                f"across devices, but slow). For speed pass torch.Generator('{device.type}').manual_seed(seed), "
                f"as upstream's g_seed does, or load the pipeline in bfloat16."
            )

        # 2. Class labels (+ the null class for classifier-free guidance, batch doubled)
        if class_labels is None and editing:
            class_labels = [config.num_classes]
        if class_labels is None:
            class_ids = self._class_ids(None, batch_size or 1, generator)
        else:
            class_ids = self._class_ids(class_labels, None, generator)
            if batch_size is not None and batch_size != class_ids.shape[0]:
                if class_ids.shape[0] != 1:
                    raise ValueError(f"batch_size={batch_size} does not match {class_ids.shape[0]} class labels")
                class_ids = class_ids.expand(batch_size)
        if editing and class_ids.shape[0] == 1:
            num_edit_images = image.shape[0] if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4 else (len(image) if isinstance(image, list) else 1)
            class_ids = class_ids.expand(num_edit_images)
        class_ids = class_ids.repeat_interleave(num_images_per_prompt)
        batch = class_ids.shape[0]
        if editing:
            edit_tokens, keep_mask = self._prepare_edit(image, edit_mask, batch)

        # Model CPU offload (`enable_model_cpu_offload`), once the inputs are checked: the scale loop needs both models
        # and calls their helper methods, not `forward` (which would fire the offload hooks), so both are put on the
        # device here; the vqvae first, as its hook offloads the model before it in `model_cpu_offload_seq`.
        # `maybe_free_model_hooks` offloads them again.
        for module in (vqvae, transformer):
            if getattr(module, "_hf_hook", None) is not None:
                module._hf_hook.pre_forward(module)

        null_ids = torch.full_like(class_ids, config.num_classes)
        class_embeds = transformer.class_embed(torch.cat((class_ids, null_ids)))  # (2B, C)
        condition = transformer.adaln_condition(class_embeds)
        hidden_states = transformer.first_scale_embeds(class_embeds)  # (2B, first_l, C)
        side = config.patch_nums[-1]
        f_hat = torch.zeros(batch, config.latent_channels, side, side, device=device, dtype=torch.float32)
        codebook = vqvae.quantizer.embedding.weight  # (V, Cvae), float32
        num_scales = config.num_scales
        scale_indices: list[torch.LongTensor] = []

        # 3. Scale loop: predict each token map from all coarser ones (static KV cache)
        runner = self._sampling_runner(2 * batch, hidden_states.dtype, device)
        # With the runner, a run that needs no host work between scales is one call (one CUDA graph on CUDA).
        whole_run = runner is not None and not editing and not more_smooth and callback_on_step_end is None
        if runner is None:
            transformer.setup_kv_cache(2 * batch, dtype=hidden_states.dtype, device=device)
            modulations = transformer.block_modulations(condition)  # AdaLN of every block, once for all scales
        else:
            runner.attach()
            runner.set_condition(class_embeds, condition)
        try:
            with self.progress_bar(total=num_scales) as progress_bar:
                if whole_run:
                    scale_indices, f_hat = runner.sample(vqvae, self._guidance_scale, top_k, top_p, generator)
                    progress_bar.update(num_scales)
                else:
                    for si, pn in enumerate(config.patch_nums):
                        if self.interrupt:
                            break
                        ratio = si / (num_scales - 1)
                        if runner is None:
                            logits = transformer.forward_scale(si, hidden_states, condition, class_embeds, modulations)  # (2B, pn², V)
                        else:
                            logits = runner.step(si, hidden_states)  # same, from static buffers / a CUDA graph
                        logits = guided_filtered_logits(logits, si, num_scales, self._guidance_scale, top_k, top_p)  # (B, pn², V)
                        tokens = sample_tokens(logits, generator)  # (B, pn²)
                        scale_indices.append(tokens)
                        if more_smooth:
                            h = gumbel_soft_embedding(logits, ratio, codebook, generator)  # (B, pn², Cvae)
                            h = h.transpose(1, 2).reshape(batch, config.latent_channels, pn, pn)
                        else:
                            h = vqvae.quantizer.lookup(tokens, pn)  # (B, Cvae, pn, pn)
                        if editing:
                            keep = self._mask_at_scale(keep_mask, pn)
                            h = vqvae.quantizer.lookup(edit_tokens[si], pn) * keep + h * (1 - keep)
                        f_hat = vqvae.accumulate_scale(si, f_hat, h)
                        if si < num_scales - 1:
                            next_input = vqvae.next_scale_input(si + 1, f_hat)  # (B, pn_next², Cvae)
                            hidden_states = transformer.next_scale_embeds(si + 1, next_input).repeat(2, 1, 1)

                        if callback_on_step_end is not None:
                            local = {"tokens": tokens, "f_hat": f_hat, "logits": logits}
                            callback_kwargs = {name: local[name] for name in callback_on_step_end_tensor_inputs}
                            callback_outputs = callback_on_step_end(self, si, si, callback_kwargs) or {}
                            f_hat = callback_outputs.get("f_hat", f_hat)
                        progress_bar.update()
        finally:
            transformer.setup_kv_cache(None)

        # 4. Decode the accumulated latent
        chunks = f_hat.split(decode_batch_size) if decode_batch_size else (f_hat,)
        images = torch.cat([vqvae.decode(chunk).sample for chunk in chunks])  # (B, 3, H, W) in [-1, 1]

        # 5. Post-process to [0, 1] (PIL images quantised on the device)
        images = self.image_processor.postprocess(images.float(), output_type="pt" if output_type == "pil" else output_type)
        if output_type == "pil":
            images = images_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, scale_indices
        return VARPipelineOutput(images=images, scale_indices=scale_indices)


__all__ = ["VARPipeline", "VARPipelineOutput", "images_to_pil"]
