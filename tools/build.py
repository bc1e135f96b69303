# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Randomly initialised VisionTrim LLaVA-family models, tokenizers and processors built in memory, with no download:
for the demo, the benchmark and the tests. Shapes are real where it matters (a 336 px / patch-14 tower gives the real
24x24 grid) and small elsewhere. `build_model` and `stock_config` serve every architecture (`build_qwen.py` builds
the Qwen configs and processors).
"""

import copy
import dataclasses
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessorPil,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    VideoLlavaImageProcessor,
)

from ..architectures import (
    ARCHITECTURES,
    LLAVA_FAMILY,
    Architecture,
    architecture_named,
    architecture_of,
    of_family,
    supported,
)
from ..configuration_visiontrim_llava import CLIP_L14_TEXT_CONFIG, VisionTrimSettings
from ..processing_visiontrim import VideoProcessorCheckMixin
from ..video_processing_visiontrim import VisionTrimVideoProcessor


IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# llava-hf's LLaVA-1.5 chat template: "USER: <image>\n<question> ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TRAINING_TEXT = [
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a sofa next to a cup of coffee.",
    "Is there a dog in the picture? Answer the question using a single word or phrase. No, there is a cat.",
    "Describe the photo in detail: colours, objects, people, animals, text, the sky, a street, a table, a window.",
    "How many people are in the image? Where is the red car? What colour is the cup? Yes. No. Two. Three.",
]


@dataclass
class Shapes:
    """Widths and depths of a random VisionTrim LLaVA; the defaults are tiny, the grid is the real 24x24."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    guidance_hidden: int = 32
    guidance_layers: int = 2
    guidance_heads: int = 4
    guidance_intermediate: int = 64
    projection_dim: int = 16
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128

    @property
    def num_patches(self) -> int:
        """Patch tokens of a crop."""
        return (self.image_size // self.patch_size) ** 2


# CLIP ViT-L/14-336 as in LLaVA-1.5, with a small LLM.
LLAVA_15_SHAPES = Shapes(
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    vision_intermediate=4096,
    guidance_hidden=CLIP_L14_TEXT_CONFIG["hidden_size"],
    guidance_layers=CLIP_L14_TEXT_CONFIG["num_hidden_layers"],
    guidance_heads=CLIP_L14_TEXT_CONFIG["num_attention_heads"],
    guidance_intermediate=CLIP_L14_TEXT_CONFIG["intermediate_size"],
    projection_dim=CLIP_L14_TEXT_CONFIG["projection_dim"],
    llm_hidden=1024,
    llm_layers=4,
    llm_heads=16,
    llm_kv_heads=16,
    llm_intermediate=2816,
)
# The fields of the towers (vision, CLIP text, CLIP head) that `LLAVA_15_SHAPES` takes from CLIP ViT-L/14.
TOWER_FIELDS = tuple(
    shape_field.name
    for shape_field in dataclasses.fields(Shapes)
    if shape_field.name.startswith(("vision_", "guidance_")) or shape_field.name == "projection_dim"
)


def describe_shapes(shapes: Shapes) -> str:
    """
    The towers and LLM of a random model of `shapes`, as the tools print them: "CLIP ViT-L/14 towers at 336 px
    (vision 24 x 1024, text 12 x 768), LLM 4 x 1024", or "tiny towers ..." for any other towers (`--toy`).
    """
    real = all(getattr(shapes, name) == getattr(LLAVA_15_SHAPES, name) for name in TOWER_FIELDS)
    return (
        f"{'CLIP ViT-L/14' if real else 'tiny'} towers at {shapes.image_size} px (vision {shapes.vision_layers} x "
        f"{shapes.vision_hidden}, text {shapes.guidance_layers} x {shapes.guidance_hidden}), LLM {shapes.llm_layers} "
        f"x {shapes.llm_hidden}"
    )


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 400, **settings) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer trained in memory on `TRAINING_TEXT`, `special_tokens` first in its vocabulary, left
    padding; `settings` are `PreTrainedTokenizerFast`'s (its special tokens' roles).
    """
    unk_token = settings.get("unk_token")
    backend = Tokenizer(models.BPE(unk_token=unk_token) if unk_token else models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **settings)


def build_tokenizer(
    vocab_size: int = 400, image_token: bool = True, video_token: bool = False
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE LLM tokenizer trained in memory, left padding, with `<image>` as its image token (the llava-hf
    layout) or without it (`image_token=False`: the original LLaVA layout, whose tokenizer is the plain LLM's), and
    `<video>` (id 5) as its video token with `video_token=True`.
    """
    special_tokens = ["<unk>", "<s>", "</s>", "<pad>"] + ([IMAGE_TOKEN] if image_token else [])
    special_tokens += [VIDEO_TOKEN] if video_token else []
    tokenizer = train_bpe_tokenizer(
        special_tokens,
        vocab_size,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=({"image_token": IMAGE_TOKEN} if image_token else {})
        | ({"video_token": VIDEO_TOKEN} if video_token else {}),
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_guidance_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (CLIP's normaliser and pre-tokeniser, no merges), 77 tokens at most."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in sorted(alphabet):
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def clip_vision_config(shapes: Shapes) -> CLIPVisionConfig:
    """The CLIP vision tower of `shapes` (LLaVA's vision tower)."""
    return CLIPVisionConfig(
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
        hidden_size=shapes.vision_hidden,
        num_hidden_layers=shapes.vision_layers,
        num_attention_heads=shapes.vision_heads,
        intermediate_size=shapes.vision_intermediate,
        projection_dim=shapes.projection_dim,
    )


def clip_text_config(shapes: Shapes) -> CLIPTextConfig:
    """The CLIP text tower of `shapes`, for `build_guidance_tokenizer()`'s vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(build_guidance_tokenizer()),
        hidden_size=shapes.guidance_hidden,
        num_hidden_layers=shapes.guidance_layers,
        num_attention_heads=shapes.guidance_heads,
        intermediate_size=shapes.guidance_intermediate,
        projection_dim=shapes.projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


# The LLaVA-family architectures, which these builders build.
LLAVA_ARCHITECTURES = tuple(architecture for architecture in ARCHITECTURES if architecture.family == LLAVA_FAMILY)
# llava-hf's LLaVA-1.6 pinpoints: 1x2, 2x1, 2x2, 3x1 and 1x3 grids of 336 px crops.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Video-LLaVA's LanguageBind towers see 224 px frames (16x16 patches); the others CLIP ViT-L/14-336's 336 px.
VIDEO_LLAVA_IMAGE_SIZE = 224


def tower_image_size(arch: str) -> int:
    """The input size of a LLaVA-family architecture's vision towers: 224 px for Video-LLaVA, 336 px otherwise."""
    return VIDEO_LLAVA_IMAGE_SIZE if arch == "video-llava" else 336


def build_config(shapes: Shapes | None = None, vocab_size: int | None = None, arch: str = "llava", **compression):
    """
    A VisionTrim config of the LLaVA-family architecture `arch` (LLaVA-NeXT ones with llava-hf's pinpoints) and the
    given shapes (default: tiny, at `tower_image_size(arch)`); `compression` sets the VisionTrim fields.
    """
    architecture = of_family(architecture_named(arch), LLAVA_FAMILY)
    shapes = shapes or Shapes(image_size=tower_image_size(arch))
    tokenizer_vocab = vocab_size or len(build_tokenizer(video_token=architecture.videos))
    extra = {}
    if architecture.anyres:
        extra["image_grid_pinpoints"] = LLAVA_NEXT_PINPOINTS
    if architecture.videos:
        extra["video_token_index"] = 5
    return architecture.visiontrim_class("config")(
        vision_config=clip_vision_config(shapes),
        text_config=LlamaConfig(
            vocab_size=tokenizer_vocab,
            hidden_size=shapes.llm_hidden,
            num_hidden_layers=shapes.llm_layers,
            num_attention_heads=shapes.llm_heads,
            num_key_value_heads=shapes.llm_kv_heads,
            intermediate_size=shapes.llm_intermediate,
            max_position_embeddings=8192,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        guidance_config=clip_text_config(shapes),
        projection_dim=shapes.projection_dim,
        image_token_index=4,
        pad_token_id=3,
        **extra,
        **compression,
    )


def build_model(config: PreTrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised VisionTrim model of the config's architecture, any family (seeded), in eval mode."""
    torch.manual_seed(seed)
    return architecture_of(config).visiontrim_class("model")(config).eval()


def build_processor(config: VisionTrimSettings) -> ProcessorMixin:
    """The processor matching `config` (same budget, CLIP preprocessing at the tower's size, LLaVA-1.5 template)."""
    architecture = of_family(architecture_of(config), LLAVA_FAMILY)
    size = config.vision_config.image_size
    image_processor_settings = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    common = {
        "tokenizer": build_tokenizer(video_token=architecture.videos),
        "guidance_tokenizer": build_guidance_tokenizer(),
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_CHAT_TEMPLATE,
        "reduction_ratio": config.reduction_ratio,
        "empty_guidance": config.empty_guidance,
    }
    if architecture.videos:
        common["video_processor"] = VisionTrimVideoProcessor(**image_processor_settings)
    processor_class = architecture.visiontrim_class("processor")
    if architecture.anyres:
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=config.image_grid_pinpoints, **image_processor_settings
        )
        return processor_class(image_processor=image_processor, crop_newline=config.crop_newline, **common)
    # Video-LLaVA's image processor is its own class (the same CLIP preprocessing).
    image_processor_class = VideoLlavaImageProcessor if architecture.name == "video-llava" else CLIPImageProcessorPil
    return processor_class(image_processor=image_processor_class(**image_processor_settings), **common)


# The submodules a stock model shares with its VisionTrim twin (those that exist in the architecture).
SHARED_SUBMODULES = (
    "vision_tower",
    "image_tower",
    "video_tower",
    "multi_modal_projector",
    "language_model",
    "image_newline",
    "vision_resampler",
)


def stock_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The stock config of a VisionTrim config's architecture (any family): its stock fields, not the settings."""
    stock_config_class = architecture_of(config).stock_class("config")
    stock_fields = {field.name for field in dataclasses.fields(stock_config_class)} & set(config.to_dict())
    return stock_config_class(**{name: getattr(config, name) for name in stock_fields})


def stock_llava_with_same_weights(model: PreTrainedModel) -> PreTrainedModel:
    """
    The stock model of `model`'s LLaVA-family architecture sharing its vision tower(s), projector, LLM, head, image
    newline and pooler, without copying them.
    """
    architecture = of_family(architecture_of(model.config), LLAVA_FAMILY)
    with torch.device("meta"):
        stock = architecture.stock_class("model")(stock_config(model.config)).eval()
    for name in SHARED_SUBMODULES:
        if hasattr(stock.model, name):
            setattr(stock.model, name, getattr(model.model, name))
    stock.lm_head = model.lm_head
    stock.generation_config = model.generation_config
    return stock


def uncompressed_processor(processor: ProcessorMixin) -> ProcessorMixin:
    """
    A copy of a VisionTrim processor that emits every visual token (`reduction_ratio=0`): the stock prompts of the
    families whose processors count the stock tokens themselves when compression is off (Qwen, LLaVA-OneVision).
    """
    stock = copy.copy(processor)
    stock.reduction_ratio = 0
    return stock


def processor_architecture(processor: ProcessorMixin) -> Architecture:
    """The LLaVA-family architecture of a (stock or VisionTrim) processor; a `ValueError` naming them otherwise."""
    for architecture in LLAVA_ARCHITECTURES:
        if isinstance(processor, architecture.stock_class("processor")):
            return architecture
    raise ValueError(f"{type(processor).__name__} is not a LLaVA-family processor ({supported(LLAVA_ARCHITECTURES)}).")


def stock_processor(processor: ProcessorMixin) -> ProcessorMixin:
    """
    The stock processor of `processor`'s LLaVA-family architecture with the same image (and video) processor and
    tokenizer: every patch token. The stock video processors are built with the VisionTrim Pillow one (torchvision
    is not needed).
    """
    architecture = processor_architecture(processor)
    stock_class = architecture.stock_class("processor")
    videos = {}
    if architecture.videos:
        stock_class = type(stock_class.__name__, (VideoProcessorCheckMixin, stock_class), {})
        videos["video_processor"] = processor.video_processor
    return stock_class(
        **videos,
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        chat_template=processor.chat_template,
    )
