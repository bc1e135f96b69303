# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim configuration of the LLaVA family: LLaVA, LLaVA-NeXT, Video-LLaVA and LLaVA-NeXT-Video configs."""

from dataclasses import dataclass
from typing import Any

from transformers import (
    CLIPTextConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextVideoConfig,
    PreTrainedConfig,
    VideoLlavaConfig,
)

from .configuration_visiontrim import CropSettings, non_negative, one_of, setting, strict_settings


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # Transformers < 5.20 (vLLM's pin): see `declare_guidance_config_before_5_20`
    SubConfigSpec = None


DVTS_SCORES = ("global_local", "received_attention")
LLM_STAGE_SCORES = ("both", "text_to_image", "image_to_text")
# LLM families whose decoder the LLM stage replaces (LLaVA-1.5 / 1.6 use Vicuna (Llama) or Mistral).
LLM_STAGE_TEXT_MODELS = ("llama", "mistral")
# The text tower of openai/clip-vit-large-patch14-336, whose vision tower LLaVA-1.5 and LLaVA-1.6 use.
CLIP_L14_TEXT_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}


def vision_attention_layer(
    vision_feature_layer: Any, vision_feature_select_strategy: str, num_layers: int, owner: str
) -> int:
    """
    Index of the vision encoder layer whose output is `hidden_states[vision_feature_layer]`: DVTS reads that layer's
    attention. Raises a `ValueError` when the selection has no such layer or keeps the CLS token.
    """
    if vision_feature_select_strategy != "default":
        raise ValueError(
            f"{owner}.vision_feature_select_strategy must be 'default' (CLS token dropped) when compression is on "
            f"(reduction_ratio > 0), got {vision_feature_select_strategy!r}."
        )
    layer = vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer <= num_layers or layer == 0:
        raise ValueError(
            f"{owner}.vision_feature_layer must be one transformer layer's hidden-state index, in [{-num_layers}, -1] "
            f"or [1, {num_layers}], when compression is on (reduction_ratio > 0); got {layer!r}."
        )
    return layer % (num_layers + 1) - 1


def declare_guidance_config_before_5_20(config_class: type[PreTrainedConfig]) -> None:
    """
    The fallback for Transformers < 5.20 (vLLM's pin), which has no `SubConfigSpec`: declares `guidance_config` in
    the class's `sub_configs` and builds it (a `CLIPTextConfig`, by default CLIP ViT-L/14's text tower) at the start
    of `__post_init__`, as Transformers >= 5.20 does from `sub_configs_defaults`.
    """
    config_class.sub_configs = {**config_class.sub_configs, "guidance_config": CLIPTextConfig}
    post_init = config_class.__post_init__

    def __post_init__(self, **kwargs) -> None:
        if not isinstance(self.guidance_config, CLIPTextConfig):
            self.guidance_config = CLIPTextConfig(**(self.guidance_config or CLIP_L14_TEXT_CONFIG))
        post_init(self, **kwargs)

    config_class.__post_init__ = __post_init__


