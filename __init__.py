# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim: training-free vision token compression (DVTS + TGVC) for LLaVA models in Hugging Face Transformers."""

from .configuration_visiontrim import (
    VisionTrimLlavaConfig,
    VisionTrimLlavaNextConfig,
    VisionTrimLlavaNextVideoConfig,
    VisionTrimSettings,
    VisionTrimVideoLlavaConfig,
)
from .modeling_visiontrim_llava import (
    VisionTrimLlavaForConditionalGeneration,
    VisionTrimLlavaModel,
    VisionTrimLlavaNextForConditionalGeneration,
    VisionTrimLlavaNextModel,
    VisionTrimLlavaNextVideoForConditionalGeneration,
    VisionTrimLlavaNextVideoModel,
    VisionTrimVideoLlavaForConditionalGeneration,
    VisionTrimVideoLlavaModel,
)
from .processing_visiontrim import (
    VisionTrimLlavaNextProcessor,
    VisionTrimLlavaNextVideoProcessor,
    VisionTrimProcessor,
    VisionTrimVideoLlavaProcessor,
    VisionTrimVideoProcessor,
)


__version__ = "0.1.0"

__all__ = [
    "VisionTrimLlavaConfig",
    "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaModel",
    "VisionTrimLlavaNextConfig",
    "VisionTrimLlavaNextForConditionalGeneration",
    "VisionTrimLlavaNextModel",
    "VisionTrimLlavaNextProcessor",
    "VisionTrimLlavaNextVideoConfig",
    "VisionTrimLlavaNextVideoForConditionalGeneration",
    "VisionTrimLlavaNextVideoModel",
    "VisionTrimLlavaNextVideoProcessor",
    "VisionTrimProcessor",
    "VisionTrimSettings",
    "VisionTrimVideoLlavaConfig",
    "VisionTrimVideoLlavaForConditionalGeneration",
    "VisionTrimVideoLlavaModel",
    "VisionTrimVideoLlavaProcessor",
    "VisionTrimVideoProcessor",
]
