"""The fast paths: sync-free token draw, static-buffer/CUDA-graph scale steps, `pipe.compile()`, compiled training blocks,
the compiled decoder's GroupNorm, float8 matmuls.

Independent expectations: `torch.multinomial` (upstream's draw) for the token draw; the plain (eager) pipeline for the
static-buffer runner, which must be bit-identical; a plain convolution for the padded RGB convolution; the eager
model's loss and gradients for compiled training blocks; `F.group_norm` in float64 for the channel-statistics
GroupNorm; the dequantised float64 product for float8 linears.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import var_hf.sampling_var
import var_hf.vq_var
from var_hf import DEFAULT_MODEL, MultiScaleVQModel, VARConfig, VARPipeline, VARTransformer
import var_hf.modeling_var
from var_hf.modeling_var import VARFloat8Linear, var_block_causal_attention, var_block_causal_mask
from var_hf.sampling_var import filter_top_k_top_p_, generator_on_device, sample_tokens, sampling_generator
from var_hf.training_var import compile_transformer_blocks
from var_hf.vq_var import vq_conv_to_rgb, vq_group_norm_channels_last, vq_upsample_conv

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


def test_generator_on_device_is_seeded_by_one_draw_of_the_given_generator():
    given, replica = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    derived = generator_on_device(given, "cpu")
    expected_seed = int(torch.randint(0, 2**63 - 1, (), generator=replica))
    assert torch.equal(given.get_state(), replica.get_state())  # advanced by exactly that one draw
    expected = torch.Generator().manual_seed(expected_seed)
    assert torch.equal(torch.rand(1000, generator=derived), torch.rand(1000, generator=expected))
    again = generator_on_device(torch.Generator().manual_seed(7), "cpu")
    assert again.initial_seed() == derived.initial_seed() == expected_seed  # same seed, same stream
    assert generator_on_device(given, "cpu").initial_seed() != expected_seed  # the next call, a new stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_only_half_precision_draws_on_the_device_from_a_seed(dtype, monkeypatch):
    """Float32 draws from the given generator wherever it lives (a CPU generator reproduces the CPU's samples); half
    precision asks `generator_on_device` for a generator on the pipeline's device (stood in for here: no GPU)."""
    asked = []
    monkeypatch.setattr(var_hf.sampling_var, "generator_on_device", lambda generator, device: asked.append(device) or "device generator")
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    chosen = sampling_generator(generator, torch.device("cuda"), dtype)
    if dtype in (torch.bfloat16, torch.float16):
        assert chosen == "device generator" and asked == [torch.device("cuda")]
    else:
        assert chosen is generator and not asked and torch.equal(generator.get_state(), state)  # nothing drawn from it
    assert sampling_generator(None, torch.device("cuda"), dtype) is None
    assert sampling_generator(generator, torch.device("cpu"), dtype) is generator  # already on the device
    assert sampling_generator(generator, torch.device("meta"), dtype) is generator


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device type without generators: CUDA on a CPU-only build")
def test_a_device_without_generators_keeps_the_given_one():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    with pytest.raises(RuntimeError):
        torch.Generator(device="cuda")
    assert sampling_generator(generator, torch.device("cuda"), torch.bfloat16) is generator
    assert torch.equal(generator.get_state(), state)  # nothing drawn before the failure


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_on_cuda_draws_on_the_gpu_from_a_cpu_generators_seed():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(5)))
    expected = pipe(class_labels=[3, 5], generator=torch.Generator("cuda").manual_seed(seed), output_type="pt")
    _assert_same(_sample(pipe, [3, 5], 5), expected)


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
    settings = [dict(guidance_scale=0.0, top_k=0, top_p=0.0), dict(guidance_scale=4.0, top_k=3, top_p=0.5)]
    eager_settings = [_sample(pipe, [1, 8], 4, **kwargs) for kwargs in settings]

    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
    for (labels, seed), expected in list(eager.items()) * 2:  # batch sizes alternate: the runner is rebuilt
        _assert_same(_sample(pipe, list(labels), seed), expected)
    assert pipe._sampling_graphs.run_settings is not None  # plain runs went through the whole-run sampler
    for kwargs, expected in list(zip(settings, eager_settings)) * 2:  # new sampling settings: new whole-run buffers
        _assert_same(_sample(pipe, [1, 8], 4, **kwargs), expected)
    _assert_same(_sample(pipe, [5, 6], 2, more_smooth=True), eager_smooth)
    _assert_same(_sample(pipe, [7], 3, image=image, edit_mask=mask), eager_edit)
    assert all(layer.attn.kv_cache is None for layer in pipe.transformer.layers)  # caches detached after sampling

    runner = pipe._sampling_graphs
    _sample(pipe, [4], 1)
    assert pipe._sampling_graphs is runner  # same batch, same weights: reused
    head = pipe.transformer.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())  # new storage: captured buffers would be stale
    _assert_same(_sample(pipe, [4], 1), eager[((4,), 1)])
    assert pipe._sampling_graphs is not runner


