"""Float32 CPU parity with the upstream FoundationVision/VAR outputs stored in tests/fixtures/golden."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODELS, golden_config, golden_files
from safetensors.torch import load_file

NAMES = list(GOLDEN_MODELS)


def expected(name):
    return load_file(str(golden_files(name)["expected"]))


def expected_tokens(data, prefix, num_scales):
    return [data[f"{prefix}.idx.{k}"] for k in range(num_scales)]


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_encode_decode(golden_pipelines, name):
    pipe, data = golden_pipelines[name], expected(name)
    num_scales = len(golden_config(name)["patch_nums"])
    encoded = pipe.vqvae.encode(data["input.image"])
    for k, (ours, theirs) in enumerate(zip(encoded.scale_indices, expected_tokens(data, "vae", num_scales))):
        assert ours.dtype == torch.long and torch.equal(ours, theirs), f"scale {k} tokens differ"
    assert torch.equal(pipe.vqvae.encode_scales(data["input.image"])[-1], data[f"vae.idx.{num_scales - 1}"])
    torch.testing.assert_close(encoded.f_hat, data["vae.fhat_last"], atol=1e-5, rtol=0)
    decoded = pipe.vqvae.decode_scales(expected_tokens(data, "vae", num_scales))
    torch.testing.assert_close(decoded, data["vae.decode_from_idx"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pipe.vqvae(data["input.image"]).sample, data["vae.recon"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_forcing_input_and_logits(golden_pipelines, name):
    pipe, data = golden_pipelines[name], expected(name)
    num_scales = len(golden_config(name)["patch_nums"])
    teacher = pipe.vqvae.teacher_forcing_input(expected_tokens(data, "vae", num_scales))
    torch.testing.assert_close(teacher, data["var.teacher_input"], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = pipe.transformer(class_labels=data["input.labels"], teacher_input=teacher).logits
    assert logits.dtype == torch.float32 and logits.shape == data["var.logits"].shape
    torch.testing.assert_close(logits, data["var.logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_kv_cached_sampling_loop_matches_teacher_forcing(golden_pipelines, name):
    """The cached scale-by-scale path fed the ground-truth tokens reproduces the teacher-forced logits."""
    pipe, data = golden_pipelines[name], expected(name)
    transformer, vqvae, config = pipe.transformer, pipe.vqvae, pipe.transformer.config
    tokens = expected_tokens(data, "vae", config.num_scales)
    labels = data["input.labels"]
    with torch.no_grad():
        class_embeds = transformer.class_embed(labels)
        condition = transformer.adaln_condition(class_embeds)
        hidden = transformer.first_scale_embeds(class_embeds)
        transformer.setup_kv_cache(labels.shape[0])
        f_hat = torch.zeros(labels.shape[0], config.latent_channels, config.patch_nums[-1], config.patch_nums[-1])
        pieces = []
        for si, pn in enumerate(config.patch_nums):
            pieces.append(transformer.forward_scale(si, hidden, condition, class_embeds))
            f_hat = vqvae.accumulate_scale(si, f_hat, vqvae.quantizer.lookup(tokens[si], pn))
            if si < config.num_scales - 1:
                hidden = transformer.next_scale_embeds(si + 1, vqvae.next_scale_input(si + 1, f_hat))
        transformer.setup_kv_cache(None)
    torch.testing.assert_close(torch.cat(pieces, 1), data["var.logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(f_hat, data["vae.fhat_last"], atol=1e-5, rtol=0)


def sample_and_compare(pipe, data, config, run):
    """One of upstream's recorded sampling runs: same arguments and seed, its tokens and images expected."""
    out = pipe(
        class_labels=data["input.labels"].tolist(),
        guidance_scale=run["cfg"],
        top_k=run["top_k"],
        top_p=run["top_p"],
        more_smooth=run["more_smooth"],
        generator=torch.Generator().manual_seed(run["g_seed"]),
        output_type="pt",
    )
    tag = run["tag"]
    if f"sample.{tag}.idx.0" in data:
        for k, theirs in enumerate(expected_tokens(data, f"sample.{tag}", len(config["patch_nums"]))):
            assert torch.equal(out.scale_indices[k], theirs), f"{tag}: scale {k} tokens differ"
    torch.testing.assert_close(out.images, data[f"sample.{tag}.image"], atol=1e-4, rtol=0)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("run_index", [0, 1, 2])
