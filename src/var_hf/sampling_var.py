"""Small pure sampling functions of VAR, each consuming the generator exactly as upstream does."""

from __future__ import annotations

import torch


def guidance_weight(guidance_scale: float, scale_index: int, num_scales: int) -> float:
    """VAR's ramped classifier-free guidance t = cfg · si / (K - 1): 0 at the first scale, cfg at the last."""
    return guidance_scale * scale_index / (num_scales - 1)


def apply_guidance(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """(2B, l, V) logits, conditional half first -> (1 + t)·cond - t·uncond, (B, l, V)."""
    batch = logits.shape[0] // 2
    return (1 + guidance) * logits[:batch] - guidance * logits[batch:]


def filter_top_k_top_p_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """
    In place, on (B, l, V) logits: top-k keeps values >= the k-th largest (ties kept); top-p sorts ascending and drops
    entries whose cumulative probability is <= 1 - top_p, never the largest. 0 disables either filter.
    """
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        threshold = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < threshold, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """
    One token per position from softmax(logits) (B, l, V) -> (B, l).

    Exactly what `torch.multinomial(probs, 1, replacement=True, generator=generator)` (upstream's draw) computes and
    how it consumes the generator: argmax(probs / q) with q ~ Exp(1) drawn by `exponential_` over probs' shape. Written
    out because `multinomial` first checks the probabilities on the host, a device sync at every scale.
    """
    batch, length, vocab = logits.shape
    probs = logits.softmax(dim=-1).view(-1, vocab)  # (B·l, V)
    # The generator's device decides where the random numbers are drawn (its stream is device specific).
    draw_device = generator.device if generator is not None else probs.device
    exponential = torch.empty(probs.shape, dtype=probs.dtype, device=draw_device).exponential_(1, generator=generator)
    return probs.div_(exponential.to(probs.device)).argmax(dim=-1).view(batch, length)


def gumbel_soft_embedding(
    filtered_logits: torch.Tensor,  # (B, l, V), -inf outside the kept set
    ratio: float,  # si / (K - 1)
    codebook: torch.Tensor,  # (V, Cvae)
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`more_smooth`: softmax((logits·(1 + r) + Gumbel) / tau) mixture of codebook vectors, (B, l, Cvae)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    logits = filtered_logits.mul(1 + ratio)
    if generator is not None and generator.device.type != logits.device.type:
        exponential = torch.empty_like(logits, device=generator.device).exponential_(generator=generator).to(logits.device)
    else:
        exponential = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator)
    soft = ((logits - exponential.log()) / tau).softmax(dim=-1)
    return soft @ codebook.unsqueeze(0)


__all__ = ["guidance_weight", "apply_guidance", "filter_top_k_top_p_", "sample_tokens", "gumbel_soft_embedding"]
