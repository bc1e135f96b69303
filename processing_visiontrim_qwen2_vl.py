# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Processors for VisionTrim Qwen2-VL and Qwen2.5-VL models: as many placeholders as the model keeps of each image (each
video slice), and the question of each prompt in the LLM's own vocabulary.
"""

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData

from .configuration_visiontrim import DEFAULT_REDUCTION_RATIO, check_reduction_ratio
from .configuration_visiontrim_qwen2_vl import qwen_visual_tokens
from .processing_visiontrim import GuidanceProcessingMixin


class QwenProcessingMixin(GuidanceProcessingMixin):
    """
    What VisionTrim processors add to the stock Qwen2-VL / Qwen2.5-VL ones: an image of `N` merged tokens (from
    `image_grid_thw`) gets `max(1, round_half_up(N * (1 - reduction_ratio)))` placeholders, a video that many per
    temporal slice, and each image (video) the question of its prompt as `guidance_input_ids` /
    `guidance_attention_mask` (`video_guidance_*`): the text of the last user turn, tokenised by the LLM's own
    tokenizer without special tokens, which the model embeds with the LLM's input embeddings.
    """

    guidance_special_tokens = False

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        guidance_max_length=512,
        empty_guidance="cls_similarity",
        **kwargs,
    ):
        """The stock Qwen processor's arguments (the same for Qwen2-VL and Qwen2.5-VL), then the VisionTrim ones."""
        self.set_qwen_guidance(reduction_ratio, guidance_max_length, empty_guidance)
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    def set_qwen_guidance(self, reduction_ratio: float, guidance_max_length: int, empty_guidance: str) -> None:
        """Sets the budget and the guidance settings, refusing invalid values with the field's name."""
        self.set_empty_guidance(empty_guidance)
        check_reduction_ratio(reduction_ratio, type(self).__name__)
        self.reduction_ratio = reduction_ratio
        self.guidance_max_length = guidance_max_length

    @property
    def guidance_tokenizer(self):
        """The guidance is tokenised by the LLM's tokenizer: the model embeds it with the LLM's input embeddings."""
        return self.tokenizer

    @property
    def media_tokens(self) -> tuple[str, ...]:
        """The markers removed from a prompt's question: the placeholders and the vision start and end tokens."""
        return (self.image_token, self.video_token, "<|vision_start|>", "<|vision_end|>")

    @property
    def model_input_names(self) -> list[str]:
        names = super().model_input_names
        return names + [
            "guidance_input_ids",
            "guidance_attention_mask",
            "video_guidance_input_ids",
            "video_guidance_attention_mask",
        ]

    def num_media(self, encoding: BatchFeature, pixels_name: str) -> int:
        """Images (videos) are packed patches: one `*_grid_thw` row each."""
        return len(encoding["image_grid_thw" if pixels_name == "pixel_values" else "video_grid_thw"])

    def kept_tokens(self, grid_thw, merge_size: int) -> int:
        """Placeholders of an image or video of `grid_thw` (t, h, w) patches: the kept tokens of its `t` slices."""
        frames, height, width = (int(value) for value in grid_thw)
        return frames * qwen_visual_tokens(height * width // merge_size**2, self.reduction_ratio)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * self.kept_tokens(grid, self.image_processor.merge_size)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        grid = video_inputs["video_grid_thw"][video_idx]
        return self.video_token * self.kept_tokens(grid, self.video_processor.merge_size)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        multimodal_data = super()._get_num_multimodal_tokens(
            image_sizes=image_sizes, video_sizes=video_sizes, **kwargs
        )
        if image_sizes is not None and self.reduction_ratio > 0:
            merge_size = self.image_processor.merge_size
            multimodal_data.num_image_tokens = [
                qwen_visual_tokens(patches // merge_size**2, self.reduction_ratio)
                for patches in multimodal_data.num_image_patches
            ]
        return multimodal_data


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

__all__ = ["QwenProcessingMixin", "VisionTrimQwen2VLProcessor", "VisionTrimQwen2_5_VLProcessor"]
