"""Model cards for converted and trained pipelines, filled from `templates/model_card.md`."""

from __future__ import annotations

from pathlib import Path
from string import Template

from huggingface_hub import ModelCardData

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"


def _count(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


PLACEHOLDER_REPO_ID = "path/to/pipeline"  # in cards written before the pipeline has a Hub repo; replaced when pushed


def render_model_card(
    pipe,
    repo_id: str = PLACEHOLDER_REPO_ID,
    title: str | None = None,
    sources: dict[str, str] | None = None,
    converter_version: str | None = None,
    official_sources: dict[str, str | None] | None = None,
    base_model: str | None = None,
    training: str | None = None,
    license: str = "mit",
    datasets: list[str] | None = None,
) -> str:
    """Render the card text (YAML metadata + markdown) for a `VARPipeline`."""
    from . import __version__

    config = pipe.transformer.config
    metadata = ModelCardData(
        license=license,
        library_name="var-hf",
        pipeline_tag="unconditional-image-generation",
        tags=["var", "visual-autoregressive", "class-conditional", "safetensors", "var-hf"],
        base_model=base_model,
        datasets=datasets,
    ).to_yaml()
    lines = []
    if sources:
        lines.append(f"Converted from the upstream FoundationVision/VAR checkpoints by var-hf {__version__} "
                     f"(converter version {converter_version}) without unpickling anything:")
        lines.append("")
        lines.append("| file | sha256 | official release file |")
        lines.append("|---|---|---|")
        for name, digest in sources.items():
            official = (official_sources or {}).get(name)
            verdict = f"`{official}` (sha256 matches)" if official else "no (not a pinned release file)"
            lines.append(f"| `{name}` | `{digest}` | {verdict} |")
    if training:
        lines.append(training)
    if not lines:
        lines.append(f"Saved by var-hf {__version__}.")
    license_text = (
        "MIT, as the upstream VAR weights (FoundationVision/VAR)." if license == "mit" else f"{license}."
    )
    variant = ("shared AdaLN" if config.shared_adaln else "per-block AdaLN") + (
        ", l2-normalised attention" if config.attn_l2_norm else ", legacy attention scale"
    )
    return Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(
        metadata=metadata,
        title=title or f"VAR d{config.num_hidden_layers} ({pipe.vqvae.resolution} px)",
        resolution=pipe.vqvae.resolution,
        patch_nums=", ".join(map(str, config.patch_nums)),
        depth=config.num_hidden_layers,
        width=config.hidden_size,
        heads=config.num_attention_heads,
        num_classes=config.num_classes,
        variant=variant,
        codebook_size=pipe.vqvae.config.codebook_size,
        latent_channels=pipe.vqvae.config.latent_channels,
        transformer_params=_count(pipe.transformer),
        vqvae_params=_count(pipe.vqvae),
        repo_id=repo_id,
        provenance="\n".join(lines),
        license_text=license_text,
    )


def write_model_card(folder: str | Path, pipe, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(pipe, **kwargs), encoding="utf-8")
    return path
