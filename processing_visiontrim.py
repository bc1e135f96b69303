# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""Processor for VisionTrim LLaVA: as many image placeholders as the model keeps, and CLIP-tokenised guidance text."""

from transformers import CLIPTokenizer, LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .configuration_visiontrim import check_reduction_ratio, reduction_ratio_for_tokens, visual_tokens_per_crop


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


class VisionTrimProcessor(LlavaProcessor):
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
        if not isinstance(guidance_tokenizer, CLIPTokenizer):
            raise ValueError(
                "VisionTrimProcessor needs `guidance_tokenizer`: the CLIPTokenizer of the CLIP model whose text tower "
                f"the VisionTrim model holds (saved in the `guidance_tokenizer/` folder), got "
                f"{type(guidance_tokenizer).__name__}."
            )
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
        self.image_token_id = tokenizer.encode(self.image_token, add_special_tokens=False)[0]
        self.guidance_max_length = guidance_max_length
        ProcessorMixin.__init__(self, image_processor, tokenizer, guidance_tokenizer, chat_template=chat_template)
        if visual_tokens is not None:
            reduction_ratio = reduction_ratio_for_tokens(visual_tokens, self.num_patches, type(self).__name__)
        check_reduction_ratio(reduction_ratio, self.num_patches, type(self).__name__)
        self.reduction_ratio = reduction_ratio

    @property
    def num_patches(self) -> int:
        """Patch tokens per image crop: `(crop height // patch) * (crop width // patch)`."""
        crop_size = self.image_processor.crop_size
        return (crop_size["height"] // self.patch_size) * (crop_size["width"] // self.patch_size)

    @property
    def visual_tokens(self) -> int:
        """Image placeholders per image when compressing (read-only: set `reduction_ratio`)."""
        return visual_tokens_per_crop(self.num_patches, self.reduction_ratio)

    @property
    def model_input_names(self) -> list[str]:
        return (
            self.tokenizer.model_input_names
            + self.image_processor.model_input_names
            + [
                "guidance_input_ids",
                "guidance_attention_mask",
            ]
        )

    def __call__(self, images=None, text=None, guidance_text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """
        [`LlavaProcessor.__call__`] plus, when there are images, `guidance_input_ids` / `guidance_attention_mask`.

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


VisionTrimProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VisionTrimProcessor", "guidance_from_prompt"]
