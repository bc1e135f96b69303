# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim: training-free vision token compression (DVTS + TGVC) for LLaVA, Qwen2-VL / Qwen2.5-VL and Qwen3-VL models
in Hugging Face Transformers.

The public classes are imported on first use, as Transformers does with its own: `import visiontrim` alone imports no
model code, so the vLLM plugin (`visiontrim.serving`) can use the configuration, processing and compression modules
under vLLM's pinned Transformers without the Transformers model classes.
"""

import importlib
from typing import Any

from .architectures import exports


__version__ = "0.1.0"

# Public name -> the module that defines it: every architecture's classes (`architectures.py`), and the rest.
_MODULE_OF = {
    **exports(),
    "CompressionSettings": "configuration_visiontrim",
    "QwenSettings": "configuration_visiontrim",
    "VisionTrimSettings": "configuration_visiontrim_llava",
    "VisionTrimQwen3VLVideoProcessor": "video_processing_visiontrim",
    "VisionTrimQwenVideoProcessor": "video_processing_visiontrim",
    "VisionTrimVideoProcessor": "video_processing_visiontrim",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
