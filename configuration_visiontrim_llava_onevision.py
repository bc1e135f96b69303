# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim configuration of LLaVA-OneVision: a `LlavaOnevisionConfig` plus the per-crop VisionTrim settings."""

import math
from dataclasses import dataclass

from transformers import LlavaOnevisionConfig

from .configuration_visiontrim import CropSettings, qwen_visual_tokens, strict_settings


@dataclass(kw_only=True)
class OnevisionSettings(CropSettings):
    """
    The VisionTrim settings of LLaVA-OneVision. Every image crop (SigLIP: 27 x 27 = 729 patches at 384 px) keeps
    `visual_tokens` tokens; every video frame, after OneVision's 2 x 2 pooling (14 x 14 = 196 tokens), keeps
    `max(1, round_half_up(196 * (1 - reduction_ratio)))`. DVTS's global term is the attention each token receives at
    the scored layer (SigLIP has no CLS token); TGVC compares the projected tokens with the question embedded by the
    LLM's input embeddings (no CLIP text tower).

    Args:
        reduction_ratio, visual_tokens, dominant_ratio, merge_iterations, merge_update:
            as in `VisionTrimSettings` (`visual_tokens` is per crop).
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            For an image without a question: `"cls_similarity"` guides TGVC by each crop's (frame's) mean projected
            token (SigLIP has no CLS token; logged once), `"error"` raises.
        crop_newline (`bool`, defaults to `True`):
            Whether the model's `image_newline` follows each crop's tokens: an image of `c` crops gives
            `c * (visual_tokens + 1)` tokens, base view first. A video keeps stock's single newline after its last
            frame either way.
    """

    crop_newline: bool = True

    @property
    def frame_units(self) -> int:
        """Tokens of a video frame after OneVision's pooling: `ceil(grid / 2) ** 2` (196 for SigLIP at 384 px)."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return math.ceil(grid / 2) ** 2

    @property
    def frame_tokens(self) -> int:
        """Tokens a video frame keeps (all `frame_units` with compression off)."""
        return qwen_visual_tokens(self.frame_units, self.reduction_ratio)

    def describe_budget(self, modality: str = "image") -> str:
        if modality == "video":
            return f"{self.frame_tokens} per video frame plus one image_newline (config.reduction_ratio)"
        newline = " plus one image_newline" if self.crop_newline else ", no image_newline"
        return f"{super().describe_budget()}{newline} (config.crop_newline={self.crop_newline})"

    def validate_vision_feature_layer(self) -> None:
        """Class validator: with compression on, DVTS reads one SigLIP layer whose output is fed whole."""
        if not self.compression_enabled:
            return
        owner, num_layers, layer = type(self).__name__, self.vision_config.num_hidden_layers, self.vision_feature_layer
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -num_layers <= layer <= num_layers
            or not layer
        ):
            raise ValueError(
                f"{owner}.vision_feature_layer must be one vision layer's hidden-state index, in [{-num_layers}, -1] "
                f"or [1, {num_layers}], when compression is on (reduction_ratio > 0); got {layer!r}."
            )
        if self.vision_feature_select_strategy != "full":
            raise ValueError(
                f"{owner}.vision_feature_select_strategy must be 'full' (SigLIP has no CLS token to drop) when "
                f"compression is on, got {self.vision_feature_select_strategy!r}."
            )


@strict_settings
class VisionTrimLlavaOnevisionConfig(OnevisionSettings, LlavaOnevisionConfig):
    r"""
    Configuration of [`VisionTrimLlavaOnevisionForConditionalGeneration`]: a [`LlavaOnevisionConfig`] plus the
    VisionTrim settings of [`OnevisionSettings`], applied to every image crop and every pooled video frame on its own.

    Example:

    ```python
    >>> config = VisionTrimLlavaOnevisionConfig(visual_tokens=81)  # 81 of 729 tokens per crop, 22 of 196 per frame
    >>> config.visual_tokens, config.frame_tokens
    (81, 22)
    ```"""

    model_type = "visiontrim_llava_onevision"


VisionTrimLlavaOnevisionConfig.register_for_auto_class()

__all__ = ["OnevisionSettings", "VisionTrimLlavaOnevisionConfig"]
