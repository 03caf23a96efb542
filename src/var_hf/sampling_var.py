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


def guided_filtered_logits(logits: torch.Tensor, scale_index: int, num_scales: int, guidance_scale: float, top_k: int, top_p: float) -> torch.Tensor:
    """One scale's (2B, l, V) logits -> guided, top-k/top-p filtered logits (B, l, V): what the token draw samples from."""
    guided = apply_guidance(logits, guidance_weight(guidance_scale, scale_index, num_scales))
    return filter_top_k_top_p_(guided, top_k=top_k, top_p=top_p)


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
        sorted_remove[..., -1:].fill_(False)
        logits.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits


def draw_exponential_(noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Fill `noise` with Exp(1) draws, in place: the numbers `torch.empty(noise.shape).exponential_(1, generator=generator)`
    gives on the generator's device (its random stream is device specific), copied over when that is another device.
    """
    if generator is not None and generator.device.type != noise.device.type:
        drawn = torch.empty(noise.shape, dtype=noise.dtype, device=generator.device).exponential_(1, generator=generator)
        return noise.copy_(drawn)
    return noise.exponential_(1, generator=generator)


def generator_on_device(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """
    A generator on `device` seeded with one 64-bit number drawn from `generator` (which advances by that one draw): the
    same seeded `generator` gives the same stream on `device`, without drawing the run's random numbers on its own device.
    """
    device_generator = torch.Generator(device=device)  # first: where this fails, `generator` is left untouched
    return device_generator.manual_seed(int(torch.randint(0, 2**63 - 1, (), generator=generator, device=generator.device)))


def sampling_generator(generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Generator | None:
    """
    The generator a sampling run on `device` in `dtype` draws from. Float32 (reference mode) keeps the given one, even
    on another device: a CPU generator then gives the CPU's random numbers anywhere (B·L·V of them per run, seconds on
    a CPU at batch 64). In half precision, where tokens are not the reference's anyway, a generator on another device is
    replaced by [`generator_on_device`] (fast; reproducible per seed, dtype and device model — GPU random kernels are
    sized by the card). Devices without generators of their own keep the given one.
    """
    device = torch.device(device)
    if generator is None or generator.device.type == device.type or device.type == "meta":
        return generator
    if dtype in (torch.bfloat16, torch.float16):
        try:
            return generator_on_device(generator, device)
        except RuntimeError:  # no generator on this device type (e.g. some out-of-tree backends)
            return generator
    return generator


def sample_tokens_with_noise(logits: torch.Tensor, noise: torch.Tensor) -> torch.LongTensor:
    """(B, l, V) logits and Exp(1) noise (B·l, V) -> tokens argmax(softmax(logits) / noise), (B, l): a categorical draw."""
    batch, length, vocab = logits.shape
    probs = logits.softmax(dim=-1).view(-1, vocab)  # (B·l, V)
    return probs.div_(noise).argmax(dim=-1).view(batch, length)


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """
    One token per position from softmax(logits) (B, l, V) -> (B, l).

    Exactly what `torch.multinomial(probs, 1, replacement=True, generator=generator)` (upstream's draw) computes and
    how it consumes the generator: argmax(probs / q) with q ~ Exp(1) drawn by `exponential_` over probs' shape. Written
    out because `multinomial` first checks the probabilities on the host, a device sync at every scale.
    """
    batch, length, vocab = logits.shape
    noise = draw_exponential_(torch.empty(batch * length, vocab, dtype=logits.dtype, device=logits.device), generator)
    return sample_tokens_with_noise(logits, noise)


def gumbel_soft_embedding(
    filtered_logits: torch.Tensor,  # (B, l, V), -inf outside the kept set
    ratio: float,  # si / (K - 1)
    codebook: torch.Tensor,  # (V, Cvae)
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`more_smooth`: softmax((logits·(1 + r) + Gumbel) / tau) mixture of codebook vectors, (B, l, Cvae)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    logits = filtered_logits.mul(1 + ratio)
    exponential = draw_exponential_(torch.empty_like(logits, memory_format=torch.legacy_contiguous_format), generator)
    soft = ((logits - exponential.log()) / tau).softmax(dim=-1)
    return soft @ codebook.unsqueeze(0)


__all__ = [
    "guidance_weight", "apply_guidance", "guided_filtered_logits", "filter_top_k_top_p_", "draw_exponential_", "generator_on_device", "sampling_generator",
    "sample_tokens_with_noise", "sample_tokens", "gumbel_soft_embedding",
]
