"""Static-shape VAR sampling: a whole sampling run as one CUDA graph (gpt-fast style), or one graph per scale.

Every scale of VAR has a fixed token count, so with a static KV cache a sampling run for a given batch size always runs
the same kernels on the same buffers: the transformer step of each scale, guidance, top-k/top-p filtering, the token
draw, the codebook lookup and the latent accumulation. [`VARSamplingGraphs`] preallocates those buffers for one batch size
and, on CUDA, captures the whole run once; a call then draws the run's random numbers into static buffers (the same
numbers, in the same order, as the scale-by-scale loop draws them), replays one graph, and reads the tokens and the
latent back — no kernel launches from Python and no host work between scales. Runs that need the host between scales
(editing, `more_smooth`, step callbacks) use one captured graph per transformer step instead. On other devices the
same static-buffer code runs eagerly. [`VARPipeline.compile`] turns it on.
"""

from __future__ import annotations

import torch
from diffusers.utils import logging

from .modeling_var import VARTransformer
from .sampling_var import draw_exponential_, guided_filtered_logits, sample_tokens_with_noise

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


def weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Where every parameter (and float8 weight copy) lives: graphs captured on other storage (after `.to()`, reloading,
    switching float8 matmuls) must be rebuilt."""
    weights = list(module.parameters())
    weights += [buffer for name, buffer in module.named_buffers() if name.endswith("weight_float8")]
    return tuple((w.data_ptr(), w.dtype, w.device) for w in weights)


class VARSamplingGraphs:
    """
    Preallocated condition buffers and KV cache of [`VARTransformer`] for `batch_rows` rows (the CFG-doubled batch),
    and (on CUDA) the captured graphs.

    Use: `attach()` before a sampling run and `set_condition(class_embeds, condition)` once; then either
    `sample(vqvae, guidance_scale, top_k, top_p, generator)` for the whole run, or `step(si, hidden)` for
    si = 0, 1, ... in order (the logits it returns live in a static buffer that the next run of that scale overwrites).
    """

    def __init__(self, transformer: VARTransformer, batch_rows: int, dtype: torch.dtype, device: torch.device, use_cuda_graphs: bool = True):
        config = transformer.config
        self.transformer = transformer
        self.fingerprint = weights_fingerprint(transformer)
        self.batch_rows, self.dtype, self.device = batch_rows, dtype, torch.device(device)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        # Buffers written by later calls are normal tensors even when the first call runs under `torch.inference_mode()`
        # (an inference tensor cannot be updated in place outside it).
        with torch.inference_mode(False), torch.no_grad():
            transformer.setup_kv_cache(batch_rows, dtype=dtype, device=device)
            self.kv_caches = [layer.attn.kv_cache for layer in transformer.layers]
            self.class_embeds = torch.zeros(batch_rows, config.hidden_size, dtype=dtype, device=device)  # (2B, C)
            self.condition = torch.zeros_like(transformer.adaln_condition(self.class_embeds))  # (2B, C) or (2B, 1, 6, C)
            self.modulations = [torch.zeros_like(m) for m in transformer.block_modulations(self.condition)]  # (2B, 1, 6, C) each
        # One graph per transformer step (captured on the first `step`), with its static inputs and logits.
        self.scale_inputs: list[torch.Tensor] | None = None
        self.scale_graphs: list[torch.cuda.CUDAGraph] | None = None
        self.scale_logits: list[torch.Tensor] | None = None
        # The whole run (set up on the first `sample` with given settings).
        self.run_settings: tuple | None = None
        self.vqvae = None
        self.noise: list[torch.Tensor] | None = None
        self.run_graph: torch.cuda.CUDAGraph | None = None
        self.run_outputs: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def matches(self, transformer: VARTransformer, batch_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            transformer is self.transformer
            and (self.batch_rows, self.dtype, self.device) == (batch_rows, dtype, torch.device(device))
            and self.fingerprint == weights_fingerprint(transformer)
        )

    def attach(self) -> None:
        """Give the attention layers this object's KV caches (the pipeline removes them after sampling)."""
        for layer, cache in zip(self.transformer.layers, self.kv_caches):
            layer.attn.kv_cache = cache

    def set_condition(self, class_embeds: torch.Tensor, condition: torch.Tensor) -> None:
        self.class_embeds.copy_(class_embeds)
        self.condition.copy_(condition)
        for buffer, modulation in zip(self.modulations, self.transformer.block_modulations(condition)):
            buffer.copy_(modulation)

    def _forward(self, scale_index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.transformer.forward_scale(scale_index, hidden_states, self.condition, self.class_embeds, self.modulations)

    @staticmethod
    def _capture(function, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
        """Warm `function` up on a side stream (cuBLAS/cuDNN handles, compiled kernels), then capture it as one graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                function()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = function()
        torch.cuda.synchronize()
        return graph, outputs

    # ------------------------------------------------------------------------------------------------ one step at a time
    @torch.no_grad()
    def _capture_steps(self) -> None:
        config = self.transformer.config
        with torch.inference_mode(False), torch.no_grad():  # written by every later call (see __init__)
            self.scale_inputs = [
                torch.zeros(self.batch_rows, pn * pn, config.hidden_size, dtype=self.dtype, device=self.device) for pn in config.patch_nums
            ]
        self.attach()
        graphs, logits = [], []
        for si, inputs in enumerate(self.scale_inputs):
            # The steps replay one at a time, so they share the first one's memory pool.
            pool = graphs[0].pool() if graphs else None
            graph, scale_logits = self._capture(lambda si=si, inputs=inputs: self._forward(si, inputs), pool)
            graphs.append(graph)
            logits.append(scale_logits)  # (2B, pn², V) float32, a static buffer
        self.scale_graphs, self.scale_logits = graphs, logits

    def step(self, scale_index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits (2B, pn², V) of scale `scale_index` for its input embeddings (2B, pn², C)."""
        if not self.use_cuda_graphs:
            return self._forward(scale_index, hidden_states)
        if self.scale_graphs is None:
            self._capture_steps()  # its warm-up scribbles on the KV cache; every replay rewrites its own scale's part
        self.scale_inputs[scale_index].copy_(hidden_states)
        self.scale_graphs[scale_index].replay()
        return self.scale_logits[scale_index]

    # ------------------------------------------------------------------------------------------------------ whole run
    def _run_all_scales(self) -> tuple[list[torch.LongTensor], torch.Tensor]:
        """The scale loop from the static buffers: nothing here reads a value on the host, so it can be captured."""
        transformer, vqvae = self.transformer, self.vqvae
        config = transformer.config
        guidance_scale, top_k, top_p = self.run_settings[:3]
        batch, side = self.batch_rows // 2, config.patch_nums[-1]
        hidden_states = transformer.first_scale_embeds(self.class_embeds)  # (2B, first_l, C)
        f_hat = torch.zeros(batch, config.latent_channels, side, side, dtype=torch.float32, device=self.device)
        scale_indices = []
        for si, pn in enumerate(config.patch_nums):
            logits = self._forward(si, hidden_states)  # (2B, pn², V)
            logits = guided_filtered_logits(logits, si, config.num_scales, guidance_scale, top_k, top_p)  # (B, pn², V)
            tokens = sample_tokens_with_noise(logits, self.noise[si])  # (B, pn²)
            scale_indices.append(tokens)
            f_hat = vqvae.accumulate_scale(si, f_hat, vqvae.quantizer.lookup(tokens, pn))
            if si < config.num_scales - 1:
                next_input = vqvae.next_scale_input(si + 1, f_hat)  # (B, pn_next², Cvae)
                hidden_states = transformer.next_scale_embeds(si + 1, next_input).repeat(2, 1, 1)
        return scale_indices, f_hat

    @torch.no_grad()
    def sample(self, vqvae, guidance_scale: float, top_k: int, top_p: float, generator: torch.Generator | None = None) -> tuple[list[torch.LongTensor], torch.Tensor]:
        """
        A whole sampling run for the condition set by `set_condition`: (tokens of every scale, each (B, pn²), and the
        accumulated latent f_hat (B, Cvae, pn_K, pn_K)). The random numbers are drawn first, scale by scale, exactly as
        the scale loop draws them, so the tokens are the scale loop's.
        """
        config = self.transformer.config
        settings = (float(guidance_scale), int(top_k), float(top_p), vqvae, weights_fingerprint(vqvae.quantizer))
        if settings != self.run_settings:  # new settings or tokenizer weights: recapture
            self.run_graph = self.run_outputs = None
            self.run_settings, self.vqvae = settings, vqvae
        if self.noise is None:  # Exp(1) noise of every scale's draw, (B·pn², V) float32 each
            vocab, batch = config.codebook_size, self.batch_rows // 2
            with torch.inference_mode(False), torch.no_grad():  # written by every later call (see __init__)
                self.noise = [torch.empty(batch * pn * pn, vocab, dtype=torch.float32, device=self.device) for pn in config.patch_nums]
        for noise in self.noise:
            draw_exponential_(noise, generator)
        if not self.use_cuda_graphs:
            return self._run_all_scales()
        if self.run_graph is None:
            self.attach()
            try:
                self.run_graph, self.run_outputs = self._capture(self._run_all_scales)
            except RuntimeError as error:  # an operation that cannot be captured: same results, without the graph
                logger.warning(f"Capturing the sampling run as one CUDA graph failed, running it without ({error})")
                self.use_cuda_graphs = False
                return self._run_all_scales()
        self.run_graph.replay()
        scale_indices, f_hat = self.run_outputs
        return [tokens.clone() for tokens in scale_indices], f_hat.clone()


__all__ = ["VARSamplingGraphs", "weights_fingerprint"]
