"""The fast paths: sync-free token draw, static-buffer/CUDA-graph scale steps, `pipe.compile()`, compiled training blocks.

Independent expectations: `torch.multinomial` (upstream's draw) for the token draw; the plain (eager) pipeline for the
static-buffer runner, which must be bit-identical; a plain convolution for the padded RGB convolution; the eager
model's loss and gradients for compiled training blocks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from var_hf import DEFAULT_MODEL, VARConfig, VARPipeline, VARTransformer
from var_hf.sampling_var import filter_top_k_top_p_, sample_tokens
from var_hf.training_var import compile_transformer_blocks
from var_hf.vq_var import vq_conv_to_rgb

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")


@pytest.mark.parametrize("seed", range(6))
def test_sample_tokens_draws_what_multinomial_draws(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = 1 + seed % 3, (1, 9, 64)[seed % 3], (16, 4096)[seed % 2]
    logits = torch.randn(batch, length, vocab, generator=generator) * (1 + seed)
    filter_top_k_top_p_(logits, top_k=(5, 900, 0)[seed % 3], top_p=(0.96, 0.0)[seed % 2])
    first, second = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(100 + seed)
    expected = torch.multinomial(logits.softmax(-1).view(-1, vocab), 1, replacement=True, generator=first).view(batch, length)
    drawn = sample_tokens(logits.clone(), second)
    assert torch.equal(drawn, expected)
    assert torch.equal(first.get_state(), second.get_state())  # the generator moved on exactly as upstream's did
    assert torch.isfinite(logits.gather(-1, drawn.unsqueeze(-1))).all()  # never a filtered-out token


@pytest.fixture(scope="module")
def default_pipe():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, labels, seed, **kwargs):
    return pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)


def _assert_same(first, second):
    assert all(torch.equal(a, b) for a, b in zip(first.scale_indices, second.scale_indices))
    assert torch.equal(first.images, second.images)


def test_static_scale_runner_is_bit_identical_to_eager():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    eager = {(labels, seed): _sample(pipe, list(labels), seed) for labels, seed in [((1, 2, 3), 0), ((4,), 1)]}
    eager_smooth = _sample(pipe, [5, 6], 2, more_smooth=True)
    image = eager[((1, 2, 3), 0)].images[:1]
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    eager_edit = _sample(pipe, [7], 3, image=image, edit_mask=mask)

    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
    for (labels, seed), expected in list(eager.items()) * 2:  # batch sizes alternate: the runner is rebuilt
        _assert_same(_sample(pipe, list(labels), seed), expected)
    _assert_same(_sample(pipe, [5, 6], 2, more_smooth=True), eager_smooth)
    _assert_same(_sample(pipe, [7], 3, image=image, edit_mask=mask), eager_edit)
    assert all(layer.attn.kv_cache is None for layer in pipe.transformer.layers)  # caches detached after sampling

    runner = pipe._scale_graphs
    _sample(pipe, [4], 1)
    assert pipe._scale_graphs is runner  # same batch, same weights: reused
    head = pipe.transformer.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())  # new storage: captured buffers would be stale
    _assert_same(_sample(pipe, [4], 1), eager[((4,), 1)])
    assert pipe._scale_graphs is not runner


@needs_compiler
def test_compile_matches_eager_and_serves_new_batch_sizes():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = [_sample(pipe, [0, 3, 8], 0), _sample(pipe, [9, 9], 1)]
    pipe.compile()
    for reference, labels, seed in zip(expected, ([0, 3, 8], [9, 9]), (0, 1)):
        out = _sample(pipe, labels, seed)
        drawn = torch.cat([s.flatten() for s in out.scale_indices])
        wanted = torch.cat([s.flatten() for s in reference.scale_indices])
        # Fused kernels round differently; in float32 the draws still agree (all of them on this model).
        assert (drawn == wanted).float().mean() >= 0.98
        if torch.equal(drawn, wanted):
            assert torch.allclose(out.images, reference.images, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_rgb_convolution_matches_the_plain_one(dtype, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 3, kernel_size=3, padding=1).to(dtype)
    h = torch.randn(2, 16, 12, 12, dtype=dtype)
    if channels_last:
        conv, h = conv.to(memory_format=torch.channels_last), h.contiguous(memory_format=torch.channels_last)
    padded = vq_conv_to_rgb(conv, h, pad_channels=True)
    plain = conv(h)
    assert padded.shape == plain.shape == (2, 3, 12, 12)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(padded.float(), plain.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(vq_conv_to_rgb(conv, h), plain)  # on the CPU the plain convolution is used


@needs_compiler
def test_compiled_training_blocks_give_the_eager_loss_and_gradients():
    config = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3), codebook_size=32, latent_channels=8, num_classes=5, drop_path_rate=0.0)
    torch.manual_seed(0)
    eager = VARTransformer(config).train()
    compiled = VARTransformer(config).train()
    compiled.load_state_dict(eager.state_dict())
    compile_transformer_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names

    labels = torch.tensor([0, 4, 2])
    teacher = torch.randn(3, config.seq_len - config.first_scale_len, config.latent_channels)
    targets = torch.randint(0, config.codebook_size, (3, config.seq_len))
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same label dropout draws
        logits = model(class_labels=labels, teacher_input=teacher).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p_eager.grad, p_compiled.grad, atol=1e-5, rtol=1e-4), name
