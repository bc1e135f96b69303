# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Randomly initialised VisionTrim Qwen2-VL / Qwen2.5-VL models, tokenizers and processors built in memory, with no
download: for the benchmark and the tests. The vision tower's layout is real (14 px patches, 2 x 2 merge, Qwen2.5-VL's
112 px windows and full-attention blocks); widths and depths are small unless asked for.
"""

from dataclasses import dataclass, field

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from ..configuration_visiontrim import settings_fields
from ..configuration_visiontrim_qwen2_vl import QwenSettings, VisionTrimQwen2_5_VLConfig, VisionTrimQwen2VLConfig
from ..modeling_visiontrim_qwen2_vl import (
    VisionTrimQwen2_5_VLForConditionalGeneration,
    VisionTrimQwen2VLForConditionalGeneration,
)
from ..processing_visiontrim_qwen2_vl import VisionTrimQwen2_5_VLProcessor, VisionTrimQwen2VLProcessor
from ..video_processing_visiontrim import VisionTrimQwenVideoProcessor
from .build import train_bpe_tokenizer


QWEN_ARCHITECTURES = ("qwen2.5-vl", "qwen2-vl")
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
CONFIG_CLASSES = {"qwen2.5-vl": VisionTrimQwen2_5_VLConfig, "qwen2-vl": VisionTrimQwen2VLConfig}
MODEL_CLASSES = {
    "visiontrim_qwen2_5_vl": VisionTrimQwen2_5_VLForConditionalGeneration,
    "visiontrim_qwen2_vl": VisionTrimQwen2VLForConditionalGeneration,
}
PROCESSOR_CLASSES = {
    "visiontrim_qwen2_5_vl": VisionTrimQwen2_5_VLProcessor,
    "visiontrim_qwen2_vl": VisionTrimQwen2VLProcessor,
}
STOCK_CLASSES = {
    "visiontrim_qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "visiontrim_qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}


@dataclass
class QwenShapes:
    """Widths and depths of a random VisionTrim Qwen model; the defaults are tiny."""

    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 64
    full_attention_blocks: list[int] = field(default_factory=lambda: [1, 3])
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


def build_qwen_config(
    arch: str = "qwen2.5-vl", shapes: QwenShapes | None = None, **compression
) -> VisionTrimQwen2_5_VLConfig | VisionTrimQwen2VLConfig:
    """A VisionTrim Qwen config of `arch` ("qwen2.5-vl" or "qwen2-vl") and `shapes`; `compression` sets its fields."""
    if arch not in QWEN_ARCHITECTURES:
        raise ValueError(f"arch must be one of {QWEN_ARCHITECTURES}, got {arch!r}.")
    shapes = shapes or QwenShapes()
    tokenizer = build_qwen_tokenizer()
    vision = {
        "depth": shapes.vision_layers,
        "num_heads": shapes.vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if arch == "qwen2.5-vl":
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
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_FIELDS.items()}
    return CONFIG_CLASSES[arch](vision_config=vision, text_config=text, **ids, **compression)


# The config fields holding the ids of Qwen's vision tokens.
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def build_qwen_model(config: QwenSettings, seed: int = 0):
    """A randomly initialised model of the config's architecture (seeded), in eval mode."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[config.model_type](config).eval()


def build_qwen_processor(config: QwenSettings, min_pixels: int = 56 * 56, max_pixels: int = 1008 * 1008):
    """The processor matching `config` (same budget; Qwen's image preprocessing with the Pillow backend)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return PROCESSOR_CLASSES[config.model_type](
        image_processor=image_processor,
        video_processor=VisionTrimQwenVideoProcessor(size=size),
        tokenizer=build_qwen_tokenizer(),
        chat_template=QWEN_CHAT_TEMPLATE,
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
    )


def stock_qwen_with_same_weights(model):
    """The stock Qwen model of `model`'s architecture holding the same weights (its base model's submodules)."""
    config_class, stock_class = STOCK_CLASSES[model.config.model_type]
    settings = settings_fields(type(model.config))
    stock_config = config_class(**{key: value for key, value in model.config.to_dict().items() if key not in settings})
    with torch.device("meta"):
        stock = stock_class(stock_config).eval()
    stock.model.visual = model.model.visual
    stock.model.language_model = model.model.language_model
    stock.lm_head = model.lm_head
    stock.generation_config = model.generation_config
    return stock
