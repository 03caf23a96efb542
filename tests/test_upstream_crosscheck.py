"""Cross-check against a local FoundationVision/VAR checkout on configurations beyond the golden fixtures.

Runs only where an upstream checkout exists (`VAR_UPSTREAM=path`, or an ignored `upstream/` folder made with
`git archive`; never committed). Upstream's own classes build random models of the released variants (10-scale
256 px and 512 px schedules, 1000 classes, per-block and shared AdaLN, l2 and legacy attention); our converter
turns them into pipelines, and float32 CPU results must be identical.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from var_hf import VARPipeline
from var_hf.convert_var_original import convert_to_pipeline_folder

UPSTREAM = Path(os.environ.get("VAR_UPSTREAM", Path(__file__).resolve().parents[1] / "upstream"))
pytestmark = pytest.mark.skipif(not (UPSTREAM / "models" / "var.py").exists(), reason="no upstream checkout")

P256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
P512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
CONFIGS = {  # patch_nums, depth, width, heads, shared AdaLN, l2 attention
    "256-perblock-l2": (P256, 3, 192, 3, False, True),
    "256-shared-legacy-8heads": (P256, 2, 256, 8, True, False),
    "512-shared-l2": (P512, 2, 128, 2, True, True),
}


def build_upstream(patch_nums, depth, width, heads, shared, l2):
    sys.path.insert(0, str(UPSTREAM))
    from models.var import VAR  # upstream code, imported from the checkout
    from models.vqvae import VQVAE

    torch.manual_seed(0)
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            param.copy_(torch.randn_like(param) * (0.05 if param.ndim > 1 else 0.02) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        vae.quantize.embedding.weight.normal_(0, 1.0)
    var = VAR(vae, num_classes=1000, depth=depth, embed_dim=width, num_heads=heads, shared_aln=shared, attn_l2_norm=l2,
              patch_nums=patch_nums, flash_if_available=False, fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    with torch.no_grad():
        for param in var.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    var.cond_drop_rate = 0.0
    return vae.eval(), var.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_identical_to_upstream(tmp_path, name):
    patch_nums, depth, width, heads, shared, l2 = CONFIGS[name]
    vae, var = build_upstream(patch_nums, depth, width, heads, shared, l2)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    save_file({k: v.contiguous() for k, v in var.state_dict().items()}, str(tmp_path / "var.safetensors"))
    convert_to_pipeline_folder(tmp_path / "vae.safetensors", tmp_path / "var.safetensors", tmp_path / "pipe",
                               num_heads=None if l2 else heads, log=lambda *_: None)
    pipe = VARPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolution = 16 * patch_nums[-1]
    images = torch.rand(2, 3, resolution, resolution) * 2 - 1
    labels = torch.tensor([5, 999])
    with torch.no_grad():
        theirs_tokens = vae.img_to_idxBl(images)
        for ours, theirs in zip(pipe.vqvae.encode_scales(images), theirs_tokens):
            assert torch.equal(ours, theirs)
        teacher = vae.quantize.idxBl_to_var_input(theirs_tokens)
        torch.testing.assert_close(pipe.vqvae.teacher_forcing_input(theirs_tokens), teacher, atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.transformer(class_labels=labels, teacher_input=teacher).logits, var(labels, teacher), atol=1e-4, rtol=0)
        for cfg, top_k, top_p, smooth, seed in [(1.5, 900, 0.96, False, 0), (4.0, 50, 0.9, True, 3)]:
            var.rng = torch.Generator()
            theirs = var.autoregressive_infer_cfg(B=2, label_B=labels, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=smooth)
            ours = pipe(class_labels=labels.tolist(), guidance_scale=cfg, top_k=top_k, top_p=top_p, more_smooth=smooth,
                        generator=torch.Generator().manual_seed(seed), output_type="pt").images
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
