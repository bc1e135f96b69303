# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim configuration of the Qwen2-VL family: Qwen2-VL and Qwen2.5-VL configs."""

from dataclasses import dataclass

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from .configuration_visiontrim import CompressionSettings, round_half_up, strict_settings, visual_tokens_per_crop


def qwen_visual_tokens(units: int, reduction_ratio: float) -> int:
    """
    Tokens kept of an image (or a video's temporal slice) of `units` merged tokens: `max(1, round_half_up(units * (1 -
    reduction_ratio)))`, all of them for a ratio of 0.
    """
    return max(1, visual_tokens_per_crop(units, reduction_ratio))


@dataclass(kw_only=True)
class QwenSettings(CompressionSettings):
    """
    The VisionTrim settings of the Qwen2-VL and Qwen2.5-VL configs. The unit is the merged token the LLM sees (2 x 2
    patches); each image, and each temporal slice of a video, is compressed on its own.

    Args:
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Share of each image's (video slice's) merged tokens removed, in [0, 1); 0 switches compression off. An
            image with `image_grid_thw = (t, h, w)` has `N = t * h * w / 4` merged tokens and keeps
            `K = max(1, round_half_up(N * (1 - reduction_ratio)))`; a video keeps `K` per slice of `h * w / 4`.
        dominant_ratio (`float`, defaults to 0.75):
            `K_d = round_half_up(K * dominant_ratio)` tokens are chosen by DVTS, the other `K - K_d` are TGVC's merged
            seeds.
        merge_iterations, merge_update:
            as in [`VisionTrimSettings`].
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            For an image without a question: `"cls_similarity"` guides TGVC by the image's own mean merged token
            (Qwen's tower has no CLS token; logged once), `"error"` raises.
        dvts_layer (`int`, *optional*):
            The vision block whose attention (the attention each merged token receives) and output (the features of
            the local term) DVTS reads. None: the last full-attention block (`fullatt_block_indexes[-1]` for
            Qwen2.5-VL; the last block for Qwen2-VL, whose blocks all attend over the whole image).
    """

    dvts_layer: int | None = None

    def __post_init__(self, visual_tokens: int | None = None, **kwargs):
        if visual_tokens is not None:
            raise ValueError(
                f"{type(self).__name__} takes its budget as a share of each image's tokens (images have any size): "
                f"set reduction_ratio={1 - visual_tokens / 576:.6f} instead of visual_tokens={visual_tokens} for "
                f"{visual_tokens} of every 576 tokens."
            )
        super().__post_init__(**kwargs)

    @property
    def scored_block(self) -> int:
        """The index of the vision block DVTS reads (`dvts_layer`, or the last full-attention block)."""
        if self.dvts_layer is not None:
            return self.dvts_layer
        full_attention_blocks = getattr(self.vision_config, "fullatt_block_indexes", None)
        return full_attention_blocks[-1] if full_attention_blocks else self.vision_config.depth - 1

    def kept_tokens(self, units: int) -> tuple[int, int]:
        """`(K_d, K_c)`: the DVTS tokens and TGVC seeds kept of an image (video slice) of `units` merged tokens."""
        kept = qwen_visual_tokens(units, self.reduction_ratio)
        if not self.compression_enabled:
            return kept, 0
        dominant = round_half_up(kept * self.dominant_ratio)
        return dominant, kept - dominant

    def describe_budget(self) -> str:
        ratio = self.reduction_ratio
        return f"max(1, round_half_up(N * (1 - {ratio}))) of each image's N merged tokens (reduction_ratio)"

    def validate_dvts_layer(self) -> None:
        """Class validator: `dvts_layer` is None or a full-attention block of the vision tower."""
        owner, depth, layer = type(self).__name__, self.vision_config.depth, self.dvts_layer
        if layer is not None and not 0 <= layer < depth:
            raise ValueError(
                f"{owner}.dvts_layer must be None (the last full-attention block) or a vision block index in "
                f"[0, {depth - 1}], got {layer!r}."
            )
        full_attention_blocks = getattr(self.vision_config, "fullatt_block_indexes", None)
        if layer is not None and full_attention_blocks and layer not in full_attention_blocks:
            raise ValueError(
                f"{owner}.dvts_layer={layer} is a window-attention block: DVTS needs the attention over the whole "
                f"image, so pick one of fullatt_block_indexes {list(full_attention_blocks)} (or None for the last)."
            )


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

__all__ = ["QwenSettings", "VisionTrimQwen2VLConfig", "VisionTrimQwen2_5_VLConfig", "qwen_visual_tokens"]