@dataclass(kw_only=True)
class VisionTrimSettings(CropSettings):
    """
    The VisionTrim compression settings, shared by the LLaVA, LLaVA-NeXT and video configs. See `ALGORITHM.md`.

    Args:
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Share of a crop's patch tokens removed, in [0, 1); 0 switches compression off. The source of truth for the
            budget: `visual_tokens` (tokens kept per crop) is derived from it. `visual_tokens=K` is accepted instead at
            construction and in `from_pretrained`, and is stored as the ratio `1 - K / num_patches`.
        dominant_ratio (`float`, defaults to 0.75):
            Share of the kept tokens chosen by DVTS, in [0, 1]; TGVC merges the rest into the other tokens. 1 is
            "DVTS only" (TGVC off, no guidance text needed), 0 is "TGVC only".
        dvts_score (`str`, defaults to `"global_local"`):
            DVTS score: `"global_local"` (the paper's: CLS attention and local token affinity, variance-weighted) or
            `"received_attention"` (the authors' released code: CLS attention and attention received from patches).
        merge_iterations (`int`, defaults to 3):
            TGVC merge iterations (0 keeps the seeds as they are).
        merge_update (`str`, defaults to `"add"`):
            TGVC seed update: `"add"` (reference: each iteration adds the mean of the tokens assigned to a seed) or
            `"mean"` (the seed becomes the mean of its original token and the tokens assigned to it).
        llm_stage_layer (`int`, *optional*):
            The LLM stage: during prefill, after decoder layer `llm_stage_layer - 1`, the visual tokens are ranked by
            their attention to the prompt's text, `llm_stage_tokens` per image are kept, the others merged into them,
            and layers >= `llm_stage_layer` run on the shorter sequence. None or 0 switches it off (the default).
        llm_stage_tokens (`int`, *optional*):
            Visual tokens per image kept from `llm_stage_layer` on; fewer than an image brings into the LLM. Unused
            while `llm_stage_layer` is off.
        llm_stage_score (`str`, defaults to `"both"`):
            How the LLM stage ranks a visual token at layer `llm_stage_layer - 1`: `"text_to_image"` (the attention the
            text after the image pays it), `"image_to_text"` (the attention it pays the text before it, all a causal
            LLM lets it see) or `"both"` (their mean).
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            What TGVC does for an image whose guidance text is empty (an image-only prompt): `"cls_similarity"` guides
            it by the image's own CLS token instead of text (logged once), `"error"` raises.
        guidance_cache_size (`int`, defaults to 256):
            How many recent guidance texts' CLIP text-tower embeddings the model keeps (keyed by their token ids), so
            a repeated question runs no text tower; 0 switches the cache off.
        projection_dim (`int`, defaults to 768):
            Width of the CLIP joint embedding space (`visual_projection` output, `guidance_config.projection_dim`).
        guidance_config (`CLIPTextConfig` or `dict`, *optional*):
            The CLIP text tower that encodes the guidance text; defaults to CLIP ViT-L/14-336's.
    """

    guidance_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 768
    dvts_score: str = setting(one_of(DVTS_SCORES), "global_local")
    guidance_cache_size: int = setting(non_negative, 256)
    llm_stage_layer: int | None = None
    llm_stage_tokens: int | None = None
    llm_stage_score: str = setting(one_of(LLM_STAGE_SCORES), "both")

    def __init_subclass__(cls, **kwargs):
        """Declares `guidance_config` a sub-config (a `CLIPTextConfig`, by default CLIP ViT-L/14's text tower)."""
        if "model_type" in cls.__dict__:  # a model config, not a settings mixin
            if SubConfigSpec is None:
                declare_guidance_config_before_5_20(cls)
            else:
                guidance = SubConfigSpec(config_class=CLIPTextConfig, init_kwargs=CLIP_L14_TEXT_CONFIG)
                cls.sub_configs_defaults = {**cls.sub_configs_defaults, "guidance_config": guidance}
        super().__init_subclass__(**kwargs)

    @property
    def llm_stage_enabled(self) -> bool:
        return bool(self.llm_stage_layer)

    @property
    def min_visual_tokens_per_image(self) -> int:
        """The fewest visual tokens an image brings into the LLM: one crop's worth for LLaVA-1.5."""
        return self.visual_tokens

    def validate_projection_dim(self) -> None:
        """Class validator: `projection_dim` is the guidance tower's `projection_dim`."""
        owner, projection_dim = type(self).__name__, self.guidance_config.projection_dim
        if projection_dim != self.projection_dim:
            raise ValueError(
                f"{owner}.projection_dim ({self.projection_dim}) must equal guidance_config.projection_dim "
                f"({projection_dim}): text and image embeddings are compared in one space."
            )

    def validate_vision_feature_layer(self) -> None:
        """Class validator: with compression on, DVTS has one vision layer's attention to read."""
        if self.compression_enabled:
            vision_attention_layer(
                self.vision_feature_layer,
                self.vision_feature_select_strategy,
                self.vision_config.num_hidden_layers,
                type(self).__name__,
            )

    def validate_llm_stage(self) -> None:
        """
        Class validator: an LLM stage that is on prunes at a layer of the LLM (a Llama or Mistral one) to fewer tokens
        than an image brings into it.
        """
        if not self.llm_stage_enabled:  # llm_stage_layer is the switch; llm_stage_tokens waits for it
            return
        owner, num_layers = type(self).__name__, self.text_config.num_hidden_layers
        layer, tokens = self.llm_stage_layer, self.llm_stage_tokens
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"{owner}.llm_stage_layer must be an integer in [1, {num_layers - 1}] (a layer of the "
                f"{num_layers}-layer LLM to prune at; None or 0 switches the stage off), got {layer!r}."
            )
        entering = self.min_visual_tokens_per_image
        if tokens is None or not 1 <= tokens < entering:
            raise ValueError(
                f"{owner}.llm_stage_tokens must be an integer in [1, {entering - 1}]: fewer than the {entering} "
                f"visual tokens an image can bring into the LLM; got {tokens!r}."
            )
        if self.text_config.model_type not in LLM_STAGE_TEXT_MODELS:
            raise ValueError(
                f"{owner}.llm_stage_layer needs a {' or '.join(LLM_STAGE_TEXT_MODELS)} LLM; this model's text_config "
                f"is {self.text_config.model_type!r}: set llm_stage_layer=None."
            )