def test_sampling_runs(golden_pipelines, name, run_index):
    pipe, data, config = golden_pipelines[name], expected(name), golden_config(name)
    run = config["sampling_runs"][run_index]
    out = sample_and_compare(pipe, data, config, run)
    assert out.images.shape == data[f"sample.{run['tag']}.image"].shape
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_static_buffer_sampler_reproduces_upstream(converted_pipelines, name):
    """`pipe.compile()`'s exact part (static KV cache and input buffers, AdaLN once per run) on both AdaLN variants."""
    from var_hf import VARPipeline

    pipe, data, config = VARPipeline.from_pretrained(converted_pipelines[name], dtype=torch.float32), expected(name), golden_config(name)
    pipe.set_progress_bar_config(disable=True)
    pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
    for run in config["sampling_runs"]:
        sample_and_compare(pipe, data, config, run)
    assert pipe._sampling_graphs is not None  # the runner did the work


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("run_index", [0, 1, 2])
def test_edit_runs(golden_pipelines, name, run_index):
    pipe, data, config = golden_pipelines[name], expected(name), golden_config(name)
    run = config["edit_runs"][run_index]
    tag = run["tag"]
    image = (data["input.image"] + 1) / 2
    label = run["label"]
    class_labels = None if label == pipe.transformer.config.num_classes else [label] * image.shape[0]
    out = pipe(
        class_labels=class_labels,
        guidance_scale=run["cfg"],
        top_k=run["top_k"],
        top_p=run["top_p"],
        generator=torch.Generator().manual_seed(run["g_seed"]),
        output_type="pt",
        image=image,
        edit_mask=data[f"edit.{tag}.mask"],
    )
    for k, theirs in enumerate(expected_tokens(data, f"edit.{tag}", len(config["patch_nums"]))):
        assert torch.equal(out.scale_indices[k], theirs), f"{tag}: scale {k} tokens differ"
    torch.testing.assert_close(out.images, data[f"edit.{tag}.image"], atol=1e-4, rtol=0)


# Documented tolerance of the fast dtypes: teacher-forced logits relative to float32 (relative L2 error).
HALF_PRECISION_RELATIVE_ERROR = {torch.bfloat16: 0.02, torch.float16: 0.01}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_stay_close_to_float32(converted_pipelines, name, dtype):
    from var_hf import VARTransformer

    data = expected(name)
    model = VARTransformer.from_pretrained(converted_pipelines[name] / "transformer", dtype=dtype).eval()
    assert model.dtype == dtype
    with torch.no_grad():
        logits = model(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"]).logits
    assert logits.dtype == torch.float32
    relative = (logits - data["var.logits"]).norm() / data["var.logits"].norm()
    assert 0 < relative < HALF_PRECISION_RELATIVE_ERROR[dtype], float(relative)


FLOAT8_RELATIVE_ERROR = 0.05  # documented in VARTransformer.set_float8_matmuls


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_matmul_logits_stay_close_to_float32(converted_pipelines, name, dtype):
    from var_hf import VARTransformer

    data = expected(name)
    model = VARTransformer.from_pretrained(converted_pipelines[name] / "transformer", dtype=dtype).eval()
    model.set_float8_matmuls(True)
    with torch.no_grad():
        logits = model(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"]).logits
    relative = (logits - data["var.logits"]).norm() / data["var.logits"].norm()
    assert 0 < relative < FLOAT8_RELATIVE_ERROR, float(relative)