def test_static_buffers_survive_calls_inside_and_outside_inference_mode():
    """Upstream's demo samples under `torch.inference_mode()`: buffers first allocated there must still take the next
    call's values outside it (and the other way round)."""
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(8, 8)
    mask[:4] = 0
    expected = [_sample(pipe, [1, 2], seed) for seed in (0, 1)]
    expected_edit = _sample(pipe, [3], 2, image=expected[0].images[:1], edit_mask=mask)
    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
    with torch.inference_mode():
        _assert_same(_sample(pipe, [1, 2], 0), expected[0])
    _assert_same(_sample(pipe, [1, 2], 1), expected[1])
    with torch.inference_mode():
        _assert_same(_sample(pipe, [3], 2, image=expected[0].images[:1], edit_mask=mask), expected_edit)
    _assert_same(_sample(pipe, [3], 2, image=expected[0].images[:1], edit_mask=mask), expected_edit)
    _assert_same(_sample(pipe, [1, 2], 0), expected[0])


class ReplayingGraph:
    """Stands in for a CUDA graph on the CPU: `replay()` reruns the captured function and writes its results into the
    outputs of the capture, as a real graph rewrites its static output buffers."""

    def __init__(self, function):
        self.function, self.outputs = function, function()

    def pool(self):
        return id(self)

    def replay(self):
        for static, new in zip(torch.utils._pytree.tree_leaves(self.outputs), torch.utils._pytree.tree_leaves(self.function())):
            static.copy_(new)


