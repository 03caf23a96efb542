"""Public API behaviour: labels, argument errors, output types, batching, callbacks, save/load round trips."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import golden_files
from safetensors.torch import load_file

from diffusers.image_processor import VaeImageProcessor
from var_hf import DEFAULT_MODEL, MultiScaleVQModel, VARConfig, VARPipeline, VARTransformer
from var_hf.pipeline_var import images_to_pil

NAME = "var_tiny_64"


@pytest.fixture(scope="module")
def pipe(golden_pipelines):
    return golden_pipelines[NAME]


def sample(pipe, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("top_k", 50)
    kwargs.setdefault("top_p", 0.9)
    return pipe(**kwargs)


def test_output_types_agree(pipe):
    pt = sample(pipe, class_labels=[1, 2], output_type="pt")
    np_images = sample(pipe, class_labels=[1, 2], output_type="np").images
    pil = sample(pipe, class_labels=[1, 2], output_type="pil").images
    assert pt.images.shape == (2, 3, 64, 64)
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(np_images, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert all(isinstance(im, PIL.Image.Image) and im.size == (64, 64) for im in pil)
    # quantised on the device exactly as diffusers' numpy_to_pil does on the host (nearest level)
    for ours, theirs in zip(pil, VaeImageProcessor.numpy_to_pil(np_images)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert [t.shape for t in pt.scale_indices] == [(2, pn * pn) for pn in (1, 2, 3, 4)]
    images, tokens = sample(pipe, class_labels=[1, 2], output_type="pt", return_dict=False)
    torch.testing.assert_close(images, pt.images, atol=0, rtol=0)


def test_chunked_decoding_gives_the_same_images(pipe):
    whole = sample(pipe, class_labels=[1, 2, 3], output_type="pt")
    chunked = sample(pipe, class_labels=[1, 2, 3], output_type="pt", decode_batch_size=2)
    torch.testing.assert_close(chunked.images, whole.images, atol=1e-5, rtol=0)  # batch-size dependent kernels
    with pytest.raises(ValueError, match="decode_batch_size"):
        sample(pipe, class_labels=[1], decode_batch_size=0)


def test_same_seed_same_images_and_seed_matters(pipe):
    a = sample(pipe, class_labels=[3, 4], output_type="pt")
    b = sample(pipe, class_labels=[3, 4], output_type="pt")
    c = sample(pipe, class_labels=[3, 4], output_type="pt", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images)
    assert not all(torch.equal(x, y) for x, y in zip(a.scale_indices, c.scale_indices))


def test_num_images_per_prompt_repeats_labels(pipe):
    out = sample(pipe, class_labels=[5, 6], num_images_per_prompt=3, output_type="pt")
    assert out.images.shape[0] == 6
    same = sample(pipe, class_labels=[5, 5, 5, 6, 6, 6], output_type="pt")
    assert torch.equal(out.images, same.images)


def test_class_names_and_ids(pipe):
    by_name = sample(pipe, class_labels=["7", 7], output_type="pt")
    by_id = sample(pipe, class_labels=[7, 7], output_type="pt")
    assert torch.equal(by_name.images, by_id.images)
    assert pipe.get_label_ids("3") == [3]


def test_images_to_pil_quantises_as_diffusers():
    generator = torch.Generator().manual_seed(0)
    halves = torch.arange(511, dtype=torch.float32) / 510  # x·255 on (and beside) every half level: ties round to even
    images = torch.cat([torch.rand(3 * 64 * 64 - 511, generator=generator), halves]).reshape(1, 3, 64, 64)
    images = torch.cat([images, images.flip(-1).clamp(0, 1)])
    expected = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    for ours, theirs in zip(images_to_pil(images), expected, strict=True):
        assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size == (64, 64)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_imagenet_names_split_on_commas():
    labels = json.loads((__import__("pathlib").Path(__import__("var_hf").__file__).parent / "imagenet_labels.json").read_text())
    assert len(labels) == 1000 and labels["1"].startswith("goldfish") and labels["207"] == "golden retriever"


def test_random_labels_drawn_from_generator(pipe):
    a = sample(pipe, class_labels=None, batch_size=3, output_type="pt")
    b = sample(pipe, class_labels=None, batch_size=3, output_type="pt")
    assert a.images.shape[0] == 3 and torch.equal(a.images, b.images)


def test_null_class_is_unconditional_and_guidance_has_no_effect(pipe):
    null = pipe.transformer.config.num_classes
    a = sample(pipe, class_labels=[null], guidance_scale=0.0, output_type="pt")
    b = sample(pipe, class_labels=[null], guidance_scale=5.0, output_type="pt")
    assert all(torch.equal(x, y) for x, y in zip(a.scale_indices, b.scale_indices))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [11]}, "outside"),
        ({"class_labels": [-1]}, "outside"),
        ({"class_labels": ["no such class"]}, "unknown class"),
        ({"class_labels": [1], "guidance_scale": -0.5}, "guidance_scale"),
        ({"class_labels": [1], "top_p": 1.5}, "top_p"),
        ({"class_labels": [1], "top_p": -0.1}, "top_p"),
        ({"class_labels": [1], "top_k": -3}, "top_k"),
        ({"class_labels": [1], "output_type": "latent"}, "output_type"),
        ({"class_labels": [1], "num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"class_labels": [1], "generator": [torch.Generator()]}, "generator"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 64, 64)}, "edit_mask"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 32, 32), "edit_mask": torch.ones(4, 4)}, "resolution"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 64, 64), "edit_mask": torch.ones(4, 5)}, "square"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 64, 64), "edit_mask": torch.full((4, 4), 2.0)}, r"\[0, 1\]"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 64, 64) * 3, "edit_mask": torch.ones(4, 4)}, r"\[0, 1\]"),
        ({"class_labels": [1], "image": torch.rand(1, 3, 64, 64), "edit_mask": torch.ones(3, 4, 4)}, "edit_mask"),
        ({"class_labels": [1], "callback_on_step_end_tensor_inputs": ["nope"]}, "callback"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_top_k_larger_than_vocabulary_keeps_everything(pipe):
    a = pipe(class_labels=[1], top_k=900, top_p=0.0, generator=torch.Generator().manual_seed(3), output_type="pt")
    b = pipe(class_labels=[1], top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert torch.equal(a.images, b.images)


def test_callback_sees_every_scale_and_can_interrupt(pipe):
    seen = []

    tokens_seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, tuple(kwargs["f_hat"].shape), tuple(kwargs["logits"].shape)))
        tokens_seen.append(kwargs["tokens"].clone())
        return {}

    out = sample(pipe, class_labels=[1], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["tokens", "f_hat", "logits"])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[-1][1] == (1, 8, 4, 4) and seen[-1][2] == (1, 16, 256)
    assert all(torch.equal(a, b) for a, b in zip(tokens_seen, out.scale_indices, strict=True))  # each scale's draw

    def stop(p, step, timestep, kwargs):
        p._interrupt = True
        return {}

    out = sample(pipe, class_labels=[1], callback_on_step_end=stop, output_type="pt")
    assert len(out.scale_indices) == 1


def test_kv_cache_is_released_after_sampling(pipe):
    sample(pipe, class_labels=[1])
    assert all(layer.attn.kv_cache is None for layer in pipe.transformer.layers)


def test_save_pretrained_round_trip_is_safetensors_only(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    files = sorted(p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["var_hf.modeling_var", "VARTransformer"]
    assert index["id2label"]["3"] == "3"
    again = VARPipeline.from_pretrained(tmp_path / "saved")
    for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert again.id2label == pipe.id2label
    out_a = sample(pipe, class_labels=[2], output_type="pt")
    out_b = sample(again, class_labels=[2], output_type="pt")
    assert torch.equal(out_a.images, out_b.images)


def test_components_round_trip_alone(pipe, tmp_path):
    pipe.transformer.save_pretrained(tmp_path / "t")
    pipe.vqvae.save_pretrained(tmp_path / "v")
    transformer = VARTransformer.from_pretrained(tmp_path / "t")
    vqvae = MultiScaleVQModel.from_pretrained(tmp_path / "v")
    assert transformer.config.to_dict() == pipe.transformer.config.to_dict() or transformer.config.patch_nums == pipe.transformer.config.patch_nums
    assert vqvae.config.phi_index_per_scale == [0, 1, 2, 3]
    from transformers import AutoConfig, AutoModel

    assert isinstance(AutoModel.from_pretrained(tmp_path / "t"), VARTransformer)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "t"), VARConfig)


def test_dtype_argument_casts_the_transformer(converted_pipelines):
    pipe = VARPipeline.from_pretrained(converted_pipelines[NAME], dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vqvae.quantizer.embedding.weight.dtype == torch.float32  # the codebook stays float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_a_loaded_pipeline_equals_loading_in_that_dtype(converted_pipelines, dtype):
    """`pipe.to(dtype)` (as diffusers users write it) keeps the quantizer in float32 exactly as `from_pretrained(dtype=)`:
    same weights bit for bit, same samples; and the model still moves (meta) and casts back."""
    loaded = VARPipeline.from_pretrained(converted_pipelines[NAME], dtype=dtype)
    cast = VARPipeline.from_pretrained(converted_pipelines[NAME], dtype=torch.float32).to(dtype)
    for name in ("transformer", "vqvae"):
        expected, got = getattr(loaded, name).state_dict(), getattr(cast, name).state_dict()
        assert all(expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]) for key in expected), name
    assert cast.vqvae.quantizer.embedding.weight.dtype == torch.float32 and cast.vqvae.decoder.conv_out.weight.dtype == dtype
    for candidate in (loaded, cast):
        candidate.set_progress_bar_config(disable=True)
    a, b = (sample(p, class_labels=[1, 3], output_type="pt") for p in (loaded, cast))
    assert all(torch.equal(x, y) for x, y in zip(a.scale_indices, b.scale_indices)) and torch.equal(a.images, b.images)
    assert cast.vqvae.double().quantizer.embedding.weight.dtype == torch.float64  # wider types are not held back
    assert cast.vqvae.to("meta").quantizer.embedding.weight.device.type == "meta"


def test_loading_without_dtype_is_float32_whatever_was_saved(converted_pipelines, tmp_path):
    VARPipeline.from_pretrained(converted_pipelines[NAME], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = VARPipeline.from_pretrained(tmp_path / "bf16")
    assert loaded.transformer.dtype == torch.float32 and loaded.vqvae.decoder.conv_out.weight.dtype == torch.float32


def test_components_of_the_wrong_class_are_refused(pipe):
    with pytest.raises(TypeError, match="transformer must be a VARTransformer"):
        VARPipeline(transformer=pipe.vqvae, vqvae=pipe.vqvae)
    with pytest.raises(TypeError, match="vqvae must be a MultiScaleVQModel"):
        VARPipeline(transformer=pipe.transformer, vqvae=pipe.transformer)
    assert VARPipeline(transformer=torch.compile(pipe.transformer), vqvae=pipe.vqvae).transformer is not None  # compiled: fine


def test_model_cpu_offload_puts_both_models_on_the_device_for_the_scale_loop(converted_pipelines, monkeypatch):
    """The loop calls helper methods, not `forward`: the pipeline fires both offload hooks itself (CPU stands in for
    the GPU here, so the check is that the hooks run, vqvae first, and the samples stay the same)."""
    reference = VARPipeline.from_pretrained(converted_pipelines[NAME])
    reference.set_progress_bar_config(disable=True)
    expected = sample(reference, class_labels=[1, 4], output_type="pt")
    offloaded = VARPipeline.from_pretrained(converted_pipelines[NAME])
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device="cpu")
    fired = []
    for name in ("transformer", "vqvae"):
        hook = getattr(offloaded, name)._hf_hook
        monkeypatch.setattr(hook, "pre_forward", lambda module, *args, _original=hook.pre_forward, _name=name, **kwargs: (fired.append(_name), _original(module, *args, **kwargs))[1])
    with pytest.raises(ValueError, match="unknown class"):
        sample(offloaded, class_labels=["no such class"], output_type="pt")
    assert fired == []  # bad input: nothing was moved to the device
    out = sample(offloaded, class_labels=[1, 4], output_type="pt")
    assert fired[:2] == ["vqvae", "transformer"]
    assert torch.equal(out.images, expected.images)


@pytest.mark.parametrize("method", ["enable_sequential_cpu_offload", "enable_group_offload"])
def test_per_layer_offload_is_refused_clearly_and_changes_nothing(converted_pipelines, method):
    """Per-layer offload hooks run on `forward`, which the scale loop bypasses: accepted, it failed deep inside accelerate
    (or, on a GPU, with a device mismatch). Refused up front, naming what works; the pipeline stays usable."""
    pipe = VARPipeline.from_pretrained(converted_pipelines[NAME])
    pipe.set_progress_bar_config(disable=True)
    expected = sample(pipe, class_labels=[1, 4], output_type="pt")
    with pytest.raises(NotImplementedError, match="enable_model_cpu_offload"):
        getattr(pipe, method)(device="cpu") if method == "enable_sequential_cpu_offload" else pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="leaf_level"
        )
    assert not any(hasattr(module, "_hf_hook") or getattr(module, "_diffusers_hook", None) for module in pipe.transformer.modules())
    assert torch.equal(sample(pipe, class_labels=[1, 4], output_type="pt").images, expected.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cpu_offload_on_a_gpu(converted_pipelines):
    reference = VARPipeline.from_pretrained(converted_pipelines[NAME]).to("cuda")
    offloaded = VARPipeline.from_pretrained(converted_pipelines[NAME])
    offloaded.enable_model_cpu_offload()
    for p in (reference, offloaded):
        p.set_progress_bar_config(disable=True)
    a, b = (p(class_labels=[1, 4], generator=torch.Generator("cuda").manual_seed(0), output_type="pt") for p in (reference, offloaded))
    assert all(torch.equal(x, y) for x, y in zip(a.scale_indices, b.scale_indices))
    assert offloaded.transformer.device.type == "cpu"  # offloaded again after the call


def test_pickle_weights_are_refused(converted_pipelines, tmp_path):
    import shutil

    from var_hf import PickleRefusedError

    folder = tmp_path / "pipe"
    shutil.copytree(converted_pipelines[NAME], folder)
    sentinel = tmp_path / "pwned"
    torch.save({"x": torch.zeros(1)}, folder / "transformer" / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pickle"):
        VARPipeline.from_pretrained(folder)
    (folder / "transformer" / "pytorch_model.bin").unlink()
    # a pickle disguised as safetensors is refused by content
    torch.save({"x": torch.zeros(1)}, folder / "vqvae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(PickleRefusedError, match="pickle"):
        VARPipeline.from_pretrained(folder)
    assert not sentinel.exists()
    # local training checkpoints next to the weights are never read, so they do not block loading
    shutil.copy(converted_pipelines[NAME] / "vqvae" / "diffusion_pytorch_model.safetensors", folder / "vqvae")
    (folder / "checkpoint-5").mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "checkpoint-5" / "optimizer.bin")
    assert VARPipeline.from_pretrained(folder).transformer.config.num_classes == 10
    with pytest.raises(ValueError, match="safetensors"):
        VARPipeline.from_pretrained(converted_pipelines[NAME], use_safetensors=False)


def test_config_round_trip_and_validation(tmp_path):
    config = VARConfig(depth=3, embed_dim=192, num_heads=3, patch_nums=(1, 2, 4), num_classes=7, shared_adaln=True, attn_l2_norm=False)
    assert config.seq_len == 21 and config.scale_ranges == [(0, 1), (1, 5), (5, 21)]
    config.save_pretrained(tmp_path)
    again = VARConfig.from_pretrained(tmp_path)
    assert again.depth == 3 and again.hidden_size == 192 and again.patch_nums == [1, 2, 4] and again.shared_adaln
    with pytest.raises(ValueError):
        VARConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError):
        VARConfig(patch_nums=(1,))
    with pytest.raises(ValueError):
        VARConfig(patch_nums=(2, 1))


@pytest.mark.parametrize("key, value", [
    ("attn_implementation", "someone/their-kernel"),  # a Hub kernel repo: transformers would download and run it
    ("_attn_implementation_internal", "kernels-community/flash-attn"),
    ("_check", 1),  # would shadow a method
    ("seq_len", 5),  # derived, not a setting
])
def test_hostile_config_json_is_refused_before_loading(converted_pipelines, tmp_path, key, value):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(converted_pipelines[NAME], folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    with pytest.raises(ValueError, match=key):
        VARPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=key):
        VARTransformer.from_pretrained(folder / "transformer")
    assert VARConfig(attn_implementation="eager")._attn_implementation == "eager"  # the supported choices still work


def test_random_init_follows_upstream_scalings():
    config = VARConfig(depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2), codebook_size=64, latent_channels=4, num_classes=3, init_adaln_gamma=1e-3)
    model = VARTransformer(config)
    std = (1 / (3 * 128)) ** 0.5
    gate = model.layers[0].adaln_modulation.weight[:256]
    assert gate.abs().max() < 5 * std * 1e-3  # truncated normal at std·1e-3
    assert abs(model.pos_embed.std().item() - std) < 0.2 * std
    assert model.lm_head.weight.std() < 0.05 * std
    assert torch.allclose(model.layers[0].attn.logit_scale, torch.full((1, 2, 1, 1), float(np.log(4.0))))
    shared = VARTransformer(VARConfig(depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2), shared_adaln=True))
    assert not hasattr(shared.layers[0], "adaln_modulation") and shared.layers[0].adaln_table.shape == (1, 1, 6, 128)


def test_training_mode_applies_label_dropout_eval_does_not(pipe):
    data = load_file(str(golden_files(NAME)["expected"]))
    transformer = pipe.transformer
    transformer.config.class_dropout_prob = 1.0
    rates = [layer.drop_path_rate for layer in transformer.layers]
    for layer in transformer.layers:
        layer.drop_path_rate = 0.0  # stochastic depth off: only the label dropout is random here
    try:
        with torch.no_grad():
            eval_logits = transformer(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"]).logits
            transformer.train()
            dropped = transformer(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"]).logits
            transformer.eval()
            null = transformer(class_labels=torch.full((2,), 10), teacher_input=data["var.teacher_input"]).logits
    finally:
        transformer.config.class_dropout_prob = 0.1
        for layer, rate in zip(transformer.layers, rates):
            layer.drop_path_rate = rate
        transformer.eval()
    torch.testing.assert_close(eval_logits, data["var.logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(dropped, null, atol=1e-5, rtol=0)


def test_loss_is_mean_cross_entropy(pipe):
    data = load_file(str(golden_files(NAME)["expected"]))
    targets = torch.cat([data[f"vae.idx.{k}"] for k in range(4)], dim=1)
    out = pipe.transformer(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"], labels=targets)
    log_probs = torch.log_softmax(out.logits.double(), dim=-1)
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_gradient_checkpointing_gives_same_gradients(converted_pipelines):
    data = load_file(str(golden_files(NAME)["expected"]))
    targets = torch.cat([data[f"vae.idx.{k}"] for k in range(4)], dim=1)
    grads = []
    for checkpointing in (False, True):
        model = VARTransformer.from_pretrained(converted_pipelines[NAME] / "transformer")
        model.config.class_dropout_prob = 0.0
        for layer in model.layers:
            layer.drop_path_rate = 0.0
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(class_labels=data["input.labels"], teacher_input=data["var.teacher_input"], labels=targets).loss.backward()
        grads.append(model.layers[0].attn.qkv_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_default_model_samples():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape[0] == 2 and out.images.shape[-1] == 3


def test_imagenet_names_through_the_contract_call(golden_pipelines):
    """A 1000-class pipeline takes the contract's mixed labels: ids and ImageNet names (comma aliases too)."""
    from var_hf.convert_var_original import imagenet_id2label

    vqvae = golden_pipelines[NAME].vqvae
    config = VARConfig(depth=1, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3, 4), codebook_size=256, latent_channels=8, num_classes=1000)
    imagenet = VARPipeline(transformer=VARTransformer(config).eval(), vqvae=vqvae, id2label=imagenet_id2label())
    imagenet.set_progress_bar_config(disable=True)
    assert imagenet.get_label_ids(["goldfish", "golden retriever", "Tinca tinca"]) == [1, 207, 0]
    by_name = imagenet(class_labels=[207, "goldfish"], generator=torch.Generator().manual_seed(0), output_type="pt")
    by_id = imagenet(class_labels=[207, 1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(by_name.images, by_id.images)
    with pytest.raises(ValueError, match="unknown class"):
        imagenet(class_labels=["goldfsh"])
