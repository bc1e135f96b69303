# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""Processor for VisionTrim LLaVA: as many image placeholders as the model keeps, and CLIP-tokenised guidance text."""

import json

from transformers import CLIPTokenizer, LlavaNextProcessor, LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import CONFIG_NAME, cached_file

from .configuration_visiontrim import check_reduction_ratio, reduction_ratio_for_tokens, visual_tokens_per_crop


# `from_pretrained` arguments that locate files (used to find the model's config.json beside the processor's files).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")

# Chat-role markers of the LLaVA families' prompt formats (Vicuna, Mistral/Llama-2, ChatML, Llama-3, ...).
USER_TURN_MARKERS = (
    "USER:",
    "[INST]",
    "<|im_start|>user",
    "<|start_header_id|>user<|end_header_id|>",
    "<|user|>",
    "Human:",
)
TURN_END_MARKERS = (
    "ASSISTANT:",
    "[/INST]",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|assistant|>",
    "Assistant:",
    "</s>",
)


def guidance_from_prompt(prompt: str, image_token: str) -> str:
    """
    The question of a prompt: the text of its last user turn, without image markers, chat role tags or extra spaces.
    `"USER: <image>\\nWhat is shown? ASSISTANT:"` gives `"What is shown?"`; a prompt without role tags is kept whole.
    """
    turn_start = max(
        (prompt.rfind(marker) + len(marker) for marker in USER_TURN_MARKERS if marker in prompt), default=0
    )
    turn = prompt[turn_start:]
    turn_end = min((turn.find(marker) for marker in TURN_END_MARKERS if marker in turn), default=len(turn))
    return " ".join(turn[:turn_end].replace(image_token, " ").split())