def test_cuda_graph_branches_with_a_stand_in_graph(monkeypatch):
    """
    The branches that only run on CUDA — capture once per batch size and settings, copy inputs into static buffers,
    replay, read (and copy out of) static outputs, per-step graphs for editing — run here with `ReplayingGraph`: stale
    inputs, missing copies or outputs overwritten by the next call change the samples, which must stay the plain loop's.
    """
    from var_hf.cuda_graphs_var import VARSamplingGraphs

    captures = []

    def capture(function, pool=None):
        captures.append(ReplayingGraph(function))
        return captures[-1], captures[-1].outputs

    original_init = VARSamplingGraphs.__init__

    def init_with_graphs(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.use_cuda_graphs = True

    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(8, 8)
    mask[2:6, 2:6] = 0
    plain = [_sample(pipe, [3, 5], seed) for seed in (0, 1)]
    edits = [_sample(pipe, [4], seed, image=plain[0].images[:1], edit_mask=mask) for seed in (2, 3)]
    other_settings = _sample(pipe, [3, 5], 1, guidance_scale=3.0, top_k=5)

    monkeypatch.setattr(VARSamplingGraphs, "_capture", staticmethod(capture))
    monkeypatch.setattr(VARSamplingGraphs, "__init__", init_with_graphs)
    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
    first = _sample(pipe, [3, 5], 0)
    _assert_same(_sample(pipe, [3, 5], 1), plain[1])  # a replay with new random numbers
    _assert_same(first, plain[0])  # the first call's tokens were copied out, not left in the static buffers
    assert len(captures) == 1  # the whole run, captured once
    _assert_same(_sample(pipe, [3, 5], 1, guidance_scale=3.0, top_k=5), other_settings)
    assert len(captures) == 2  # new settings: a new capture
    for seed, expected in zip((2, 3), edits):
        _assert_same(_sample(pipe, [4], seed, image=plain[0].images[:1], edit_mask=mask), expected)
    assert len(captures) == 2 + len(pipe.transformer.config.patch_nums)  # editing: one graph per step, captured once


@pytest.mark.parametrize("float8", [False, True])
def test_whole_sampling_run_reads_nothing_on_the_host(float8):
    """
    What a CUDA graph capture of the whole run needs, checked without a GPU: on the meta device (shapes, no data) every
    operation of the run must work, so none reads a value back to the host (`.item()`, `bool(tensor)`, data-dependent
    shapes such as `nonzero` raise there) or mixes in tensors from another device. With float8 matmuls too.
    """
    from var_hf.cuda_graphs_var import VARSamplingGraphs

    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.transformer.set_float8_matmuls(float8)
    assert any(isinstance(module, VARFloat8Linear) for module in pipe.transformer.modules()) == float8
    transformer, vqvae = pipe.transformer.to("meta"), pipe.vqvae.to("meta")
    runner = VARSamplingGraphs(transformer, 4, torch.float32, torch.device("meta"))
    runner.attach()
    class_embeds = transformer.class_embed(torch.tensor([1, 2, 10, 10], device="meta"))  # 2 images + CFG rows
    runner.set_condition(class_embeds, transformer.adaln_condition(class_embeds))
    scale_indices, f_hat = runner.sample(vqvae, 1.5, 900, 0.96)
    patch_nums = transformer.config.patch_nums
    assert [tuple(tokens.shape) for tokens in scale_indices] == [(2, pn * pn) for pn in patch_nums]
    assert f_hat.shape == (2, transformer.config.latent_channels, patch_nums[-1], patch_nums[-1])
    assert f_hat.device.type == "meta"


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


def redraw_at_fan_in_scale(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every weight N(0, 1/fan_in), vectors N(0, 0.01): at initialisation the AdaLN gates (0.001) make every block
    nearly the identity, which would hide the attention from the comparisons."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1))
    return model


def test_block_causal_attention_per_scale_is_the_masked_attention():
    """One unmasked SDPA call per scale == SDPA with the (L, L) block-causal mask: outputs and gradients (float64)."""
    config = VARConfig(depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3, 5), codebook_size=8, latent_channels=4, num_classes=3)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 2, config.seq_len, 16, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3)]
    mask = var_block_causal_mask(config.patch_nums).double()
    results = []
    for attention in (
        lambda q, k, v: var_block_causal_attention(q, k, v, config.scale_ranges, 0.3, 0.0),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
    ):
        out = attention(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        results.append((out, *grads))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared_adaln", [False, True])
def test_sdpa_teacher_forcing_attends_per_scale_without_gradients(monkeypatch, shared_adaln):
    """Teacher-forced logits of an SDPA model run `var_block_causal_attention` without gradients (the masked kernel in
    eager autograd) and equal the eager, masked reference (weights drawn at their fan-in scale)."""
    kwargs = dict(depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 3, 5), codebook_size=32, latent_channels=8,
                  num_classes=5, shared_adaln=shared_adaln)
    sdpa = VARTransformer(VARConfig(**kwargs)).eval()
    eager = VARTransformer(VARConfig(**kwargs, attn_implementation="eager")).eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    generator = torch.Generator().manual_seed(0)
    redraw_at_fan_in_scale(sdpa, generator)
    eager.load_state_dict(sdpa.state_dict())
    calls = []
    original = var_hf.modeling_var.var_block_causal_attention
    monkeypatch.setattr(var_hf.modeling_var, "var_block_causal_attention", lambda *a: calls.append(1) or original(*a))
    labels = torch.tensor([0, 4, 2])
    teacher = torch.randn(3, sdpa.config.seq_len - sdpa.config.first_scale_len, 8, generator=generator)
    with torch.no_grad():
        logits = sdpa(class_labels=labels, teacher_input=teacher).logits
        reference = eager(class_labels=labels, teacher_input=teacher).logits
    assert len(calls) == kwargs["depth"]  # per scale, every block
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    with_gradients = sdpa(class_labels=labels, teacher_input=teacher).logits
    assert len(calls) == kwargs["depth"]  # eager autograd: the masked kernel
    torch.testing.assert_close(with_gradients, reference, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_compiled_training_blocks_give_the_eager_loss_and_gradients(monkeypatch):
    """Compiled blocks (attention per scale, `var_block_causal_attention`) against the eager model (masked attention),
    on weights drawn at their fan-in scale."""
    config = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3), codebook_size=32, latent_channels=8, num_classes=5, drop_path_rate=0.0)
    torch.manual_seed(0)
    eager = redraw_at_fan_in_scale(VARTransformer(config).train(), torch.Generator().manual_seed(0))
    compiled = VARTransformer(config).train()
    compiled.load_state_dict(eager.state_dict())
    compile_transformer_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    calls = []
    original = var_hf.modeling_var.var_block_causal_attention
    monkeypatch.setattr(var_hf.modeling_var, "var_block_causal_attention", lambda *a: calls.append(1) or original(*a))

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
    assert calls  # the compiled blocks traced the per-scale attention; the eager model used the mask
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        scale = p_eager.grad.abs().max()
        assert torch.allclose(p_eager.grad, p_compiled.grad, atol=1e-5 * scale, rtol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_from_channel_statistics_is_group_norm(dtype):
    torch.manual_seed(0)
    # Channel offsets far above the spread: where E[x²] - E[x]² would lose the variance.
    x = (torch.randn(3, 64, 9, 7) * 2 + torch.randn(1, 64, 1, 1) * 30).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64), torch.randn(64)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    expected = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    ours = vq_group_norm_channels_last(x, 32, weight, bias, 1e-6)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: rounding of the output (|y| < 5, 8 bits)
    assert (ours.double() - expected).abs().max() < tolerance
    if dtype == torch.float32:
        assert (ours.double() - expected).abs().max() <= (F.group_norm(x, 32, weight, bias, 1e-6).double() - expected).abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_sub_pixel_upsample_convolution_is_upsample_then_convolution(channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel_size=3, padding=1, bias=bias).double()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)  # not square, odd sides: the borders' zero padding matters
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    expected = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    ours = vq_upsample_conv(conv, x)
    assert ours.shape == expected.shape == (2, 5, 14, 18)
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last  # the next convolution's layout
    assert (ours - expected).abs().max() < 1e-12


