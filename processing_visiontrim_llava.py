# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Processors for VisionTrim LLaVA models (LLaVA, LLaVA-NeXT, Video-LLaVA, LLaVA-NeXT-Video): as many image and video
placeholders as the model keeps, and the CLIP-tokenised guidance text of each image and video.
"""

import json

from transformers import (
    CLIPTokenizer,
    LlavaNextProcessor,
    LlavaNextVideoProcessor,
    LlavaProcessor,
    VideoLlavaProcessor,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import CONFIG_NAME, cached_file

from .configuration_visiontrim import DEFAULT_REDUCTION_RATIO, visual_tokens_per_crop
from .processing_visiontrim import HUB_KWARGS, CropBudgetProcessingMixin, GuidanceProcessingMixin


class GuidanceTokenizerAttribute(ProcessorMixin):
    """
    Comes after the stock processor class in a VisionTrim processor's bases, so that the stock `__init__`'s call to
    `ProcessorMixin.__init__` also hands over `guidance_tokenizer` (set on the processor first): a sub-processor of its
    own, saved in `guidance_tokenizer/`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, guidance_tokenizer=self.guidance_tokenizer, **kwargs)


class LlavaProcessingMixin(CropBudgetProcessingMixin, GuidanceProcessingMixin):
    """
    What VisionTrim processors add to the stock LLaVA ones: the CLIP `guidance_tokenizer`, the per-crop budget
    (`CropBudgetProcessingMixin`) and placeholders for the kept tokens only. A processor's `__init__` sets the
    guidance tokenizer, calls the stock `__init__` with its own arguments, then sets the budget.
    """

    def set_guidance_tokenizer(self, guidance_tokenizer, guidance_max_length: int, empty_guidance: str) -> None:
        """
        Sets the guidance settings; refuses anything but a CLIP tokenizer (Transformers loads the LLM tokenizer if
        its folder is missing) and an unknown `empty_guidance`.
        """
        self.set_empty_guidance(empty_guidance)
        if not isinstance(guidance_tokenizer, CLIPTokenizer):
            raise ValueError(
                f"{type(self).__name__} needs `guidance_tokenizer`: the CLIPTokenizer of the CLIP model whose text "
                "tower the VisionTrim model holds (saved in the `guidance_tokenizer/` folder), got "
                f"{type(guidance_tokenizer).__name__}."
            )
        self.guidance_tokenizer = guidance_tokenizer
        self.guidance_max_length = guidance_max_length

    @property
    def num_patches(self) -> int:
        """Patch tokens per crop: `(crop height // patch) * (crop width // patch)`."""
        crop_size = self.image_processor.crop_size
        return (crop_size["height"] // self.patch_size) * (crop_size["width"] // self.patch_size)

    @property
    def media_tokens(self) -> tuple[str, ...]:
        """The placeholders of the media this processor takes: `<image>`, and `<video>` for the video processors."""
        return (self.image_token, self.video_token) if hasattr(self, "video_token") else (self.image_token,)

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        names += ["guidance_input_ids", "guidance_attention_mask"]
        if hasattr(self, "video_processor"):
            names += self.video_processor.model_input_names
            names += ["video_guidance_input_ids", "video_guidance_attention_mask"]
        return names

    def crop_tokens(self, crop_size: tuple[int, int]) -> int:
        """Tokens kept of one crop (or video frame) of `crop_size` (height, width) when compressing."""
        crop_height, crop_width = crop_size
        num_patches = (crop_height // self.patch_size) * (crop_width // self.patch_size)
        return visual_tokens_per_crop(num_patches, self.reduction_ratio)

    def compressed_image_tokens(self, image_size: tuple[int, int], crop_size: tuple[int, int]) -> int:
        """Placeholders of an image when compressing: the tokens of its one crop."""
        return self.crop_tokens(crop_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        crop_size = tuple(image_inputs["pixel_values"][image_idx].shape[-2:])
        image_size = image_inputs["image_sizes"][image_idx] if "image_sizes" in image_inputs else crop_size
        image_size = image_size.tolist() if hasattr(image_size, "tolist") else image_size
        return self.image_token * self.compressed_image_tokens(tuple(image_size), crop_size)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        multimodal_data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None and self.reduction_ratio > 0:
            crop_size = (self.image_processor.crop_size["height"], self.image_processor.crop_size["width"])
            multimodal_data.num_image_tokens = [
                self.compressed_image_tokens(tuple(size), crop_size) for size in image_sizes
            ]
        return multimodal_data

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        frames = video_inputs["pixel_values_videos"][video_idx]
        return self.video_token * frames.shape[0] * self.crop_tokens(frames.shape[-2:])


class AnyresProcessingMixin(LlavaProcessingMixin):
    """
    The anyres image counts of the LLaVA-NeXT and LLaVA-NeXT-Video processors: an image becomes `crops *
    (visual_tokens + crop_newline)` placeholders, its crops (the base view plus the high-res grid chosen from
    `image_grid_pinpoints`) following from its size alone. Loading checks the pinpoints against the model's config.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`, then the pinpoints check against the `config.json` beside the files."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        config_file = cached_file(
            pretrained_model_name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if config_file is not None:
            with open(config_file, encoding="utf-8") as reader:
                model_pinpoints = json.load(reader).get("image_grid_pinpoints")
            processor.check_pinpoints(model_pinpoints)
        return processor

    def check_pinpoints(self, model_pinpoints: list[list[int]] | None) -> None:
        """Raises a `ValueError` unless the image processor's `image_grid_pinpoints` equal the model config's."""
        processor_pinpoints = [list(pinpoint) for pinpoint in self.image_processor.image_grid_pinpoints]
        if model_pinpoints is not None and processor_pinpoints != [list(pinpoint) for pinpoint in model_pinpoints]:
            raise ValueError(
                f"The image processor's image_grid_pinpoints {processor_pinpoints} differ from the model config's "
                f"{model_pinpoints}: the processor would count other crops than the model encodes. Make "
                "`image_grid_pinpoints` equal in processor_config.json (image_processor) and config.json."
            )

    def num_crops(self, image_size: tuple[int, int], crop_size: tuple[int, int]) -> int:
        """Crops of an image of `image_size`: the base view plus the grid of its best pinpoint resolution."""
        best_height, best_width = select_best_resolution(list(image_size), self.image_processor.image_grid_pinpoints)
        return (best_height // crop_size[0]) * (best_width // crop_size[1]) + 1

    def compressed_image_tokens(self, image_size: tuple[int, int], crop_size: tuple[int, int]) -> int:
        """Placeholders of an image when compressing: `crops * (visual_tokens + crop_newline)`."""
        return self.num_crops(image_size, crop_size) * (self.crop_tokens(crop_size) + int(self.crop_newline))


class VisionTrimProcessor(LlavaProcessingMixin, LlavaProcessor, GuidanceTokenizerAttribute):
    r"""
    A LLaVA processor for VisionTrim models. It expands each `<image>` into the number of tokens the model keeps per
    image (`visual_tokens`, from `reduction_ratio`) and adds each image's guidance text, CLIP-tokenised, as
    `guidance_input_ids` / `guidance_attention_mask` `(images, text)`: one row per image, the guidance of the prompt
    the image belongs to.

    Args:
        image_processor: the LLaVA image processor.
        tokenizer: the LLM tokenizer.
        guidance_tokenizer ([`CLIPTokenizer`]): the tokenizer of the CLIP text tower (saved in `guidance_tokenizer/`).
        patch_size, vision_feature_select_strategy, chat_template, image_token, num_additional_image_tokens:
            as in [`LlavaProcessor`].
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Must equal the model's `config.reduction_ratio`; 0 emits every patch token, like stock LLaVA.
        visual_tokens (`int`, *optional*):
            Tokens kept per image, instead of `reduction_ratio` (stored as the ratio).
        guidance_max_length (`int`, defaults to 77):
            Guidance texts are truncated to this many CLIP tokens (the CLIP text tower's positions).
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            The model's `config.empty_guidance`: with `"error"`, an image-only prompt is refused here, before the model
            runs.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        guidance_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        visual_tokens=None,
        guidance_max_length=77,
        empty_guidance="cls_similarity",
        **kwargs,
    ):
        self.set_guidance_tokenizer(guidance_tokenizer, guidance_max_length, empty_guidance)
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
        )
        self.set_budget(reduction_ratio, visual_tokens)


class VisionTrimLlavaNextProcessor(AnyresProcessingMixin, LlavaNextProcessor, GuidanceTokenizerAttribute):
    r"""
    A LLaVA-NeXT (anyres) processor for VisionTrim models. Each `<image>` becomes `crops * (visual_tokens +
    crop_newline)` placeholders, where `crops` (the base view plus the high-res grid chosen from
    `image_grid_pinpoints`) follows from the image size alone; the guidance is added as in [`VisionTrimProcessor`].

    Args:
        image_processor: the LLaVA-NeXT image processor (its `image_grid_pinpoints` must equal the model config's).
        tokenizer, guidance_tokenizer, reduction_ratio, visual_tokens, guidance_max_length, empty_guidance:
            as in [`VisionTrimProcessor`]; `visual_tokens` is per crop.
        patch_size, vision_feature_select_strategy, chat_template, image_token, num_additional_image_tokens:
            as in [`LlavaNextProcessor`].
        crop_newline (`bool`, defaults to `True`):
            Must equal the model's `config.crop_newline`: one `image_newline` token after each crop's tokens.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        guidance_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        visual_tokens=None,
        guidance_max_length=77,
        empty_guidance="cls_similarity",
        crop_newline=True,
        **kwargs,
    ):
        self.crop_newline = crop_newline
        self.set_guidance_tokenizer(guidance_tokenizer, guidance_max_length, empty_guidance)
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
        )
        self.set_budget(reduction_ratio, visual_tokens)


class VisionTrimVideoLlavaProcessor(LlavaProcessingMixin, VideoLlavaProcessor, GuidanceTokenizerAttribute):
    r"""
    A Video-LLaVA processor for VisionTrim models: each `<image>` becomes `visual_tokens` placeholders and each
    `<video>` `frames * visual_tokens` (stock: 256 and `frames * 257`); the guidance of each image and each video is
    added as in [`VisionTrimProcessor`] (`video_guidance_input_ids` / `video_guidance_attention_mask` for videos).

    Args:
        image_processor: the Video-LLaVA image processor.
        video_processor ([`VisionTrimVideoProcessor`] or Video-LLaVA's): turns sampled frames into pixels.
        tokenizer, guidance_tokenizer, reduction_ratio, visual_tokens, guidance_max_length, empty_guidance:
            as in [`VisionTrimProcessor`]; `visual_tokens` is per image and per frame.
        patch_size, vision_feature_select_strategy, chat_template, image_token, video_token,
        num_additional_image_tokens: as in [`VideoLlavaProcessor`].
    """

    # Images come back as `pixel_values` (the name the models take), not the deprecated `pixel_values_images`.
    images_kwargs = {"return_tensors": "pt", "return_legacy_image_output": False}

    def __init__(
        self,
        image_processor=None,
        video_processor=None,
        tokenizer=None,
        guidance_tokenizer=None,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        num_additional_image_tokens=1,
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        visual_tokens=None,
        guidance_max_length=77,
        empty_guidance="cls_similarity",
        **kwargs,
    ):
        self.set_guidance_tokenizer(guidance_tokenizer, guidance_max_length, empty_guidance)
        super().__init__(
            image_processor=image_processor,
            video_processor=video_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            num_additional_image_tokens=num_additional_image_tokens,
        )
        self.set_budget(reduction_ratio, visual_tokens)


class VisionTrimLlavaNextVideoProcessor(AnyresProcessingMixin, LlavaNextVideoProcessor, GuidanceTokenizerAttribute):
    r"""
    A LLaVA-NeXT-Video processor for VisionTrim models: each `<image>` becomes `crops * (visual_tokens +
    crop_newline)` placeholders as in [`VisionTrimLlavaNextProcessor`], and each `<video>` `frames * visual_tokens`
    (the frames' full patch grids compressed, unpooled; stock: `frames * 144`).

    Args:
        video_processor ([`VisionTrimVideoProcessor`] or LLaVA-NeXT-Video's): turns sampled frames into pixels.
        image_processor: the LLaVA-NeXT image processor.
        tokenizer, guidance_tokenizer, reduction_ratio, visual_tokens, guidance_max_length, empty_guidance,
        crop_newline:
            as in [`VisionTrimLlavaNextProcessor`]; `visual_tokens` is per crop and per frame.
        patch_size, vision_feature_select_strategy, chat_template, image_token, video_token,
        num_additional_image_tokens: as in [`LlavaNextVideoProcessor`].
    """

    def __init__(
        self,
        video_processor=None,
        image_processor=None,
        tokenizer=None,
        guidance_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        num_additional_image_tokens=0,
        reduction_ratio=DEFAULT_REDUCTION_RATIO,
        visual_tokens=None,
        guidance_max_length=77,
        empty_guidance="cls_similarity",
        crop_newline=True,
        **kwargs,
    ):
        self.crop_newline = crop_newline
        self.set_guidance_tokenizer(guidance_tokenizer, guidance_max_length, empty_guidance)
        super().__init__(
            video_processor=video_processor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            num_additional_image_tokens=num_additional_image_tokens,
        )
        self.set_budget(reduction_ratio, visual_tokens)


for processor_class in (
    VisionTrimProcessor,
    VisionTrimLlavaNextProcessor,
    VisionTrimVideoLlavaProcessor,
    VisionTrimLlavaNextVideoProcessor,
):
    processor_class.register_for_auto_class("AutoProcessor")

__all__ = [
    "AnyresProcessingMixin",
    "GuidanceTokenizerAttribute",
    "LlavaProcessingMixin",
    "VisionTrimLlavaNextProcessor",
    "VisionTrimLlavaNextVideoProcessor",
    "VisionTrimProcessor",
    "VisionTrimVideoLlavaProcessor",
]