class GuidanceProcessingMixin:
    """
    What VisionTrim processors add to the stock LLaVA ones: the CLIP `guidance_tokenizer`, the budget
    (`reduction_ratio`) and, when there are images, `guidance_input_ids` / `guidance_attention_mask` `(images, text)`:
    one row per image, the guidance of the prompt the image belongs to.
    """

    def init_processor(
        self,
        image_processor,
        tokenizer,
        guidance_tokenizer,
        patch_size: int | None,
        vision_feature_select_strategy: str | None,
        chat_template: str | None,
        image_token: str,
        num_additional_image_tokens: int,
        reduction_ratio: float,
        visual_tokens: int | None,
        guidance_max_length: int,
    ) -> None:
        """The stock LLaVA processors' `__init__`, plus the guidance tokenizer and the budget."""
        self.check_guidance_tokenizer(guidance_tokenizer)
        self.guidance_max_length = guidance_max_length
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
        self.image_token_id = (
            tokenizer.image_token_id
            if getattr(tokenizer, "image_token_id", None)
            else tokenizer.convert_tokens_to_ids(self.image_token)
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, guidance_tokenizer, chat_template=chat_template)
        self.init_budget(reduction_ratio, visual_tokens)

    def check_guidance_tokenizer(self, guidance_tokenizer) -> None:
        """Refuses anything but a CLIP tokenizer (Transformers loads the LLM tokenizer if its folder is missing)."""
        if not isinstance(guidance_tokenizer, CLIPTokenizer):
            raise ValueError(
                f"{type(self).__name__} needs `guidance_tokenizer`: the CLIPTokenizer of the CLIP model whose text "
                "tower the VisionTrim model holds (saved in the `guidance_tokenizer/` folder), got "
                f"{type(guidance_tokenizer).__name__}."
            )

    def init_budget(self, reduction_ratio: float, visual_tokens: int | None) -> None:
        """Sets `reduction_ratio` (from `visual_tokens` when given), checked against the crop's patch count."""
        if visual_tokens is not None:
            reduction_ratio = reduction_ratio_for_tokens(visual_tokens, self.num_patches, type(self).__name__)
        check_reduction_ratio(reduction_ratio, self.num_patches, type(self).__name__)
        self.reduction_ratio = reduction_ratio

    @property
    def num_patches(self) -> int:
        """Patch tokens per crop: `(crop height // patch) * (crop width // patch)`."""
        crop_size = self.image_processor.crop_size
        return (crop_size["height"] // self.patch_size) * (crop_size["width"] // self.patch_size)

    @property
    def visual_tokens(self) -> int:
        """Tokens kept per crop when compressing (read-only: set `reduction_ratio`)."""
        return visual_tokens_per_crop(self.num_patches, self.reduction_ratio)

    @property
    def model_input_names(self) -> list[str]:
        guidance_names = ["guidance_input_ids", "guidance_attention_mask"]
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + guidance_names

    def __call__(self, images=None, text=None, guidance_text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """
        The stock processor's `__call__` plus, when there are images, `guidance_input_ids` / `guidance_attention_mask`.

        guidance_text (`str` or `list[str]`, *optional*):
            The text that guides TGVC, one per prompt; by default the question of each prompt (its last user turn,
            without image markers and role tags). An empty text gives an all-zero mask row (see the model's
            `config.empty_guidance`).
        """
        encoding = super().__call__(images=images, text=text, **kwargs)
        if images is None:
            return encoding
        prompts = [text] if isinstance(text, str) else list(text or [])
        # One guidance row per image: the guidance of the prompt it belongs to (images without prompts: one each).
        images_per_prompt = [prompt.count(self.image_token) for prompt in prompts] or [1] * len(
            encoding["pixel_values"]
        )
        if guidance_text is None:
            if not prompts:
                raise ValueError(
                    "Pass `text` (the prompts) or `guidance_text=` with the images: TGVC needs a question."
                )
            guidance_text = [guidance_from_prompt(prompt, self.image_token) for prompt in prompts]
        elif isinstance(guidance_text, str):
            guidance_text = [guidance_text]
        if len(guidance_text) != len(images_per_prompt):
            raise ValueError(
                f"`guidance_text` has {len(guidance_text)} entries but there are {len(images_per_prompt)} "
                f"{'prompts' if prompts else 'images'}: give one per {'prompt' if prompts else 'image'}."
            )
        rows = [
            guidance for guidance, count in zip(guidance_text, images_per_prompt, strict=True) for _ in range(count)
        ]
        guidance = self.guidance_tokenizer(
            rows, padding="longest", truncation=True, max_length=self.guidance_max_length, padding_side="right"
        )
        masks = [
            mask if row.strip() else [0] * len(mask)
            for row, mask in zip(rows, guidance["attention_mask"], strict=True)
        ]
        return_tensors = kwargs.get("return_tensors", kwargs.get("text_kwargs", {}).get("return_tensors"))
        encoding.update(
            BatchFeature(
                {"guidance_input_ids": guidance["input_ids"], "guidance_attention_mask": masks},
                tensor_type=return_tensors,
            )
        )
        return encoding


class VisionTrimProcessor(GuidanceProcessingMixin, LlavaProcessor):
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
        reduction_ratio=1 - 64 / 576,
        visual_tokens=None,
        guidance_max_length=77,
        **kwargs,
    ):
        self.init_processor(
            image_processor,
            tokenizer,
            guidance_tokenizer,
            patch_size,
            vision_feature_select_strategy,
            chat_template,
            image_token,
            num_additional_image_tokens,
            reduction_ratio,
            visual_tokens,
            guidance_max_length,
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        return self.image_token * visual_tokens_per_crop(num_patches, self.reduction_ratio)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        multimodal_data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None and self.reduction_ratio > 0:
            multimodal_data.num_image_tokens = [self.visual_tokens] * len(image_sizes)
        return multimodal_data


class VisionTrimLlavaNextProcessor(GuidanceProcessingMixin, LlavaNextProcessor):
    r"""
    A LLaVA-NeXT (anyres) processor for VisionTrim models. Each `<image>` becomes `crops * (visual_tokens +
    crop_newline)` placeholders, where `crops` (the base view plus the high-res grid chosen from
    `image_grid_pinpoints`) follows from the image size alone; the guidance is added as in [`VisionTrimProcessor`].

    Args:
        image_processor: the LLaVA-NeXT image processor (its `image_grid_pinpoints` must equal the model config's).
        tokenizer, guidance_tokenizer, reduction_ratio, visual_tokens, guidance_max_length:
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
        reduction_ratio=1 - 64 / 576,
        visual_tokens=None,
        guidance_max_length=77,
        crop_newline=True,
        **kwargs,
    ):
        self.crop_newline = crop_newline
        self.init_processor(
            image_processor,
            tokenizer,
            guidance_tokenizer,
            patch_size,
            vision_feature_select_strategy,
            chat_template,
            image_token,
            num_additional_image_tokens,
            reduction_ratio,
            visual_tokens,
            guidance_max_length,
        )

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

    def num_crops(self, height: int, width: int, crop_height: int, crop_width: int) -> int:
        """Crops of an image of `height` x `width`: the base view plus the grid of its best pinpoint resolution."""
        best_height, best_width = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
        return (best_height // crop_height) * (best_width // crop_width) + 1

    def compressed_image_tokens(self, height: int, width: int, crop_height: int, crop_width: int) -> int:
        """Placeholders of an image when compressing: `crops * (visual_tokens + crop_newline)`."""
        return self.num_crops(height, width, crop_height, crop_width) * (self.visual_tokens + int(self.crop_newline))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        image_size = image_inputs["image_sizes"][image_idx]
        height, width = image_size.tolist() if hasattr(image_size, "tolist") else image_size
        crop_height, crop_width = image_inputs["pixel_values"][0][0].shape[-2:]
        return self.image_token * self.compressed_image_tokens(height, width, crop_height, crop_width)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        multimodal_data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None and self.reduction_ratio > 0:
            crop = self.image_processor.crop_size
            multimodal_data.num_image_tokens = [
                self.compressed_image_tokens(height, width, crop["height"], crop["width"])
                for height, width in image_sizes
            ]
        return multimodal_data


VisionTrimProcessor.register_for_auto_class("AutoProcessor")
VisionTrimLlavaNextProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["GuidanceProcessingMixin", "VisionTrimLlavaNextProcessor", "VisionTrimProcessor", "guidance_from_prompt"]