@needs_compiler
def test_compiled_channels_last_decoder_uses_its_fast_layers_and_matches_eager(monkeypatch):
    vqvae = MultiScaleVQModel.from_pretrained(f"{DEFAULT_MODEL}/vqvae").eval()
    latent = torch.randn(2, vqvae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vqvae.decoder(latent)  # eager, channels-first: F.group_norm, upsampling then convolution
        calls = []
        for name in ("vq_group_norm_channels_last", "vq_upsample_conv"):
            original = getattr(var_hf.vq_var, name)
            monkeypatch.setattr(var_hf.vq_var, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
        vqvae.decoder.to(memory_format=torch.channels_last)
        assert torch.allclose(vqvae.decoder(latent), expected, atol=1e-5)  # eager channels-last: still the reference
        assert not calls
        compiled = torch.compile(vqvae.decoder.forward)(latent)
    assert set(calls) == {"vq_group_norm_channels_last", "vq_upsample_conv"}  # traced through both
    assert torch.allclose(compiled, expected, atol=1e-4)


def test_float8_linear_is_the_rowwise_scaled_product():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 5).view(1, 5, 1)  # rows of very different magnitudes
    float8 = VARFloat8Linear(linear)
    assert float8.weight is linear.weight and float8.weight_float8.dtype == torch.float8_e4m3fn

    def dequantised(m):  # e4m3 rounding with one scale per row, as documented, in float64
        scale = m.abs().amax(-1, keepdim=True).double() / 448
        return (m.double() / scale).to(torch.float8_e4m3fn).double() * scale

    expected = dequantised(x.reshape(-1, 64)) @ dequantised(linear.weight.detach()).T + linear.bias.double()
    out = float8(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    # _scaled_mm returns bfloat16 (as on GPUs): equal within its rounding, 2^-8 of each row's largest value
    error = (out.reshape(-1, 48).double() - expected).abs()
    assert (error <= 2**-8 * expected.abs().amax(-1, keepdim=True) + 1e-6).all()
    relative = (out - linear(x)).norm() / linear(x).norm()
    assert 0 < relative < 0.1  # float8 is approximate


def test_float8_matmuls_switch_on_and_off_without_touching_the_weights():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = list(pipe.transformer.state_dict())
    plain = _sample(pipe, [1, 2], 0)

    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False, float8=True)
    layer = pipe.transformer.layers[0]
    assert all(isinstance(m, VARFloat8Linear) for m in (layer.attn.qkv_proj, layer.attn.out_proj, layer.mlp.fc1, layer.mlp.fc2))
    assert list(pipe.transformer.state_dict()) == names  # checkpoints unchanged: float8 copies are not saved
    fast = _sample(pipe, [1, 2], 0)
    drawn = torch.cat([s.flatten() for s in fast.scale_indices])
    wanted = torch.cat([s.flatten() for s in plain.scale_indices])
    assert not torch.equal(fast.images, plain.images)  # the float8 path ran
    assert (drawn == wanted).float().mean() >= 0.5  # approximate, yet mostly the same draws on this model

    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False, float8=False)
    assert type(pipe.transformer.layers[0].mlp.fc1) is nn.Linear
    _assert_same(_sample(pipe, [1, 2], 0), plain)  # back to the exact path (the runner was rebuilt)
