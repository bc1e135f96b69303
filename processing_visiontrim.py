# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Processors for VisionTrim LLaVA models: as many image and video placeholders as the model keeps, and the
CLIP-tokenised guidance text of each image and video.
"""

import json

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPTokenizer,
    LlavaNextProcessor,
    LlavaNextVideoProcessor,
    LlavaProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    VideoLlavaProcessor,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import CONFIG_NAME, cached_file, logging
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, make_batched_videos

from .configuration_visiontrim import (
    DEFAULT_REDUCTION_RATIO,
    EMPTY_GUIDANCE_RULES,
    check_budgets_agree,
    check_reduction_ratio,
    qwen_visual_tokens,
    reduction_ratio_for_tokens,
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


class VisionTrimVideoProcessor(VideoProcessorMixin):
    r"""
    Turns sampled video frames into `pixel_values_videos` `(videos, frames, 3, height, width)` with CLIP's
    preprocessing on every frame (resize the shortest edge, centre crop, rescale, normalise), done with Pillow: the
    steps of Transformers' `VideoLlavaVideoProcessor` / `LlavaNextVideoVideoProcessor`, which need torchvision. It
    neither decodes nor samples: give each video as its frames (an array `(frames, height, width, 3)` or a list of
    images), e.g. from `tools.evaluation.video.sample_frames`.

    Args:
        size (`dict`, defaults to `{"shortest_edge": 224}`), crop_size (`dict`, defaults to 224 x 224), resample,
        do_resize, do_center_crop, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb:
            as in [`CLIPImageProcessor`].
    """

    model_input_names = ["pixel_values_videos"]
    # The settings it shares with Transformers' video processors, and passes on to the frames' CLIP image processor.
    frame_settings = (
        "size",
        "crop_size",
        "resample",
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )

    def __init__(
        self,
        size: dict[str, int] | None = None,
        crop_size: dict[str, int] | None = None,
        resample: PILImageResampling = PILImageResampling.BICUBIC,
        do_resize: bool = True,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size or {"shortest_edge": 224}
        self.crop_size = crop_size or {"height": 224, "width": 224}
        self.resample = resample
        self.do_resize = do_resize
        self.do_center_crop = do_center_crop
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb

    def frame_processor(self) -> CLIPImageProcessorPil:
        """The Pillow CLIP image processor applied to each frame."""
        return CLIPImageProcessorPil(**{name: getattr(self, name) for name in self.frame_settings})

    def preprocess(self, videos, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """`pixel_values_videos`: one `(frames, 3, height, width)` entry per video, stacked with `return_tensors`."""
        videos = make_batched_videos(videos)
        frame_processor = self.frame_processor()
        processed = [frame_processor(list(video), return_tensors="pt")["pixel_values"] for video in videos]
        frame_counts = [frames.shape[0] for frames in processed]
        if return_tensors is None:
            return BatchFeature({"pixel_values_videos": [frames.numpy() for frames in processed]})
        if len(set(frame_counts)) > 1:
            raise ValueError(
                f"The videos have {frame_counts} frames: the videos of one batch need the same number of frames "
                "(Video-LLaVA and LLaVA-NeXT-Video stack them into one tensor). Sample the same number of frames "
                "from each video, or process them in separate batches."
            )
        return BatchFeature({"pixel_values_videos": torch.stack(processed)}, tensor_type=return_tensors)


class VisionTrimQwenVideoProcessor(VideoProcessorMixin):
    r"""
    Turns sampled video frames into Qwen2-VL / Qwen2.5-VL's packed `pixel_values_videos` `(patches, 3 * 2 * 14 * 14)`
    and `video_grid_thw` `(videos, 3)`, with Pillow: every frame resized to a multiple of 28 px within `size`
    (`smart_resize`), normalised, and consecutive frame pairs patched together (the last frame repeated for an odd
    count), as Transformers' `Qwen2VLVideoProcessor` does with torchvision. It neither decodes nor samples: give each
    video as its frames, sampled at `fps` frames per second (the M-RoPE time step of Qwen2.5-VL).

    Args:
        size (`dict`, defaults to `{"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}`):
            The fewest and most pixels of a frame.
        patch_size, temporal_patch_size, merge_size, image_mean, image_std: as in [`Qwen2VLVideoProcessor`].
        fps (`float`, defaults to 2.0): the rate the frames were sampled at.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        fps: float = 2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size or {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        self.fps = fps

    def frame_processor(self) -> Qwen2VLImageProcessorPil:
        """The Pillow Qwen image processor applied to each frame (one frame per temporal patch)."""
        return Qwen2VLImageProcessorPil(
            size=self.size,
            patch_size=self.patch_size,
            temporal_patch_size=1,
            merge_size=self.merge_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )

    def preprocess(self, videos, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """`pixel_values_videos` (all videos' patches, packed), `video_grid_thw` and each video's `video_metadata`."""
        frame_processor = self.frame_processor()
        pixels, grids, metadata = [], [], []
        for video in make_batched_videos(videos):
            frames = list(video)
            frames += frames[-1:] * (-len(frames) % self.temporal_patch_size)
            processed = frame_processor(frames, return_tensors="pt")
            _, height, width = processed["image_grid_thw"][0].tolist()
            slices = len(frames) // self.temporal_patch_size
            patches = processed["pixel_values"].view(slices, self.temporal_patch_size, height * width, 3, -1)
            pixels.append(patches.permute(0, 2, 3, 1, 4).reshape(slices * height * width, -1))
            grids.append([slices, height, width])
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=self.fps))
        encoding = BatchFeature(
            {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)},
            tensor_type=return_tensors,
        )
        encoding["video_metadata"] = metadata
        return encoding


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