@strict_settings
class VisionTrimLlavaConfig(VisionTrimSettings, LlavaConfig):
    r"""
    Configuration of [`VisionTrimLlavaForConditionalGeneration`]: a [`LlavaConfig`] plus the VisionTrim settings of
    [`VisionTrimSettings`] (`reduction_ratio`, `dominant_ratio`, `dvts_score`, `merge_iterations`, `merge_update`,
    `empty_guidance`, `projection_dim`, `guidance_config`).

    Example:

    ```python
    >>> config = VisionTrimLlavaConfig(visual_tokens=64)  # LLaVA-1.5-7B shapes, 64 of 576 tokens kept per image
    >>> config.reduction_ratio, config.dominant_tokens, config.complement_tokens
    (0.8888888888888888, 48, 16)
    ```"""

    model_type = "visiontrim_llava"


@dataclass(kw_only=True)
class AnyresSettings(VisionTrimSettings):
    """
    The VisionTrim settings of the anyres (LLaVA-NeXT) configs: every crop of an image (base view and high-res crops)
    is compressed on its own, and:

    Args:
        crop_newline (`bool`, defaults to `True`):
            Whether the model's `image_newline` embedding follows each crop's tokens. An image of `c` crops then gives
            `c * (visual_tokens + 1)` tokens: base crop first, then the high-res crops in raster order.
    """

    crop_newline: bool = True

    @property
    def min_visual_tokens_per_image(self) -> int:
        """
        The fewest visual tokens an image brings into the LLM: the smallest crop grid plus the base view, its
        `image_newline` tokens not counted (they are layout: the LLM stage keeps them all).
        """
        if not self.compression_enabled:
            return self.num_patches  # at least the base view's
        crop = self.vision_config.image_size
        fewest_crops = 1 + min((height // crop) * (width // crop) for height, width in self.image_grid_pinpoints)
        return fewest_crops * self.visual_tokens

    def describe_budget(self) -> str:
        newline = " plus one image_newline" if self.crop_newline else ", no image_newline"
        return f"{super().describe_budget()}{newline} (config.crop_newline={self.crop_newline})"


@strict_settings
class VisionTrimLlavaNextConfig(AnyresSettings, LlavaNextConfig):
    r"""
    Configuration of [`VisionTrimLlavaNextForConditionalGeneration`]: a [`LlavaNextConfig`] plus the VisionTrim
    settings of [`AnyresSettings`], applied to every crop (the base view and each high-res crop) on its own.

    Example:

    ```python
    >>> config = VisionTrimLlavaNextConfig(visual_tokens=64)  # 320 tokens for a 5-crop image instead of up to 2928
    ```"""

    model_type = "visiontrim_llava_next"


@strict_settings
class VisionTrimVideoLlavaConfig(VisionTrimSettings, VideoLlavaConfig):
    r"""
    Configuration of [`VisionTrimVideoLlavaForConditionalGeneration`]: a [`VideoLlavaConfig`] plus the VisionTrim
    settings of [`VisionTrimSettings`], applied to each image and to each video frame on its own: an image gives
    `visual_tokens` tokens, a video of `f` frames `f * visual_tokens` (stock: 256 per image, 257 per frame).
    `guidance_config` is the text tower of the video encoder (LanguageBind's, a CLIP ViT-L/14 text tower).

    Example:

    ```python
    >>> config = VisionTrimVideoLlavaConfig(visual_tokens=16)  # 8 frames: 128 tokens instead of 2056
    ```"""

    model_type = "visiontrim_video_llava"


@strict_settings
class VisionTrimLlavaNextVideoConfig(AnyresSettings, LlavaNextVideoConfig):
    r"""
    Configuration of [`VisionTrimLlavaNextVideoForConditionalGeneration`]: a [`LlavaNextVideoConfig`] plus the
    VisionTrim settings of [`AnyresSettings`]. Images are compressed per crop as in LLaVA-NeXT; each video frame is
    compressed on its full patch grid (576 tokens for CLIP ViT-L/14-336) to `visual_tokens` tokens, and the model's
    spatial pooling (`vision_resampler`) is skipped: a video of `f` frames gives `f * visual_tokens` tokens (stock:
    `f * 144`).

    Example:

    ```python
    >>> config = VisionTrimLlavaNextVideoConfig(visual_tokens=32)  # 32 frames: 1024 tokens instead of 4608
    ```"""

    model_type = "visiontrim_llava_next_video"


VisionTrimLlavaConfig.register_for_auto_class()
VisionTrimLlavaNextConfig.register_for_auto_class()
VisionTrimVideoLlavaConfig.register_for_auto_class()
VisionTrimLlavaNextVideoConfig.register_for_auto_class()

__all__ = [
    "AnyresSettings",
    "VisionTrimLlavaConfig",
    "VisionTrimLlavaNextConfig",
    "VisionTrimLlavaNextVideoConfig",
    "VisionTrimSettings",
    "VisionTrimVideoLlavaConfig",
]
