# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The processor of VisionTrim LLaVA-OneVision models: as many image and video placeholders as the model keeps, and
each image's and video's question in the LLM's vocabulary.
"""

import math

from transformers import LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.processing_utils import MultiModalData

from .configuration_visiontrim import DEFAULT_REDUCTION_RATIO, qwen_visual_tokens
from .processing_visiontrim import CropBudgetProcessingMixin, LlmGuidanceMixin


class VisionTrimLlavaOnevisionProcessor(CropBudgetProcessingMixin, LlmGuidanceMixin, LlavaOnevisionProcessor):
    r"""
    A LLaVA-OneVision processor for VisionTrim models. Each `<image>` becomes `crops * (visual_tokens + crop_newline)`
    placeholders: the base view plus the high-res grid its size picks from `image_grid_pinpoints`, or one crop for
    each image of a prompt with several images, as stock OneVision encodes them. Each `<video>` becomes
    `frames * frame_tokens + 1` placeholders (the frames' pooled tokens kept, then stock's newline). Each image (video)
    also gets its prompt's question as `guidance_input_ids` / `guidance_attention_mask` (`video_guidance_*`),
    tokenised by the LLM's tokenizer without special tokens.

    Args:
        image_processor, tokenizer, video_processor, num_image_tokens, vision_feature_select_strategy, chat_template,
        image_token, video_token, vision_aspect_ratio:
            as in [`LlavaOnevisionProcessor`] (`num_image_tokens`: the patches of a crop, 729 for SigLIP at 384 px).
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Share of each crop's (pooled frame's) tokens removed; 0 gives the stock counts. Must equal the model's.
        visual_tokens (`int`, *optional*):
            Tokens kept per crop, instead of `reduction_ratio` (stored as the ratio `1 - visual_tokens /
            num_image_tokens`).
        guidance_max_length (`int`, defaults to 512):
            Guidance tokens kept of a long question (its start).
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            `"error"` refuses an image or video without a question; `"cls_similarity"` lets the model guide it by its
            own mean token.
        crop_newline (`bool`, defaults to `True`):
            Whether an `image_newline` follows each crop's tokens (the model config's `crop_newline`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        visual_tokens=None,
        guidance_max_length=512,
        empty_guidance="cls_similarity",
        crop_newline=True,
        **kwargs,
    ):
        self.set_empty_guidance(empty_guidance)
        self.guidance_max_length = guidance_max_length
        self.crop_newline = crop_newline
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
        if not isinstance(num_image_tokens, int) or math.isqrt(num_image_tokens) ** 2 != num_image_tokens:
            raise ValueError(
                f"{type(self).__name__} needs `num_image_tokens`, the patch tokens of one crop (a square grid: 729 "
                f"for SigLIP at 384 px, as in llava-hf's processor_config.json), got {num_image_tokens!r}."
            )
        self.set_budget(reduction_ratio, visual_tokens)

    @property
    def num_patches(self) -> int:
        return self.num_image_tokens

    @property
    def frame_tokens(self) -> int:
        """Tokens a video frame keeps of its `ceil(grid / 2) ** 2` pooled tokens."""
        return qwen_visual_tokens(math.ceil(math.isqrt(self.num_image_tokens) / 2) ** 2, self.reduction_ratio)

    @property
    def media_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.video_token)

    def image_tokens(self, image_size, single: bool) -> int:
        """Placeholders of an image of `image_size` (height, width): all its crops, or one in a multi-image prompt."""
        crop = self.image_processor.size["height"]
        crops = 1
        if single:
            best_height, best_width = select_best_resolution(
                list(image_size), self.image_processor.image_grid_pinpoints
            )
            crops += (best_height // crop) * (best_width // crop)
        return crops * (self.visual_tokens + int(self.crop_newline))

    def video_tokens(self, frames: int) -> int:
        """Placeholders of a video of `frames` frames: each frame's kept pooled tokens, then one newline."""
        return frames * self.frame_tokens + 1

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        first_of_prompt = 0
        for count in image_inputs["batch_num_images"]:
            if image_idx < first_of_prompt + count:
                break
            first_of_prompt += count
        image_size = image_inputs["image_sizes"][image_idx]
        image_size = image_size.tolist() if hasattr(image_size, "tolist") else image_size
        return self.image_token * self.image_tokens(image_size, single=count == 1)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        return self.video_token * self.video_tokens(len(video_inputs["pixel_values_videos"][video_idx]))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """The stock counts (an image alone in its prompt: all its crops), or the kept tokens' when compressing."""
        multimodal_data = super()._get_num_multimodal_tokens(
            image_sizes=image_sizes, video_sizes=video_sizes, **kwargs
        )
        if self.reduction_ratio > 0:
            if image_sizes is not None:
                multimodal_data.num_image_tokens = [self.image_tokens(size, single=True) for size in image_sizes]
            if video_sizes is not None:
                multimodal_data.num_video_tokens = [self.video_tokens(frames) for frames, _, _ in video_sizes]
        return multimodal_data


VisionTrimLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VisionTrimLlavaOnevisionProcessor"]
