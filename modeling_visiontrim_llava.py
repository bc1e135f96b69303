# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
PyTorch VisionTrim LLaVA: LLaVA, LLaVA-NeXT, Video-LLaVA and LLaVA-NeXT-Video whose vision tokens (per image crop and
per video frame) are compressed by DVTS + TGVC before the projector.

Each class adds to its stock Transformers class only what VisionTrim changes. A base model (`*Model`) takes
`VisionTrimModelMixin`: the CLIP text tower and head, `forward` encoding the media before the LLM, and the LLM-stage
decoder; it overrides `get_image_features` / `get_video_features` to compress. A generation class
(`*ForConditionalGeneration`) takes `LlavaGenerationMixin` and names its base model and its `forward`. The
algorithm is in `compression_visiontrim.py` (vision stage) and `llm_stage_visiontrim.py` (LLM stage).
"""

import math

import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPTextModelWithProjection,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoModel,
    PreTrainedModel,
    VideoLlavaForConditionalGeneration,
    VideoLlavaModel,
)
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector, image_size_to_num_patches
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoMultiModalProjector,
    LlavaNextVideoPooler,
)
from transformers.models.video_llava.modeling_video_llava import VideoLlavaMultiModalProjector
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from .compression_visiontrim import (
    CompressedCrops,
    GuidanceEmbeddingCache,
    VisionTowerRun,
    anyres_image_tokens,
    compress_crops,
    run_vision_tower,
)
from .configuration_visiontrim_llava import (
    AnyresSettings,
    VisionTrimLlavaConfig,
    VisionTrimLlavaNextConfig,
    VisionTrimLlavaNextVideoConfig,
    VisionTrimSettings,
    VisionTrimVideoLlavaConfig,
    vision_attention_layer,
)
from .llm_stage_visiontrim import build_language_model, generation_cache, llm_stage_inputs
from .modeling_visiontrim_utils import (
    EncodeMediaFirstMixin,
    VisionTrimEncoderOutput,
    VisionTrimGenerationMixin,
    signature_of,
    with_guidance_inputs,
)


# CLIP's initial temperature, log(1 / 0.07); trained CLIP checkpoints bring their own value.
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


class VisionTrimModelMixin(EncodeMediaFirstMixin):
    """
    What VisionTrim adds to a LLaVA-family base model: the CLIP text tower (`guidance_encoder`), CLIP's
    `visual_projection` and `logit_scale` (named so a `CLIPModel`'s weights map one to one), DVTS + TGVC on a batch of
    crops or frames (`compress`), and a `forward` that encodes the media with their guidance before the LLM runs.
    """

    config: VisionTrimSettings

    def init_visiontrim_modules(self, config: VisionTrimSettings) -> None:
        self.language_model = build_language_model(config)
        self.guidance_encoder = CLIPTextModelWithProjection(config.guidance_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        self.guidance_cache = GuidanceEmbeddingCache(config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisionTrimModelMixin):
            for name in ("logit_scale", "video_logit_scale"):
                if hasattr(module, name):
                    init.constant_(getattr(module, name), CLIP_LOGIT_SCALE_INIT)

    def vision_tower_for(self, modality: str) -> nn.Module:
        """The tower that encodes `modality` ("image" or "video")."""
        return self.vision_tower

    def clip_head(self, modality: str) -> tuple[nn.Module, torch.Tensor]:
        """The CLIP `visual_projection` and `logit_scale` that pair the `modality` tower's features with the text."""
        return self.visual_projection, self.logit_scale

    def media_crops(
        self, modality: str, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """
        The `(crops, 3, height, width)` pixels to compress and how many consecutive crops each image (frames each
        video) has: an image is one crop; a video `(videos, frames, 3, height, width)` gives its frames.
        """
        if modality == "image":
            return pixel_values, [1] * pixel_values.shape[0]
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values_videos of shape {tuple(pixel_values.shape)}: expected (videos, frames, channels, "
                "height, width); the videos of one batch need the same number of frames."
            )
        videos, frames = pixel_values.shape[:2]
        return pixel_values.flatten(0, 1), [frames] * videos

    def compress(
        self,
        modality: str,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None,
        vision_feature_layer: int,
        vision_feature_select_strategy: str,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
        **tower_kwargs,
    ) -> tuple[VisionTowerRun, CompressedCrops]:
        """Runs the `modality` tower on every crop (or frame) and compresses each to `config.visual_tokens` tokens."""
        layer_index = vision_attention_layer(
            vision_feature_layer,
            vision_feature_select_strategy,
            self.config.vision_config.num_hidden_layers,
            type(self.config).__name__,
        )
        crops, crops_per_unit = self.media_crops(modality, pixel_values, image_sizes)
        run = run_vision_tower(
            self.vision_tower_for(modality), crops, vision_feature_layer, layer_index, **tower_kwargs
        )
        compressed = compress_crops(
            run,
            self.config,
            *self.clip_head(modality),
            self.guidance_encoder,
            guidance_input_ids,
            guidance_attention_mask,
            crops_per_unit,
            "guidance" if modality == "image" else "video_guidance",
            self.guidance_cache if self.config.guidance_cache_size > 0 else None,
        )
        return run, compressed

    def image_pooler_output(self, features: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """The `(images, visual_tokens, text_hidden)` projected images, laid out as the stock class does: per image."""
        return list(features)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, 3, height, width)` pixels and keeps `config.visual_tokens` tokens per image (DVTS + TGVC,
        guided by the `(images, text)` guidance), projected to the LLM width. With compression off
        (`reduction_ratio=0`) this is the stock class's `get_image_features`.
        """
        if not self.config.compression_enabled:
            if image_sizes is not None:  # as stock LLaVA: only towers that take it are given it
                kwargs["image_sizes"] = image_sizes
            return super().get_image_features(
                pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        if image_sizes is not None:
            raise ValueError(
                "`image_sizes` is for variable-resolution vision towers; VisionTrim compresses fixed-size crops of "
                "the tower's resolution only: leave `image_sizes` unset."
            )
        run, compressed = self.compress(
            "image",
            pixel_values,
            None,
            vision_feature_layer,
            vision_feature_select_strategy,
            guidance_input_ids,
            guidance_attention_mask,
            **kwargs,
        )
        return self.encoder_output(
            run, compressed, self.image_pooler_output(self.multi_modal_projector(compressed.features))
        )

    def language_model_inputs(self, inputs: dict) -> dict:
        """With the LLM stage on, the positions of the visual tokens for the decoder (`llm_stage_inputs`)."""
        newline = getattr(self, "image_newline", None)
        encoded = inputs.get("mm_encoder_outputs") or {}
        image_features = None
        if newline is not None and self.config.llm_stage_enabled and encoded.get("image") is not None:
            image_features = torch.cat(list(encoded["image"].pooler_output))
        return llm_stage_inputs(
            inputs.get("input_ids"), inputs.get("inputs_embeds"), image_features, newline, self.config
        )

    def describe_budget(self, modality: str) -> str:
        if modality == "video":
            return f"{self.config.visual_tokens} per video frame"
        return self.config.describe_budget()


class AnyresModelMixin(VisionTrimModelMixin):
    """
    VisionTrim's anyres image path, shared by the LLaVA-NeXT and LLaVA-NeXT-Video base models: every crop of an image
    (base view first, then the high-res crops in raster order) becomes `config.visual_tokens` DVTS + TGVC tokens,
    followed by `image_newline` when `config.crop_newline` is set.
    """

    config: AnyresSettings

    def init_visiontrim_modules(self, config: AnyresSettings) -> None:
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        super().init_visiontrim_modules(config)

    def media_crops(
        self, modality: str, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """An image's crops: the base view and the high-res grid its size picks from `config.image_grid_pinpoints`."""
        if modality == "video":
            return super().media_crops(modality, pixel_values)
        crops_per_image = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]
        if pixel_values.dim() == 4:  # already concatenated
            return pixel_values, crops_per_image
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, crops, channels, height, "
                "width) or (crops, channels, height, width)."
            )
        if pixel_values.shape[0] != len(crops_per_image):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(crops_per_image)}: pass "
                "the image_sizes the processor returned with the pixels."
            )
        crops = [pixels[:count] for pixels, count in zip(pixel_values, crops_per_image, strict=True)]
        return torch.cat(crops, dim=0), crops_per_image

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, max_crops, 3, height, width)` anyres pixels (or their `(crops, 3, height, width)`
        concatenation) and compresses every crop to `config.visual_tokens` tokens, all crops of an image guided by its
        `(images, text)` guidance. Each image gives `crops * (visual_tokens + crop_newline)` tokens, base crop first.
        With compression off this is stock LLaVA-NeXT's (unpadding and newline per row included).
        """
        if not self.config.compression_enabled:  # the stock class's, past VisionTrimModelMixin's one-crop override
            return super(VisionTrimModelMixin, self).get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        run, compressed = self.compress(
            "image",
            pixel_values,
            image_sizes,
            vision_feature_layer,
            vision_feature_select_strategy,
            guidance_input_ids,
            guidance_attention_mask,
            **kwargs,
        )
        per_image = anyres_image_tokens(
            self.multi_modal_projector(compressed.features),
            compressed.crops_per_unit,
            self.image_newline if self.config.crop_newline else None,
        )
        return self.encoder_output(run, compressed, per_image)


class VideoModelMixin(VisionTrimModelMixin):
    """
    VisionTrim's video path, shared by the Video-LLaVA and LLaVA-NeXT-Video base models: every frame is compressed on
    its own, like an image, to `config.visual_tokens` tokens, all frames of a video guided by its question.
    """

    def video_pooler_output(self, features: torch.Tensor, videos: int, frames: int) -> torch.Tensor:
        """The `(videos * frames, visual_tokens, text_hidden)` projected frames, laid out as the stock class does."""
        return features

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(videos, frames, 3, height, width)` pixels and keeps `config.visual_tokens` tokens per frame (the CLS
        token dropped: DVTS scores by it), all frames of a video guided by its `(videos, text)` guidance. With
        compression off this is the stock class's `get_video_features`.
        """
        if not self.config.compression_enabled:
            stock = super().get_video_features
            if "vision_feature_select_strategy" in signature_of(stock.__func__).parameters:
                kwargs["vision_feature_select_strategy"] = vision_feature_select_strategy
            return stock(pixel_values_videos, vision_feature_layer=vision_feature_layer, **kwargs)
        run, compressed = self.compress(
            "video",
            pixel_values_videos,
            None,
            vision_feature_layer,
            vision_feature_select_strategy,
            video_guidance_input_ids,
            video_guidance_attention_mask,
            **kwargs,
        )
        features = self.multi_modal_projector(compressed.features)
        return self.encoder_output(run, compressed, self.video_pooler_output(features, *pixel_values_videos.shape[:2]))


class LlavaGenerationMixin(VisionTrimGenerationMixin):
    """What the LLaVA-family generation classes add for the LLM stage: its cache, and the prompt's length."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """
        `GenerationMixin`'s, with an `LlmStageCache` in place of the `DynamicCache` it makes while the LLM stage is on
        (the cache holds what the stage kept of the prompt); a cache passed in is used as it is.
        """
        passed_in = model_kwargs.get("cache") is not None
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if not passed_in and "cache" in model_kwargs:
            model_kwargs["cache"] = generation_cache(model_kwargs["cache"], self.config)

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict:
        """
        `GenerationMixin`'s update, plus the prompt's length for the LLM stage (`llm_stage_prompt_length`, taken from
        the attention mask after the first step): `generate(use_cache=False)` recomputes the whole sequence at every
        step, and the generated tokens must not rank the visual tokens (decode steps never re-prune).
        """
        attention_mask = model_kwargs.get("attention_mask")
        if self.config.llm_stage_enabled and attention_mask is not None:
            model_kwargs.setdefault("llm_stage_prompt_length", attention_mask.shape[1])
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )


class VisionTrimLlavaModel(VisionTrimModelMixin, LlavaModel):
    """`LlavaModel` whose image features are the DVTS + TGVC tokens of each image, `config.visual_tokens` per image."""

    config: VisionTrimLlavaConfig

    def __init__(self, config: VisionTrimLlavaConfig):
        PreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.init_visiontrim_modules(config)
        self.post_init()


class VisionTrimLlavaForConditionalGeneration(LlavaGenerationMixin, LlavaForConditionalGeneration):
    """
    LLaVA-1.5 with VisionTrim: the LLM sees `config.visual_tokens` tokens per image (DVTS-selected dominant tokens,
    then TGVC-merged question-relevant tokens) instead of every patch token. Inputs come from `VisionTrimProcessor`.
    """

    config: VisionTrimLlavaConfig
    base_model_class = VisionTrimLlavaModel
    forward = with_guidance_inputs(LlavaForConditionalGeneration.forward, "image")


class VisionTrimLlavaNextModel(AnyresModelMixin, LlavaNextModel):
    """
    `LlavaNextModel` whose image features are, per crop (base view first, then the high-res crops in raster order),
    the `config.visual_tokens` DVTS + TGVC tokens followed by `image_newline` when `config.crop_newline` is set.
    """

    config: VisionTrimLlavaNextConfig

    def __init__(self, config: VisionTrimLlavaNextConfig):
        PreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        self.init_visiontrim_modules(config)
        self.post_init()


class VisionTrimLlavaNextForConditionalGeneration(LlavaGenerationMixin, LlavaNextForConditionalGeneration):
    """
    LLaVA-NeXT (anyres) with VisionTrim: every crop of an image (base view and high-res crops) is compressed to
    `config.visual_tokens` tokens by DVTS + TGVC, guided by the image's question. Inputs come from
    `VisionTrimLlavaNextProcessor`.
    """

    config: VisionTrimLlavaNextConfig
    base_model_class = VisionTrimLlavaNextModel
    forward = with_guidance_inputs(LlavaNextForConditionalGeneration.forward, "image")


class VisionTrimVideoLlavaModel(VideoModelMixin, VideoLlavaModel):
    """
    `VideoLlavaModel` whose image features are `config.visual_tokens` DVTS + TGVC tokens per image (image tower) and
    whose video features are `config.visual_tokens` tokens per frame (video tower). The guidance text tower is the
    video encoder's (LanguageBind's); each tower has its own CLIP head: `visual_projection` / `logit_scale` for the
    image tower, `video_visual_projection` / `video_logit_scale` for the video tower.
    """

    config: VisionTrimVideoLlavaConfig

    def __init__(self, config: VisionTrimVideoLlavaConfig):
        PreTrainedModel.__init__(self, config)
        self.video_tower = AutoModel.from_config(config.vision_config)
        self.image_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VideoLlavaMultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.init_visiontrim_modules(config)
        self.video_visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.video_logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        self.post_init()

    def vision_tower_for(self, modality: str) -> nn.Module:
        return self.video_tower if modality == "video" else self.image_tower

    def clip_head(self, modality: str) -> tuple[nn.Module, torch.Tensor]:
        if modality == "video":
            return self.video_visual_projection, self.video_logit_scale
        return super().clip_head(modality)

    def image_pooler_output(self, features: torch.Tensor) -> torch.Tensor:
        """`(images, visual_tokens, text_hidden)`, as stock Video-LLaVA lays out its image features."""
        return features


class VisionTrimVideoLlavaForConditionalGeneration(LlavaGenerationMixin, VideoLlavaForConditionalGeneration):
    """
    Video-LLaVA with VisionTrim: each image and each video frame is compressed to `config.visual_tokens` tokens by
    DVTS + TGVC, guided by its prompt's question. Inputs come from `VisionTrimVideoLlavaProcessor`.
    """

    config: VisionTrimVideoLlavaConfig
    base_model_class = VisionTrimVideoLlavaModel
    forward = with_guidance_inputs(VideoLlavaForConditionalGeneration.forward, "image", "video")


class VisionTrimLlavaNextVideoModel(VideoModelMixin, AnyresModelMixin, LlavaNextVideoModel):
    """
    `LlavaNextVideoModel` with VisionTrim: images are compressed per crop as in `VisionTrimLlavaNextModel`; each video
    frame is compressed on its full patch grid to `config.visual_tokens` tokens, and the spatial pooling
    (`vision_resampler`) is skipped: a set of selected, merged tokens has no grid to pool. A video of `f` frames gives
    `f * visual_tokens` tokens (stock: `f * 144`).
    """

    config: VisionTrimLlavaNextVideoConfig

    def __init__(self, config: VisionTrimLlavaNextVideoConfig):
        PreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextVideoMultiModalProjector(config)
        self.vision_resampler = LlavaNextVideoPooler(config)
        self.init_visiontrim_modules(config)
        self.post_init()

    def video_pooler_output(self, features: torch.Tensor, videos: int, frames: int) -> torch.Tensor:
        """`(videos, frames * visual_tokens, text_hidden)`, as stock LLaVA-NeXT-Video lays out its pooled frames."""
        return features.unflatten(0, (videos, frames)).flatten(1, 2)


class VisionTrimLlavaNextVideoForConditionalGeneration(LlavaGenerationMixin, LlavaNextVideoForConditionalGeneration):
    """
    LLaVA-NeXT-Video with VisionTrim: image crops and video frames are each compressed to `config.visual_tokens`
    tokens by DVTS + TGVC, guided by their prompt's question. Inputs come from `VisionTrimLlavaNextVideoProcessor`.
    """

    config: VisionTrimLlavaNextVideoConfig
    base_model_class = VisionTrimLlavaNextVideoModel
    forward = with_guidance_inputs(LlavaNextVideoForConditionalGeneration.forward, "image", "video")


# Custom classes skip Transformers' llava-hf key renaming unless it is registered for them: without this, a llava-hf
# checkpoint would load with a randomly initialised LLM.
for model_class, stock_model_type in (
    (VisionTrimLlavaForConditionalGeneration, "llava"),
    (VisionTrimLlavaNextForConditionalGeneration, "llava_next"),
    (VisionTrimVideoLlavaForConditionalGeneration, "video_llava"),
    (VisionTrimLlavaNextVideoForConditionalGeneration, "llava_next_video"),
):
    register_checkpoint_conversion_mapping(
        model_class.__name__, get_checkpoint_conversion_mapping(stock_model_type), overwrite=True
    )
    model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "VisionTrimEncoderOutput",
    "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaModel",
    "VisionTrimLlavaNextForConditionalGeneration",
    "VisionTrimLlavaNextModel",
    "VisionTrimLlavaNextVideoForConditionalGeneration",
    "VisionTrimLlavaNextVideoModel",
    "VisionTrimModelMixin",
    "VisionTrimVideoLlavaForConditionalGeneration",
    "VisionTrimVideoLlavaModel",
]
