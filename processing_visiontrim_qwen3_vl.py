# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Processor for VisionTrim Qwen3-VL models (dense and MoE): as many placeholders as the model keeps of each image and of
each video slice (each slice after its timestamp, as stock), and the question of each prompt in the LLM's vocabulary.
"""

from transformers import Qwen3VLProcessor

from .configuration_visiontrim import qwen_visual_tokens
from .configuration_visiontrim_qwen3_vl import QWEN3_DEFAULT_REDUCTION_RATIO
from .processing_visiontrim import QwenProcessingMixin


class VisionTrimQwen3VLProcessor(QwenProcessingMixin, Qwen3VLProcessor):
    r"""
    A Qwen3-VL processor for VisionTrim models: each image becomes `max(1, round_half_up(N * (1 - reduction_ratio)))`
    `<|image_pad|>` placeholders (`N` merged tokens, from `image_grid_thw`); a video keeps stock Qwen3-VL layout, each
    temporal slice `<t seconds><|vision_start|>...<|vision_end|>`, with that many `<|video_pad|>` per slice; the
    question of each prompt guides its images and videos (`guidance_input_ids` / `guidance_attention_mask`,
    `video_guidance_*`, one row per image or video, in the LLM's vocabulary).

    Args:
        image_processor, tokenizer, video_processor, chat_template: as in [`Qwen3VLProcessor`].
        reduction_ratio (`float`, defaults to 0.5): must equal the model's `config.reduction_ratio`.
        guidance_max_length, empty_guidance: as in [`VisionTrimQwen2_5_VLProcessor`].
    """

    default_reduction_ratio = QWEN3_DEFAULT_REDUCTION_RATIO

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """Stock Qwen3-VL's slices and timestamps, each slice's placeholders cut to the kept count."""
        stock = Qwen3VLProcessor.replace_video_token(self, video_inputs, video_idx, **kwargs)
        if self.reduction_ratio == 0:
            return stock
        _, height, width = (int(value) for value in video_inputs["video_grid_thw"][video_idx])
        slice_units = height * width // self.video_processor.merge_size**2
        kept = qwen_visual_tokens(slice_units, self.reduction_ratio)
        return stock.replace(self.video_token * slice_units, self.video_token * kept)


VisionTrimQwen3VLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VisionTrimQwen3VLProcessor"]