class GuidanceTokenizerAttribute(ProcessorMixin):
    """
    Comes after the stock processor class in a VisionTrim processor's bases, so that the stock `__init__`'s call to
    `ProcessorMixin.__init__` also hands over `guidance_tokenizer` (set on the processor first): a sub-processor of its
    own, saved in `guidance_tokenizer/`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, guidance_tokenizer=self.guidance_tokenizer, **kwargs)


class GuidanceProcessingMixin(VideoProcessorCheckMixin):
    """
    What VisionTrim processors add to the stock LLaVA ones: the CLIP `guidance_tokenizer`, the budget
    (`reduction_ratio`), placeholders for the kept tokens only and, when there are images (videos),
    `guidance_input_ids` / `guidance_attention_mask` (`video_guidance_*`) `(images, text)`: one row per image (video),
    the guidance of the prompt it belongs to. A processor's `__init__` sets the guidance tokenizer, calls the stock
    `__init__` with its own arguments, then sets the budget.
    """

    # Whether the guidance keeps its tokenizer's special tokens (CLIP's BOS and EOS: the text tower expects them).
    guidance_special_tokens = True

    def set_guidance_tokenizer(self, guidance_tokenizer, guidance_max_length: int, empty_guidance: str) -> None:
        """
        Sets the guidance settings; refuses anything but a CLIP tokenizer (Transformers loads the LLM tokenizer if
        its folder is missing) and an unknown `empty_guidance`.
        """
        if empty_guidance not in EMPTY_GUIDANCE_RULES:
            raise ValueError(
                f"{type(self).__name__}.empty_guidance must be one of {EMPTY_GUIDANCE_RULES}, got {empty_guidance!r}."
            )
        self.empty_guidance = empty_guidance
        if not isinstance(guidance_tokenizer, CLIPTokenizer):
            raise ValueError(
                f"{type(self).__name__} needs `guidance_tokenizer`: the CLIPTokenizer of the CLIP model whose text "
                "tower the VisionTrim model holds (saved in the `guidance_tokenizer/` folder), got "
                f"{type(guidance_tokenizer).__name__}."
            )
        self.guidance_tokenizer = guidance_tokenizer
        self.guidance_max_length = guidance_max_length

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

    def __call__(
        self, images=None, text=None, videos=None, guidance_text: str | list[str] | None = None, **kwargs
    ) -> BatchFeature:
        """
        The stock processor's `__call__` plus the guidance of each image (`guidance_input_ids` /
        `guidance_attention_mask`, one row per image) and of each video (`video_guidance_input_ids` /
        `video_guidance_attention_mask`, one row per video).

        guidance_text (`str` or `list[str]`, *optional*):
            The text that guides TGVC, one per prompt; by default the question of each prompt (its last user turn,
            without media markers and role tags). An empty text gives an all-zero mask row (see the model's
            `config.empty_guidance`).
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
        to; items without prompts take one `guidance_text` entry each.
        """
        items_per_prompt = [prompt.count(token) for prompt in prompts] or [1] * num_items
        if guidance_text is None:
            if not prompts:
                raise ValueError(
                    "Pass `text` (the prompts) or `guidance_text=` with the images or videos: TGVC needs a question."
                )
            guidance_text = [guidance_from_prompt(prompt, *self.media_tokens) for prompt in prompts]
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
        masks = [
            mask if row.strip() else [0] * len(mask)
            for row, mask in zip(rows, guidance["attention_mask"], strict=True)
        ]
        return BatchFeature(
            {f"{input_name}_input_ids": guidance["input_ids"], f"{input_name}_attention_mask": masks},
            tensor_type=return_tensors,
        )

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


class AnyresProcessingMixin(GuidanceProcessingMixin):
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


class VisionTrimProcessor(GuidanceProcessingMixin, LlavaProcessor, GuidanceTokenizerAttribute):
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


class VisionTrimVideoLlavaProcessor(GuidanceProcessingMixin, VideoLlavaProcessor, GuidanceTokenizerAttribute):
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


class QwenProcessingMixin(GuidanceProcessingMixin):
    """
    What VisionTrim processors add to the stock Qwen2-VL / Qwen2.5-VL ones: an image of `N` merged tokens (from
    `image_grid_thw`) gets `max(1, round(N * (1 - reduction_ratio)))` placeholders, a video that many per temporal
    slice, and each image (video) the question of its prompt as `guidance_input_ids` / `guidance_attention_mask`
    (`video_guidance_*`): the text of the last user turn, tokenised by the LLM's own tokenizer without special
    tokens, which the model embeds with the LLM's input embeddings.
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
        if empty_guidance not in EMPTY_GUIDANCE_RULES:
            raise ValueError(
                f"{type(self).__name__}.empty_guidance must be one of {EMPTY_GUIDANCE_RULES}, got {empty_guidance!r}."
            )
        if isinstance(reduction_ratio, bool) or not isinstance(reduction_ratio, (int, float)):
            raise ValueError(
                f"{type(self).__name__}.reduction_ratio must be a number in [0, 1), got {reduction_ratio!r}."
            )
        if not 0 <= reduction_ratio < 1:
            raise ValueError(
                f"{type(self).__name__}.reduction_ratio must be in [0, 1) (the share of each image's merged tokens "
                f"removed; 0 switches compression off), got {reduction_ratio}."
            )
        self.reduction_ratio = reduction_ratio
        self.guidance_max_length = guidance_max_length
        self.empty_guidance = empty_guidance

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
        names = super(GuidanceProcessingMixin, self).model_input_names
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
            return super(GuidanceProcessingMixin, self).replace_image_token(image_inputs, image_idx, **kwargs)
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * self.kept_tokens(grid, self.image_processor.merge_size)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self.reduction_ratio == 0:
            return super(GuidanceProcessingMixin, self).replace_video_token(video_inputs, video_idx, **kwargs)
        grid = video_inputs["video_grid_thw"][video_idx]
        return self.video_token * self.kept_tokens(grid, self.video_processor.merge_size)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        multimodal_data = super(GuidanceProcessingMixin, self)._get_num_multimodal_tokens(
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
    A Qwen2.5-VL processor for VisionTrim models: each image becomes `max(1, round(N * (1 - reduction_ratio)))`
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


for processor_class in (
    VisionTrimProcessor,
    VisionTrimLlavaNextProcessor,
    VisionTrimVideoLlavaProcessor,
    VisionTrimLlavaNextVideoProcessor,
    VisionTrimQwen2_5_VLProcessor,
    VisionTrimQwen2VLProcessor,
):
    processor_class.register_for_auto_class("AutoProcessor")
VisionTrimVideoProcessor.register_for_auto_class("AutoVideoProcessor")
VisionTrimQwenVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = [
    "AnyresProcessingMixin",
    "GuidanceProcessingMixin",
    "GuidanceTokenizerAttribute",
    "QwenProcessingMixin",
    "VisionTrimLlavaNextProcessor",
    "VisionTrimLlavaNextVideoProcessor",
    "VisionTrimProcessor",
    "VisionTrimQwen2VLProcessor",
    "VisionTrimQwen2_5_VLProcessor",
    "VisionTrimQwenVideoProcessor",
    "VisionTrimVideoLlavaProcessor",
    "VisionTrimVideoProcessor",
    "VideoProcessorCheckMixin",
    "guidance_from_prompt",
    "to_8_bit",
]
