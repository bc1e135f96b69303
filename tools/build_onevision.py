# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Randomly initialised VisionTrim LLaVA-OneVision models, tokenizers and processors built in memory, with no download:
for the benchmark and the tests. The tower sees real 384 px crops (SigLIP's 27 x 27 grid); widths are tiny unless
given.
"""

from dataclasses import dataclass

import torch
from transformers import (
    LlavaOnevisionImageProcessorPil,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from ..architectures import ONEVISION_FAMILY, architecture_named, architecture_of, of_family
from ..configuration_visiontrim_llava_onevision import VisionTrimLlavaOnevisionConfig
from ..processing_visiontrim_llava_onevision import VisionTrimLlavaOnevisionProcessor
from ..video_processing_visiontrim import VisionTrimVideoProcessor
from .build import stock_config, train_bpe_tokenizer


# The special tokens of the OneVision (Qwen2) tokenizer, in the order of their ids after the BPE vocabulary's first.
ONEVISION_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
# llava-hf's OneVision chat template (ChatML; media before the text of a turn, each followed by a newline).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The 1x1, 1x2, 2x1 and 2x2 grids of 384 px crops: the first of llava-hf's OneVision pinpoints, small for the tests.
SMALL_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]


@dataclass
class OnevisionShapes:
    """Widths and depths of a random VisionTrim LLaVA-OneVision: tiny by default, on SigLIP's real 27 x 27 grid."""

    image_size: int = 384
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128


# SigLIP-so400m/14 at 384 px as in LLaVA-OneVision-7B (26 layers x 1152), with a small LLM.
ONEVISION_7B_VISION_SHAPES = OnevisionShapes(
    vision_hidden=1152,
    vision_layers=26,
    vision_heads=16,
    vision_intermediate=4304,
    llm_hidden=1024,
    llm_layers=4,
    llm_heads=16,
    llm_kv_heads=2,
    llm_intermediate=2816,
)


def build_onevision_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory with OneVision's special tokens and chat template, left padding."""
    tokenizer = train_bpe_tokenizer(
        list(ONEVISION_SPECIAL_TOKENS),
        vocab_size,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    return tokenizer


def build_onevision_config(
    shapes: OnevisionShapes | None = None,
    pinpoints: list[list[int]] | None = None,
    arch: str = "llava-onevision",
    **compression,
) -> VisionTrimLlavaOnevisionConfig:
    """
    A VisionTrim LLaVA-OneVision config of `shapes` (default: tiny) and `pinpoints` (default: `SMALL_PINPOINTS`);
    `compression` sets its VisionTrim fields.
    """
    architecture = of_family(architecture_named(arch), ONEVISION_FAMILY)
    shapes = shapes or OnevisionShapes()
    tokenizer = build_onevision_tokenizer()
    return architecture.visiontrim_class("config")(
        vision_config=SiglipVisionConfig(
            image_size=shapes.image_size,
            patch_size=shapes.patch_size,
            hidden_size=shapes.vision_hidden,
            num_hidden_layers=shapes.vision_layers,
            num_attention_heads=shapes.vision_heads,
            intermediate_size=shapes.vision_intermediate,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=shapes.llm_hidden,
            num_hidden_layers=shapes.llm_layers,
            num_attention_heads=shapes.llm_heads,
            num_key_value_heads=shapes.llm_kv_heads,
            intermediate_size=shapes.llm_intermediate,
            max_position_embeddings=32768,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints or SMALL_PINPOINTS,
        pad_token_id=tokenizer.pad_token_id,
        **compression,
    )


def build_onevision_processor(config: VisionTrimLlavaOnevisionConfig) -> VisionTrimLlavaOnevisionProcessor:
    """The processor matching `config`: same budget and pinpoints, OneVision's Pillow preprocessing, ChatML."""
    size = config.vision_config.image_size
    square = {"height": size, "width": size}
    return VisionTrimLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=build_onevision_tokenizer(),
        video_processor=VisionTrimVideoProcessor(size=square, crop_size=square, do_center_crop=False),
        num_image_tokens=config.num_patches,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=ONEVISION_CHAT_TEMPLATE,
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
        crop_newline=config.crop_newline,
    )


def stock_onevision_with_same_weights(model: PreTrainedModel) -> PreTrainedModel:
    """The stock LLaVA-OneVision holding `model`'s weights (its base model's submodules and head, not copied)."""
    architecture = of_family(architecture_of(model.config), ONEVISION_FAMILY)
    with torch.device("meta"):
        stock = architecture.stock_class("model")(stock_config(model.config)).eval()
    for name in ("vision_tower", "multi_modal_projector", "language_model", "image_newline"):
        setattr(stock.model, name, getattr(model.model, name))
    stock.lm_head = model.lm_head
    stock.generation_config = model.generation_config
    return stock


__all__ = [
    "ONEVISION_7B_VISION_SHAPES",
    "OnevisionShapes",
    "build_onevision_config",
    "build_onevision_processor",
    "build_onevision_tokenizer",
    "stock_onevision_with_same_weights",
]
