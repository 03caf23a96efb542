"""Zero-shot editing beyond the golden runs: mask resolutions, batching, PIL inputs, box masks, the CLI."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import golden_config, golden_files
from safetensors.torch import load_file

from var_hf.cli import main as cli_main
from var_hf.editing import box_edit_mask, mask_from_pil

NAME = "var_tiny_64"


@pytest.fixture(scope="module")
def data():
    return load_file(str(golden_files(NAME)["expected"]))


@pytest.fixture(scope="module")
def pipe(golden_pipelines):
    return golden_pipelines[NAME]


def edit(pipe, image, mask, run, **kwargs):
    return pipe(
        class_labels=kwargs.pop("class_labels", None),
        guidance_scale=run["cfg"],
        top_k=run["top_k"],
        top_p=run["top_p"],
        generator=torch.Generator().manual_seed(run["g_seed"]),
        output_type="pt",
        image=image,
        edit_mask=mask,
        **kwargs,
    )


@pytest.mark.parametrize("tag", ["inpaint", "outpaint", "classedit"])
def test_box_masks_match_upstream_notebook(data, tag):
    run = next(r for r in golden_config(NAME)["edit_runs"] if r["tag"] == tag)
    mask = box_edit_mask(4, tuple(run["box"]), inpaint=run["inpainting"])
    assert torch.equal(mask, data[f"edit.{tag}.mask"])


def test_pixel_resolution_mask_is_reduced_to_the_token_grid(pipe, data):
    run = golden_config(NAME)["edit_runs"][0]
    token_mask = data["edit.inpaint.mask"]
    pixel_mask = F.interpolate(token_mask[None, None], size=(64, 64), mode="nearest")[0, 0]  # (64, 64)
    out = edit(pipe, (data["input.image"] + 1) / 2, pixel_mask, run)
    for k in range(4):
        assert torch.equal(out.scale_indices[k], data[f"edit.inpaint.idx.{k}"])
    torch.testing.assert_close(out.images, data["edit.inpaint.image"], atol=1e-4, rtol=0)


def test_keep_everything_reproduces_the_tokenizer_reconstruction(pipe, data):
    """With a mask of ones every scale takes the image's tokens: the result is the VQ reconstruction."""
    run = golden_config(NAME)["edit_runs"][0]
    out = edit(pipe, (data["input.image"] + 1) / 2, torch.ones(4, 4), run, class_labels=[3, 4])
    torch.testing.assert_close(out.images, (data["vae.recon"] + 1) / 2, atol=1e-5, rtol=0)


def test_batched_masks_and_broadcasting(pipe, data):
    run = golden_config(NAME)["edit_runs"][1]
    image = (data["input.image"] + 1) / 2
    mask = data["edit.outpaint.mask"]
    shared = edit(pipe, image, mask, run)
    per_image = edit(pipe, image, mask.expand(2, 4, 4).clone(), run)
    channel = edit(pipe, image, mask.expand(2, 1, 4, 4).clone(), run)
    assert torch.equal(shared.images, per_image.images) and torch.equal(shared.images, channel.images)
    torch.testing.assert_close(shared.images, data["edit.outpaint.image"], atol=1e-4, rtol=0)
    # one image, several samples of it
    many = edit(pipe, image[:1], mask, run, num_images_per_prompt=3)
    assert many.images.shape == (3, 3, 64, 64)


def test_pil_and_numpy_inputs(pipe, data):
    run = golden_config(NAME)["edit_runs"][0]
    image = (data["input.image"] + 1) / 2
    as_uint8 = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pil_images = [PIL.Image.fromarray(a) for a in as_uint8]
    from_pil = edit(pipe, pil_images, data["edit.inpaint.mask"], run)
    from_numpy = edit(pipe, as_uint8.astype(np.float32) / 255, data["edit.inpaint.mask"].numpy(), run)
    assert torch.equal(from_pil.images, from_numpy.images)
    mask_picture = PIL.Image.fromarray((data["edit.inpaint.mask"].numpy() * 255).astype(np.uint8))
    assert torch.equal(mask_from_pil(mask_picture), data["edit.inpaint.mask"])
    with pytest.raises(ValueError, match="resolution"):
        edit(pipe, [pil_images[0].resize((32, 32))], data["edit.inpaint.mask"], run)


def test_bad_box_is_refused():
    with pytest.raises(ValueError):
        box_edit_mask(16, (0.5, 0.1, 0.2, 0.9))


def test_cli_edit(converted_pipelines, data, tmp_path):
    image = ((data["input.image"][0] + 1) / 2).permute(1, 2, 0).numpy()
    PIL.Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "in.png")
    args = ["edit", "--model", str(converted_pipelines[NAME]), "--image", str(tmp_path / "in.png"), "--box", "0.25,0.25,0.75,0.75", "--top-k", "40", "--output", str(tmp_path / "out.png")]
    assert cli_main(args) == 0
    assert PIL.Image.open(tmp_path / "out.png").size == (64, 64)
    PIL.Image.fromarray((image * 255).astype(np.uint8)).resize((80, 80)).save(tmp_path / "big.png")
    args[args.index(str(tmp_path / "in.png"))] = str(tmp_path / "big.png")
    assert cli_main(args) == 2
    assert cli_main(args + ["--resize", "--outpaint", "--class-label", "3"]) == 0
