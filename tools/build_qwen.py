# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Randomly initialised VisionTrim Qwen models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE), tokenizers and processors
built in memory, with no download: for the benchmark and the tests. The vision tower's layout is real (14 px patches,
Qwen3-VL's 16 px; 2 x 2 merge; Qwen2.5-VL's 112 px windows and full-attention blocks; Qwen3-VL's DeepStack levels);
widths and depths are small unless asked for.
"""

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessorPil

from ..architectures import (
    ARCHITECTURES,
    QWEN3_FAMILY,
    QWEN_FAMILIES,
    architecture_named,
    architecture_of,
    of_family,
)
from ..configuration_visiontrim import QwenSettings
from ..video_processing_visiontrim import VisionTrimQwen3VLVideoProcessor, VisionTrimQwenVideoProcessor
from .build import build_model, stock_config, train_bpe_tokenizer


# The Qwen architectures, which these builders build.
QWEN_ARCHITECTURES = tuple(architecture for architecture in ARCHITECTURES if architecture.qwen)
# Qwen's special tokens, in the order of their ids after the BPE vocabulary's first ones.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen's ChatML template, content parts as Qwen2.5-VL writes them (no default system turn).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class QwenShapes:
    """Widths and depths of a random VisionTrim Qwen model; the defaults are tiny."""

    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 64
    full_attention_blocks: list[int] = field(default_factory=lambda: [1, 3])
    deepstack_blocks: list[int] = field(default_factory=lambda: [0, 1, 2])  # Qwen3-VL
    vision_position_embeddings: int = 64  # Qwen3-VL's learned position grid (8 x 8)
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128


# Qwen2.5-VL-7B's vision tower (32 blocks x 1280, full attention at 7, 15, 23, 31), with a small LLM.
QWEN2_5_VL_7B_VISION_SHAPES = QwenShapes(
    vision_hidden=1280,
    vision_layers=32,
    vision_heads=16,
    vision_intermediate=3420,
    full_attention_blocks=[7, 15, 23, 31],
    llm_hidden=1024,
    llm_layers=4,
    llm_heads=16,
    llm_kv_heads=2,
    llm_intermediate=2816,
)
# Qwen2-VL-7B's vision tower (32 blocks x 1280, MLP ratio 4, full attention everywhere), with the same small LLM.
QWEN2_VL_7B_VISION_SHAPES = QwenShapes(
    **{**vars(QWEN2_5_VL_7B_VISION_SHAPES), "vision_intermediate": 4 * 1280, "full_attention_blocks": []}
)

# Qwen3-VL-8B's vision tower (27 blocks x 1152, 16 px patches, DeepStack at 8, 16, 24), with the same small LLM.
QWEN3_VL_8B_VISION_SHAPES = QwenShapes(
    **{
        **vars(QWEN2_5_VL_7B_VISION_SHAPES),
        "vision_hidden": 1152,
        "vision_layers": 27,
        "vision_intermediate": 4304,
        "full_attention_blocks": [],
        "deepstack_blocks": [8, 16, 24],
        "vision_position_embeddings": 2304,
    }
)


def build_qwen_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory with Qwen's special tokens and chat template, left padding."""
    tokenizer = train_bpe_tokenizer(
        list(QWEN_SPECIAL_TOKENS),
        vocab_size,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen_config(arch: str = "qwen2.5-vl", shapes: QwenShapes | None = None, **compression) -> QwenSettings:
    """A VisionTrim config of the Qwen architecture `arch` and `shapes`; `compression` sets its fields."""
    architecture = of_family(architecture_named(arch), *QWEN_FAMILIES)
    shapes = shapes or QwenShapes()
    tokenizer = build_qwen_tokenizer()
    vision = {
        "depth": shapes.vision_layers,
        "num_heads": shapes.vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if architecture.family == QWEN3_FAMILY:
        vision |= {
            "patch_size": 16,
            "hidden_size": shapes.vision_hidden,
            "intermediate_size": shapes.vision_intermediate,
            "out_hidden_size": shapes.llm_hidden,
            "num_position_embeddings": shapes.vision_position_embeddings,
            "deepstack_visual_indexes": shapes.deepstack_blocks,
        }
    elif arch == "qwen2.5-vl":
        vision |= {
            "hidden_size": shapes.vision_hidden,
            "intermediate_size": shapes.vision_intermediate,
            "out_hidden_size": shapes.llm_hidden,
            "window_size": 112,
            "fullatt_block_indexes": shapes.full_attention_blocks,
        }
    else:
        vision |= {
            "embed_dim": shapes.vision_hidden,
            "mlp_ratio": shapes.vision_intermediate // shapes.vision_hidden,
            "hidden_size": shapes.llm_hidden,
        }
    head_dim = shapes.llm_hidden // shapes.llm_heads
    section = head_dim // 2 // 4
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": shapes.llm_hidden,
        "num_hidden_layers": shapes.llm_layers,
        "num_attention_heads": shapes.llm_heads,
        "num_key_value_heads": shapes.llm_kv_heads,
        "intermediate_size": shapes.llm_intermediate,
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * section, section, section],
        },
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture.family == QWEN3_FAMILY:
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
    if arch == "qwen3-vl-moe":  # an expert's width neither the LLM's nor half of it: its layout shows in its shape
        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": shapes.llm_hidden * 3 // 4}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_FIELDS.items()}
    return architecture.visiontrim_class("config")(vision_config=vision, text_config=text, **ids, **compression)


# The config fields holding the ids of Qwen's vision tokens.
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def build_qwen_model(config: QwenSettings, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of the config's Qwen architecture (seeded), in eval mode."""
    of_family(architecture_of(config), *QWEN_FAMILIES)
    return build_model(config, seed)


def build_qwen_processor(
    config: QwenSettings, min_pixels: int = 56 * 56, max_pixels: int = 1008 * 1008, video_max_pixels: int | None = None
) -> ProcessorMixin:
    """
    The processor matching `config` (same budget; Qwen's image preprocessing with the Pillow backend). Images and
    Qwen2-VL's video frames take `min_pixels` to `max_pixels` each; Qwen3-VL's videos, all their frames together, up to
    `video_max_pixels` (default `max_pixels`).
    """
    architecture = of_family(architecture_of(config), *QWEN_FAMILIES)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if architecture.family == QWEN3_FAMILY:
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        video_size = {**size, "longest_edge": video_max_pixels or max_pixels}
        video_processor = VisionTrimQwen3VLVideoProcessor(size=video_size)
    else:
        image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, size=size)
        video_processor = VisionTrimQwenVideoProcessor(size=size)
    return architecture.visiontrim_class("processor")(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=build_qwen_tokenizer(),
        chat_template=QWEN_CHAT_TEMPLATE,
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
    )


def stock_qwen_with_same_weights(model: PreTrainedModel) -> PreTrainedModel:
    """The stock Qwen model of `model`'s architecture holding the same weights (its base model's submodules)."""
    architecture = of_family(architecture_of(model.config), *QWEN_FAMILIES)
    with torch.device("meta"):
        stock = architecture.stock_class("model")(stock_config(model.config)).eval()
    stock.model.visual = model.model.visual
    stock.model.language_model = model.model.language_model
    stock.lm_head = model.lm_head
    stock.generation_config = model.generation_config
    return stock
