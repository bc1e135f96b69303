# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim: training-free vision token compression (DVTS + TGVC) for LLaVA models in Hugging Face Transformers."""

from .configuration_visiontrim import VisionTrimLlavaConfig, VisionTrimLlavaNextConfig
from .modeling_visiontrim_llava import (
    VisionTrimLlavaForConditionalGeneration,
    VisionTrimLlavaModel,
    VisionTrimLlavaNextForConditionalGeneration,
    VisionTrimLlavaNextModel,
)
from .processing_visiontrim import VisionTrimLlavaNextProcessor, VisionTrimProcessor


__version__ = "0.1.0"

__all__ = [
    "VisionTrimLlavaConfig",
    "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaModel",
    "VisionTrimLlavaNextConfig",
    "VisionTrimLlavaNextForConditionalGeneration",
    "VisionTrimLlavaNextModel",
    "VisionTrimLlavaNextProcessor",
    "VisionTrimProcessor",
]
