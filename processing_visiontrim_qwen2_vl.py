# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Processors for VisionTrim Qwen2-VL and Qwen2.5-VL models: as many placeholders as the model keeps of each image (each
video slice), and the question of each prompt in the LLM's own vocabulary.
"""

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from .processing_visiontrim import QwenProcessingMixin


class VisionTrimQwen2_5_VLProcessor(QwenProcessingMixin, Qwen2_5_VLProcessor):
    r"""
    A Qwen2.5-VL processor for VisionTrim models: each image becomes `max(1, round_half_up(N * (1 - reduction_ratio)))`
    `<|image_pad|>` placeholders (`N` merged tokens, from `image_grid_thw`), each video that many per temporal slice,
    and the question of each prompt guides its images and videos (`guidance_input_ids` / `guidance_attention_mask`,
    `video_guidance_*`, one row per image or video, in the LLM's vocabulary).

    Args:
        image_processor, tokenizer, video_processor, chat_template: as in [`Qwen2_5_VLProcessor`].
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Must equal the model's `config.reduction_ratio`; 0 emits every merged token, like stock Qwen2.5-VL.
        guidance_max_length (`int`, defaults to 512):
            Guidance texts are truncated to this many tokens.
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            The model's `config.empty_guidance`: with `"error"`, an image-only prompt is refused here.
    """


class VisionTrimQwen2VLProcessor(QwenProcessingMixin, Qwen2VLProcessor):
    r"""A Qwen2-VL processor for VisionTrim models, as [`VisionTrimQwen2_5_VLProcessor`]."""


VisionTrimQwen2_5_VLProcessor.register_for_auto_class("AutoProcessor")
VisionTrimQwen2VLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VisionTrimQwen2VLProcessor", "VisionTrimQwen2_5_VLProcessor"]
