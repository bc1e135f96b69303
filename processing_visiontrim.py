# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
What every VisionTrim processor shares: the question of each image (video) read from its prompt, tokenised as
`guidance_input_ids` / `guidance_attention_mask`; and what the Qwen families share (`QwenProcessingMixin`: placeholder
counts from the grids, guidance in the LLM's vocabulary). A family's processing file
(`processing_visiontrim_<family>.py`) adds its own placeholder counts and guidance tokenizer.
"""

from collections import OrderedDict

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData
from transformers.utils import logging
from transformers.video_processing_utils import VideoProcessorMixin

from .configuration_visiontrim import (
    DEFAULT_REDUCTION_RATIO,
    check_budgets_agree,
    check_reduction_ratio,
    check_setting,
    qwen_visual_tokens,
    reduction_ratio_for_tokens,
    valid_empty_guidance,
    visual_tokens_per_crop,
)


logger = logging.get_logger(__name__)

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


def guidance_from_prompt(prompt: str, *media_tokens: str) -> str:
    """
    The question of a prompt: the text of its last user turn, without media markers (`media_tokens`, e.g. `<image>`,
    `<video>`), chat role tags or extra spaces. `"USER: <image>\\nWhat is shown? ASSISTANT:"` gives `"What is shown?"`;
    a prompt without role tags is kept whole.
    """
    turn_start = max(
        (prompt.rfind(marker) + len(marker) for marker in USER_TURN_MARKERS if marker in prompt), default=0
    )
    turn = prompt[turn_start:]
    turn_end = min((turn.find(marker) for marker in TURN_END_MARKERS if marker in turn), default=len(turn))
    turn = turn[:turn_end]
    for token in media_tokens:
        turn = turn.replace(token, " ")
    return " ".join(turn.split())


def has_user_turn(prompt: str) -> bool:
    """Whether `prompt` holds a user-turn marker of a chat format `guidance_from_prompt` knows."""
    return any(marker in prompt for marker in USER_TURN_MARKERS)


def unknown_format_warning(question: str) -> str:
    """What to log, once, when a prompt in no known chat format guides TGVC by `question` (its whole text)."""
    shown = question if len(question) <= 80 else f"{question[:80]}..."
    return (
        f"A prompt has no user-turn marker of a chat format VisionTrim knows ({', '.join(USER_TURN_MARKERS)}), so "
        f"TGVC is guided by its whole text without media markers: {shown!r}. If that is not the question, pass "
        "`guidance_text=` with it (vLLM: mm_processor_kwargs={'guidance_text': ...}), or build the prompt with "
        "`processor.apply_chat_template(messages)`."
    )


def question_of_messages(messages: list[dict], *media_tokens: str) -> str:
    """
    The question of a chat: the text parts of its last user message, joined, without the media markers
    (`media_tokens`) a text part may hold (`"<image>\nWhat is it?"`); `""` when it has none, e.g. an image only.
    Content is a string or a list of parts as Transformers' chat templates take them.
    """
    user_messages = [message for message in messages if message.get("role") == "user"]
    if not user_messages:
        return ""
    content = user_messages[-1].get("content") or ""
    if isinstance(content, str):
        text = content
    else:
        text = " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    for token in media_tokens:
        text = text.replace(token, " ")
    return " ".join(text.split())


def to_8_bit(images):
    """
    `images` (one image or nested lists of them) with 16-bit grayscale Pillow images (modes `I;16*`, or `I` with
    values above 255, as PNG loaders give) scaled to 8 bits over their full range [0, 65535]: Pillow's own RGB
    conversion clips every value above 255 to white. Float (`F`) images and values outside 16 bits are refused.
    """
    if isinstance(images, (list, tuple)):
        return [to_8_bit(image) for image in images]
    mode = getattr(images, "mode", None)
    if mode is None or not (mode.startswith("I") or mode == "F"):
        return images
    import numpy
    from PIL import Image

    values = numpy.asarray(images)
    if mode == "F" or values.min() < 0 or values.max() > 65535:
        raise ValueError(
            f"A {mode} image with values in [{values.min()}, {values.max()}]: convert it to 8-bit RGB first (the "
            "processor reads 8-bit images, and 16-bit grayscale ones scaled from [0, 65535])."
        )
    if mode == "I" and values.max() <= 255:
        return images  # 8-bit values: Pillow converts them as they are
    return Image.fromarray((values.astype(numpy.uint32) * 255 // 65535).astype(numpy.uint8))


class VideoProcessorCheckMixin:
    """
    Checks a processor's `video_processor` against `VideoProcessorMixin` directly: Transformers' own check looks it up
    through the video processor registry, which is a torchvision-only placeholder when torchvision is not installed.
    """

    def check_argument_for_proper_class(self, argument_name: str, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(
                    f"Received a {type(argument).__name__} for argument video_processor, but a video processor "
                    "(e.g. VisionTrimVideoProcessor) was expected."
                )
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


class GuidanceProcessingMixin(VideoProcessorCheckMixin):
    """
    What every VisionTrim processor adds to its stock one: when there are images (videos), `guidance_input_ids` /
    `guidance_attention_mask` (`video_guidance_*`) `(images, text)`: one row per image (video), the guidance of the
    prompt it belongs to, tokenised by `guidance_tokenizer`. A family's mixin says how many placeholders an image
    keeps (`replace_image_token`) and which tokenizer the guidance takes.
    """

    # Whether the guidance keeps its tokenizer's special tokens (CLIP's BOS and EOS: the text tower expects them).
    guidance_special_tokens = True
    # How many recent chats' rendered prompts `apply_chat_template` remembers the question of.
    chat_questions_size = 64

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], *args, **kwargs):
        """
        The stock `apply_chat_template`. It also remembers each chat's question (the text of its last user message,
        `question_of_messages`) for its rendered prompt, so that when that prompt comes back to this processor (with
        `tokenize=True`, or from a pipeline) TGVC is guided by the question from the messages, not by the question
        parsed back out of the rendered prompt.
        """
        rendered = super().apply_chat_template(conversation, *args, **{**kwargs, "tokenize": False})
        chats = [conversation] if conversation and isinstance(conversation[0], dict) else list(conversation)
        prompts = [rendered] if isinstance(rendered, str) else list(rendered)
        questions = self.__dict__.setdefault("_chat_questions", OrderedDict())
        for prompt, chat in zip(prompts, chats, strict=True):
            messages = chat.get("messages", []) if isinstance(chat, dict) else chat
            questions[prompt] = question_of_messages(messages, *self.media_tokens)
            questions.move_to_end(prompt)
        while len(questions) > self.chat_questions_size:
            questions.popitem(last=False)
        if not kwargs.get("tokenize", False):
            return rendered
        return super().apply_chat_template(conversation, *args, **kwargs)

    def question_of_prompt(self, prompt: str) -> str:
        """
        The question of a prompt: the one of the chat it was rendered from by `apply_chat_template`, else the last user
        turn parsed out of it (`guidance_from_prompt`). A prompt in no chat format this processor knows guides TGVC
        by its whole text (logged once, with how to pass the question instead).
        """
        chat_questions = self.__dict__.get("_chat_questions", {})
        if prompt in chat_questions:
            return chat_questions[prompt]
        question = guidance_from_prompt(prompt, *self.media_tokens)
        if not has_user_turn(prompt) and not self.__dict__.get("_warned_unknown_format"):
            self._warned_unknown_format = True
            logger.warning(unknown_format_warning(question))
        return question

    def set_empty_guidance(self, empty_guidance: str) -> None:
        """Sets `empty_guidance`, refusing an unknown rule (by the config field's validator) with the field's name."""
        check_setting(valid_empty_guidance, empty_guidance, type(self).__name__, "empty_guidance")
        self.empty_guidance = empty_guidance

    def __call__(
        self, images=None, text=None, videos=None, guidance_text: str | list[str] | None = None, **kwargs
    ) -> BatchFeature:
        """
        The stock processor's `__call__` plus the guidance of each image (`guidance_input_ids` /
        `guidance_attention_mask`, one row per image) and of each video (`video_guidance_input_ids` /
        `video_guidance_attention_mask`, one row per video).

        guidance_text (`str` or `list[str]`, *optional*):
            The text that guides TGVC, one per prompt (without `text`: one per image or video, or one for all); by
            default the question of each prompt (its last user turn, without media markers and role tags). An empty
            text gives an all-zero mask row (see the model's `config.empty_guidance`).
        """
        encoding = super().__call__(images=to_8_bit(images), text=text, videos=videos, **kwargs)
        prompts = [text] if isinstance(text, str) else list(text or [])
        if isinstance(guidance_text, str):
            guidance_text = [guidance_text]
        merged_kwargs = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        return_tensors = merged_kwargs["text_kwargs"].get("return_tensors")
        media = [("pixel_values", self.image_token, "guidance")]
        if hasattr(self, "video_processor"):
            media.append(("pixel_values_videos", self.video_token, "video_guidance"))
        for pixels_name, token, input_name in media:
            if pixels_name in encoding:
                rows = self.guidance_rows(prompts, guidance_text, token, self.num_media(encoding, pixels_name))
                self.check_empty_guidance(rows, token)
                encoding.update(self.tokenize_guidance(rows, input_name, return_tensors))
        return encoding

    def num_media(self, encoding: BatchFeature, pixels_name: str) -> int:
        """How many images (videos) `encoding[pixels_name]` holds: one entry each."""
        return len(encoding[pixels_name])

    def guidance_rows(
        self, prompts: list[str], guidance_text: list[str] | None, token: str, num_items: int
    ) -> list[str]:
        """
        One guidance text per image (or video, `token` being its placeholder): the guidance of the prompt it belongs
        to; items without prompts take one `guidance_text` entry each, or all the same one when it has one entry.
        """
        items_per_prompt = [prompt.count(token) for prompt in prompts] or [1] * num_items
        if guidance_text is None:
            if not prompts:
                raise ValueError(
                    "Pass `text` (the prompts) or `guidance_text=` with the images or videos: TGVC needs a question."
                )
            guidance_text = [self.question_of_prompt(prompt) for prompt in prompts]
        if not prompts and len(guidance_text) == 1:  # one text guides every item
            return guidance_text * num_items
        if len(guidance_text) != len(items_per_prompt):
            unit = "prompt" if prompts else ("video" if token == getattr(self, "video_token", None) else "image")
            raise ValueError(
                f"`guidance_text` has {len(guidance_text)} entries but there are {len(items_per_prompt)} {unit}s: "
                f"give one per {unit}."
            )
        return [
            guidance for guidance, count in zip(guidance_text, items_per_prompt, strict=True) for _ in range(count)
        ]

    def check_empty_guidance(self, rows: list[str], token: str) -> None:
        """With `empty_guidance="error"`, refuses images (videos, `token`) whose guidance text is empty."""
        empty = [index for index, row in enumerate(rows) if not row.strip()]
        if self.empty_guidance == "error" and empty:
            unit = "video" if token == getattr(self, "video_token", None) else "image"
            raise ValueError(
                f"{unit.capitalize()}(s) {empty} have no question (an image-only prompt), and this processor has "
                "empty_guidance='error': add a question to the prompt, pass `guidance_text=`, or load model and "
                "processor with empty_guidance='cls_similarity' (each such image is then guided by its CLS token)."
            )

    def tokenize_guidance(self, rows: list[str], input_name: str, return_tensors: str | None) -> BatchFeature:
        """
        `{input_name}_input_ids` / `{input_name}_attention_mask` of `rows`; an empty row gets an all-zero mask. A row
        longer than `guidance_max_length` CLIP tokens (the text tower's positions) keeps its start, with a warning.
        """
        special = {"add_special_tokens": self.guidance_special_tokens}
        guidance = self.guidance_tokenizer(rows, padding="longest", padding_side="right", **special)
        if len(guidance["input_ids"][0]) > self.guidance_max_length:
            logger.warning_once(
                f"A guidance text is longer than {self.guidance_max_length} CLIP tokens, the CLIP text tower's "
                "positions: TGVC is guided by its first ones only. Put the question first, or pass a shorter "
                "`guidance_text=`."
            )
            guidance = self.guidance_tokenizer(
                rows,
                padding="longest",
                truncation=True,
                max_length=self.guidance_max_length,
                padding_side="right",
                **special,
            )
        input_ids = guidance["input_ids"]
        masks = [
            mask if row.strip() else [0] * len(mask)
            for row, mask in zip(rows, guidance["attention_mask"], strict=True)
        ]
        if not input_ids[0]:  # every row empty, without special tokens: one masked padding column keeps them integers
            input_ids = [[self.guidance_tokenizer.pad_token_id or 0] for _ in rows]
            masks = [[0] for _ in rows]
        return BatchFeature(
            {f"{input_name}_input_ids": input_ids, f"{input_name}_attention_mask": masks},
            tensor_type=return_tensors,
        )


class CropBudgetProcessingMixin:
    """
    The per-crop budget of a processor whose model sees fixed-size crops (`CropSettings`): `reduction_ratio`, or
    `visual_tokens=K` kept per crop, stored as the ratio. The family says how many patches a crop has
    (`num_patches`).
    """

    num_patches: int

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`; a `visual_tokens=K` override replaces the stored `reduction_ratio`."""
        if kwargs.get("visual_tokens") is not None:
            kwargs.setdefault("reduction_ratio", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def set_budget(self, reduction_ratio: float | None, visual_tokens: int | None) -> None:
        """
        Sets `reduction_ratio` (from `visual_tokens` when given), checked against the crop's patch count; a
        `reduction_ratio` and `visual_tokens` that ask for different budgets are refused.
        """
        if visual_tokens is not None:
            check_budgets_agree(visual_tokens, reduction_ratio, self.num_patches, type(self).__name__)
            reduction_ratio = reduction_ratio_for_tokens(visual_tokens, self.num_patches, type(self).__name__)
        check_reduction_ratio(reduction_ratio, type(self).__name__, self.num_patches)
        self.reduction_ratio = reduction_ratio

    @property
    def visual_tokens(self) -> int:
        """Tokens kept per crop when compressing (read-only: set `reduction_ratio`)."""
        return visual_tokens_per_crop(self.num_patches, self.reduction_ratio)


class LlmGuidanceMixin(GuidanceProcessingMixin):
    """
    Guidance in the LLM's vocabulary (the Qwen families, LLaVA-OneVision): each question is tokenised by the LLM's own
    tokenizer without special tokens, and the model embeds it with the LLM's input embeddings.
    """

    guidance_special_tokens = False

    @property
    def guidance_tokenizer(self):
        return self.tokenizer

    @property
    def model_input_names(self) -> list[str]:
        """The stock processor's inputs, then each image's and each video's guidance."""
        names = super().model_input_names
        return names + [
            "guidance_input_ids",
            "guidance_attention_mask",
            "video_guidance_input_ids",
            "video_guidance_attention_mask",
        ]


class QwenProcessingMixin(LlmGuidanceMixin):
    """
    What VisionTrim processors add to the stock Qwen ones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): an image of `N` merged
    tokens (from `image_grid_thw`) gets `max(1, round_half_up(N * (1 - reduction_ratio)))` placeholders, a video that
    many per temporal slice, and each image (video) the question of its prompt as `guidance_input_ids` /
    `guidance_attention_mask` (`video_guidance_*`): the text of the last user turn, tokenised by the LLM's own
    tokenizer without special tokens, which the model embeds with the LLM's input embeddings.
    """

    default_reduction_ratio = DEFAULT_REDUCTION_RATIO

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        reduction_ratio=None,
        guidance_max_length=512,
        empty_guidance="cls_similarity",
        **kwargs,
    ):
        """
        The stock Qwen processor's arguments (the same for every Qwen model), then the VisionTrim ones
        (`reduction_ratio` None: the family's `default_reduction_ratio`, its config's default).
        """
        if reduction_ratio is None:
            reduction_ratio = self.default_reduction_ratio
        self.set_qwen_guidance(reduction_ratio, guidance_max_length, empty_guidance)
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    def set_qwen_guidance(self, reduction_ratio: float, guidance_max_length: int, empty_guidance: str) -> None:
        """Sets the budget and the guidance settings, refusing invalid values with the field's name."""
        self.set_empty_guidance(empty_guidance)
        check_reduction_ratio(reduction_ratio, type(self).__name__)
        self.reduction_ratio = reduction_ratio
        self.guidance_max_length = guidance_max_length

    @property
    def media_tokens(self) -> tuple[str, ...]:
        """The markers removed from a prompt's question: the placeholders and the vision start and end tokens."""
        return (self.image_token, self.video_token, "<|vision_start|>", "<|vision_end|>")

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


__all__ = [
    "CropBudgetProcessingMixin",
    "GuidanceProcessingMixin",
    "LlmGuidanceMixin",
    "QwenProcessingMixin",
    "VideoProcessorCheckMixin",
    "guidance_from_prompt",
    "has_user_turn",
    "question_of_messages",
    "to_8_bit",
    "unknown_format_warning",
]
