# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
PyTorch VisionTrim Qwen2-VL and Qwen2.5-VL: the merged vision tokens of each image (each temporal slice of a video)
are compressed by DVTS + TGVC after the tower, and the kept tokens keep their M-RoPE (t, h, w) positions. Everything
but the classes is shared with the other Qwen models: `mrope_visiontrim.py`.
"""

from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_visiontrim_qwen2_vl import VisionTrimQwen2_5_VLConfig, VisionTrimQwen2VLConfig
from .modeling_visiontrim_utils import with_guidance_inputs
from .mrope_visiontrim import QwenGenerationMixin, QwenModelMixin


class VisionTrimQwen2_5_VLModel(QwenModelMixin, Qwen2_5_VLModel):
    """`Qwen2_5_VLModel` whose media features are the DVTS + TGVC tokens of each image (video slice)."""

    config: VisionTrimQwen2_5_VLConfig


class VisionTrimQwen2_5_VLForConditionalGeneration(QwenGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """
    Qwen2.5-VL with VisionTrim: an image of `N` merged tokens gives the LLM `max(1, round_half_up(N * (1 -
    reduction_ratio)))` of them (DVTS-selected, then TGVC-merged), at their own M-RoPE positions. Inputs come from
    `VisionTrimQwen2_5_VLProcessor`.
    """

    config: VisionTrimQwen2_5_VLConfig
    base_model_class = VisionTrimQwen2_5_VLModel
    forward = with_guidance_inputs(Qwen2_5_VLForConditionalGeneration.forward, "image", "video")


class VisionTrimQwen2VLModel(QwenModelMixin, Qwen2VLModel):
    """`Qwen2VLModel` whose media features are the DVTS + TGVC tokens of each image (video slice)."""

    config: VisionTrimQwen2VLConfig


class VisionTrimQwen2VLForConditionalGeneration(QwenGenerationMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with VisionTrim, as [`VisionTrimQwen2_5_VLForConditionalGeneration`]."""

    config: VisionTrimQwen2VLConfig
    base_model_class = VisionTrimQwen2VLModel
    forward = with_guidance_inputs(Qwen2VLForConditionalGeneration.forward, "image", "video")


# Qwen checkpoints on the Hub keep the pre-v5 names (`model.layers.*`, `visual.*`); Transformers renames them only for
# the classes it registers, so custom classes register the same renaming.
for model_class in (VisionTrimQwen2_5_VLForConditionalGeneration, VisionTrimQwen2VLForConditionalGeneration):
    register_checkpoint_conversion_mapping(
        model_class.__name__, get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration"), overwrite=True
    )
    model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "VisionTrimQwen2VLForConditionalGeneration",
    "VisionTrimQwen2VLModel",
    "VisionTrimQwen2_5_VLForConditionalGeneration",
    "VisionTrimQwen2_5_VLModel",
]
