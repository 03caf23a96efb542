"""var-hf: VAR (Visual AutoRegressive modeling, next-scale prediction) for Hugging Face transformers and diffusers."""

from pathlib import Path

from transformers import AutoConfig, AutoModel

from .configuration_var import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig
from .modeling_var import VARPreTrainedModel, VARTransformer, VARTransformerOutput
from .pipeline_var import VARPipeline, VARPipelineOutput
from .safety import PickleRefusedError
from .vq_var import MultiScaleVQModel

__version__ = "0.1.0"

# The embedded default pipeline (small, safetensors): what `var-hf generate` samples from without --model.
DEFAULT_MODEL = str(Path(__file__).parent / "default_model")

AutoConfig.register(VARConfig.model_type, VARConfig, exist_ok=True)
AutoModel.register(VARConfig, VARTransformer, exist_ok=True)

__all__ = [
    "DEFAULT_MODEL",
    "MultiScaleVQModel",
    "PATCH_NUMS_256",
    "PATCH_NUMS_512",
    "PickleRefusedError",
    "VARConfig",
    "VARPipeline",
    "VARPipelineOutput",
    "VARPreTrainedModel",
    "VARTransformer",
    "VARTransformerOutput",
]
