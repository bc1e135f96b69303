# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim configuration of the Qwen2-VL family: Qwen2-VL and Qwen2.5-VL configs."""

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from .configuration_visiontrim import QwenSettings, strict_settings


@strict_settings
class VisionTrimQwen2_5_VLConfig(QwenSettings, Qwen2_5_VLConfig):
    r"""
    Configuration of [`VisionTrimQwen2_5_VLForConditionalGeneration`]: a [`Qwen2_5_VLConfig`] plus the VisionTrim
    settings of [`QwenSettings`].

    Example:

    ```python
    >>> config = VisionTrimQwen2_5_VLConfig(reduction_ratio=0.75)  # a 1008 x 756 image: 243 of 972 tokens kept
    >>> config.kept_tokens(972)
    (182, 61)
    ```"""

    model_type = "visiontrim_qwen2_5_vl"


@strict_settings
class VisionTrimQwen2VLConfig(QwenSettings, Qwen2VLConfig):
    r"""
    Configuration of [`VisionTrimQwen2VLForConditionalGeneration`]: a [`Qwen2VLConfig`] plus the VisionTrim settings
    of [`QwenSettings`].
    """

    model_type = "visiontrim_qwen2_vl"


VisionTrimQwen2_5_VLConfig.register_for_auto_class()
VisionTrimQwen2VLConfig.register_for_auto_class()

__all__ = ["VisionTrimQwen2VLConfig", "VisionTrimQwen2_5_VLConfig"]
