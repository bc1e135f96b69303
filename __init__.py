# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim: training-free vision token compression (DVTS + TGVC) for LLaVA and Qwen2-VL / Qwen2.5-VL models in
Hugging Face Transformers.

The public classes are imported on first use, as Transformers does with its own: `import visiontrim` alone imports no
model code, so the vLLM plugin (`visiontrim.serving`) can use the configuration, processing and compression modules
under vLLM's pinned Transformers without the Transformers model classes.
"""

import importlib
from typing import Any


__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "configuration_visiontrim": (
        "VisionTrimLlavaConfig",
        "VisionTrimLlavaNextConfig",
        "VisionTrimLlavaNextVideoConfig",
        "VisionTrimQwen2VLConfig",
        "VisionTrimQwen2_5_VLConfig",
        "VisionTrimSettings",
        "VisionTrimVideoLlavaConfig",
    ),
    "modeling_visiontrim_llava": (
        "VisionTrimLlavaForConditionalGeneration",
        "VisionTrimLlavaModel",
        "VisionTrimLlavaNextForConditionalGeneration",
        "VisionTrimLlavaNextModel",
        "VisionTrimLlavaNextVideoForConditionalGeneration",
        "VisionTrimLlavaNextVideoModel",
        "VisionTrimVideoLlavaForConditionalGeneration",
        "VisionTrimVideoLlavaModel",
    ),
    "modeling_visiontrim_qwen2_vl": (
        "VisionTrimQwen2VLForConditionalGeneration",
        "VisionTrimQwen2VLModel",
        "VisionTrimQwen2_5_VLForConditionalGeneration",
        "VisionTrimQwen2_5_VLModel",
    ),
    "processing_visiontrim": (
        "VisionTrimLlavaNextProcessor",
        "VisionTrimLlavaNextVideoProcessor",
        "VisionTrimProcessor",
        "VisionTrimQwen2VLProcessor",
        "VisionTrimQwen2_5_VLProcessor",
        "VisionTrimQwenVideoProcessor",
        "VisionTrimVideoLlavaProcessor",
        "VisionTrimVideoProcessor",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
