# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim: training-free vision token compression (DVTS + TGVC) for LLaVA models in Hugging Face Transformers."""

from .configuration_visiontrim import VisionTrimLlavaConfig
from .modeling_visiontrim_llava import VisionTrimLlavaForConditionalGeneration, VisionTrimLlavaModel
from .processing_visiontrim import VisionTrimProcessor


__version__ = "0.1.0"

__all__ = [
    "VisionTrimLlavaConfig",
    "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaModel",
    "VisionTrimProcessor",
]
