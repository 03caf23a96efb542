"""Static-shape transformer steps for fast VAR sampling: one CUDA graph per scale (gpt-fast style).

Every scale of VAR has a fixed token count, so with a static KV cache the transformer step of scale `si` always runs
the same kernels on the same buffers. [`VARScaleGraphs`] preallocates those buffers for one batch size and, on CUDA,
captures each scale's step once; sampling then copies the scale's input in and replays the graph, which removes the
per-kernel launch cost (most of the time at small batches). On other devices it runs the same static-buffer code
eagerly. [`VARPipeline.compile`] turns it on.
"""

from __future__ import annotations

import torch

from .modeling_var import VARTransformer


def transformer_weights_fingerprint(transformer: VARTransformer) -> tuple:
    """Where every parameter (and float8 weight copy) lives: graphs captured on other storage (after `.to()`, reloading,
    switching float8 matmuls) must be rebuilt."""
    weights = list(transformer.parameters())
    weights += [buffer for name, buffer in transformer.named_buffers() if name.endswith("weight_float8")]
    return tuple((w.data_ptr(), w.dtype, w.device) for w in weights)


class VARScaleGraphs:
    """
    Preallocated inputs, KV cache and (on CUDA) per-scale CUDA graphs of [`VARTransformer.forward_scale`] for
    `batch_rows` rows (the CFG-doubled batch).

    Use: `attach()` before a sampling run, `set_condition(class_embeds, condition)` once, then `step(si, hidden)` for
    si = 0, 1, ... in order; the returned logits live in a static buffer that the next run of that scale overwrites.
    """

    def __init__(self, transformer: VARTransformer, batch_rows: int, dtype: torch.dtype, device: torch.device, use_cuda_graphs: bool = True):
        config = transformer.config
        self.transformer = transformer
        self.fingerprint = transformer_weights_fingerprint(transformer)
        self.key = (batch_rows, dtype, torch.device(device))
        transformer.setup_kv_cache(batch_rows, dtype=dtype, device=device)
        self.kv_caches = [layer.attn.kv_cache for layer in transformer.layers]
        hidden = config.hidden_size
        self.class_embeds = torch.zeros(batch_rows, hidden, dtype=dtype, device=device)  # (2B, C)
        self.condition = torch.zeros_like(transformer.adaln_condition(self.class_embeds))  # (2B, C) or (2B, 1, 6, C)
        self.modulations = [torch.zeros_like(m) for m in transformer.block_modulations(self.condition)]  # (2B, 1, 6, C) each
        self.scale_inputs = [torch.zeros(batch_rows, pn * pn, hidden, dtype=dtype, device=device) for pn in config.patch_nums]
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.scale_logits: list[torch.Tensor] | None = None
        if use_cuda_graphs and torch.device(device).type == "cuda":
            self._capture()

    def matches(self, transformer: VARTransformer, batch_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            transformer is self.transformer
            and self.key == (batch_rows, dtype, torch.device(device))
            and self.fingerprint == transformer_weights_fingerprint(transformer)
        )

    def attach(self) -> None:
        """Give the attention layers this object's KV caches (the pipeline removes them after sampling)."""
        for layer, cache in zip(self.transformer.layers, self.kv_caches):
            layer.attn.kv_cache = cache

    def _forward(self, scale_index: int) -> torch.Tensor:
        return self.transformer.forward_scale(
            scale_index, self.scale_inputs[scale_index], self.condition, self.class_embeds, self.modulations
        )

    @torch.no_grad()
    def _capture(self) -> None:
        self.attach()
        num_scales = len(self.scale_inputs)
        # Warm up on a side stream (cuBLAS/cuDNN handles, compiled kernels) before capturing, as CUDA graphs require.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                for si in range(num_scales):
                    self._forward(si)
        torch.cuda.current_stream().wait_stream(stream)
        # Graphs replay in scale order, one at a time, so they can share one memory pool.
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.scale_logits = [], []
        for si in range(num_scales):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(si)  # (2B, pn², V) float32, a static buffer
            self.graphs.append(graph)
            self.scale_logits.append(logits)
        torch.cuda.synchronize()

    def set_condition(self, class_embeds: torch.Tensor, condition: torch.Tensor) -> None:
        self.class_embeds.copy_(class_embeds)
        self.condition.copy_(condition)
        for buffer, modulation in zip(self.modulations, self.transformer.block_modulations(condition)):
            buffer.copy_(modulation)

    def step(self, scale_index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits (2B, pn², V) of scale `scale_index` for its input embeddings (2B, pn², C)."""
        self.scale_inputs[scale_index].copy_(hidden_states)
        if self.graphs is None:
            return self._forward(scale_index)
        self.graphs[scale_index].replay()
        return self.scale_logits[scale_index]


__all__ = ["VARScaleGraphs", "transformer_weights_fingerprint"]
