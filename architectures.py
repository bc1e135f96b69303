# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The one table of the architectures VisionTrim supports. The package's exports, the builders, the converter, the
tools and the vLLM plugin read it; nothing else lists architectures. Classes are named, not imported, so reading the
table imports no model code (the vLLM plugin reads it under vLLM's pinned Transformers).
"""

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """One supported architecture: its names, its classes (stock and VisionTrim) and what serves and converts it."""

    name: str  # the command-line name: "llava", "qwen2.5-vl"
    display_name: str  # "LLaVA-1.5"
    family: str  # the suffix of its Hub files: configuration_visiontrim_<family>.py, ...
    stock_model_type: str  # the model_type of the stock checkpoints it converts
    stock_prefix: str  # the stock classes' prefix: Llava -> LlavaConfig, LlavaForConditionalGeneration
    processor: str  # the VisionTrim processor class
    videos: bool  # whether it takes videos
    vllm_served: bool  # whether the vLLM plugin serves its folders
    anyres: bool = False  # whether an image is several crops (LLaVA-NeXT's anyres: a base view and high-res crops)

    @property
    def qwen(self) -> bool:
        """Whether it is a Qwen model: M-RoPE positions, a budget per share of each image, LLM-vocabulary guidance."""
        return self.family in QWEN_FAMILIES

    @property
    def kept_positions_at_prefill(self) -> bool:
        """Whether its kept tokens' positions depend on which are kept (M-RoPE): vLLM writes them at prefill."""
        return self.qwen

    @property
    def model_type(self) -> str:
        """The VisionTrim config's model_type."""
        return f"visiontrim_{self.stock_model_type}"

    @property
    def prefix(self) -> str:
        """The VisionTrim classes' prefix: VisionTrimLlava -> VisionTrimLlavaConfig, VisionTrimLlavaModel, ..."""
        return f"VisionTrim{self.stock_prefix}"

    @property
    def class_names(self) -> dict[str, str]:
        """The VisionTrim classes by kind ("config", "model", "base_model", "processor")."""
        return {
            "config": f"{self.prefix}Config",
            "model": f"{self.prefix}ForConditionalGeneration",
            "base_model": f"{self.prefix}Model",
            "processor": self.processor,
        }

    def modules(self) -> dict[str, str]:
        """The module (package-relative) of each kind of VisionTrim class."""
        return {
            "config": f"configuration_visiontrim_{self.family}",
            "model": f"modeling_visiontrim_{self.family}",
            "base_model": f"modeling_visiontrim_{self.family}",
            "processor": f"processing_visiontrim_{self.family}",
        }

    def visiontrim_class(self, kind: str) -> type:
        """The VisionTrim class of `kind` ("config", "model", "base_model" or "processor"), imported now."""
        module = importlib.import_module(f"{__package__}.{self.modules()[kind]}")
        return getattr(module, self.class_names[kind])

    def stock_class(self, kind: str) -> type:
        """The stock Transformers class of `kind` ("config", "model" or "processor")."""
        import transformers

        suffix = {"config": "Config", "model": "ForConditionalGeneration", "processor": "Processor"}[kind]
        return getattr(transformers, f"{self.stock_prefix}{suffix}")


ARCHITECTURES = (
    Architecture("llava", "LLaVA-1.5", "llava", "llava", "Llava", "VisionTrimProcessor", False, True),
    Architecture(
        "llava-next",
        "LLaVA-NeXT",
        "llava",
        "llava_next",
        "LlavaNext",
        "VisionTrimLlavaNextProcessor",
        False,
        True,
        anyres=True,
    ),
    Architecture(
        "video-llava",
        "Video-LLaVA",
        "llava",
        "video_llava",
        "VideoLlava",
        "VisionTrimVideoLlavaProcessor",
        True,
        False,
    ),
    Architecture(
        "llava-next-video",
        "LLaVA-NeXT-Video",
        "llava",
        "llava_next_video",
        "LlavaNextVideo",
        "VisionTrimLlavaNextVideoProcessor",
        True,
        True,
        anyres=True,
    ),
    Architecture(
        "llava-onevision",
        "LLaVA-OneVision",
        "llava_onevision",
        "llava_onevision",
        "LlavaOnevision",
        "VisionTrimLlavaOnevisionProcessor",
        True,
        True,
        anyres=True,
    ),
    Architecture(
        "qwen2.5-vl",
        "Qwen2.5-VL",
        "qwen2_vl",
        "qwen2_5_vl",
        "Qwen2_5_VL",
        "VisionTrimQwen2_5_VLProcessor",
        True,
        True,
    ),
    Architecture("qwen2-vl", "Qwen2-VL", "qwen2_vl", "qwen2_vl", "Qwen2VL", "VisionTrimQwen2VLProcessor", True, True),
    Architecture("qwen3-vl", "Qwen3-VL", "qwen3_vl", "qwen3_vl", "Qwen3VL", "VisionTrimQwen3VLProcessor", True, True),
    Architecture(
        "qwen3-vl-moe",
        "Qwen3-VL-MoE",
        "qwen3_vl",
        "qwen3_vl_moe",
        "Qwen3VLMoe",
        "VisionTrimQwen3VLProcessor",
        True,
        True,
    ),
)
ARCHITECTURE_NAMES = tuple(architecture.name for architecture in ARCHITECTURES)
# The families (each its own Hub files): the LLaVA models (a CLIP tower, guided by a CLIP text tower), LLaVA-OneVision
# (a SigLIP tower, guided in the LLM's vocabulary), the Qwen2-VL models (Qwen2-VL, Qwen2.5-VL) and the Qwen3-VL models
# (dense, MoE). The Qwen families share the M-RoPE core (`mrope_visiontrim.py`): a budget per image share, guidance in
# the LLM's vocabulary.
LLAVA_FAMILY, ONEVISION_FAMILY, QWEN_FAMILY, QWEN3_FAMILY = "llava", "llava_onevision", "qwen2_vl", "qwen3_vl"
QWEN_FAMILIES = (QWEN_FAMILY, QWEN3_FAMILY)
# Each family's name in messages, and the module whose builders make its tiny random models.
FAMILY_BUILDERS = {
    LLAVA_FAMILY: ("LLaVA", "visiontrim.tools.build"),
    ONEVISION_FAMILY: ("LLaVA-OneVision", "visiontrim.tools.build_onevision"),
    QWEN_FAMILY: ("Qwen2-VL", "visiontrim.tools.build_qwen"),
    QWEN3_FAMILY: ("Qwen3-VL", "visiontrim.tools.build_qwen"),
}


def supported(among: Iterable[Architecture] = ARCHITECTURES) -> str:
    """The supported architectures (or those of `among`), for messages: "llava (LLaVA-1.5), ..."."""
    return ", ".join(f"{architecture.name} ({architecture.display_name})" for architecture in among)


def architecture_named(name: str) -> Architecture:
    """The architecture of command-line name `name`; a `ValueError` naming the supported ones otherwise."""
    for architecture in ARCHITECTURES:
        if architecture.name == name:
            return architecture
    raise ValueError(f"Unknown architecture {name!r}: VisionTrim supports {supported()}.")


def architecture_of(config: Any) -> Architecture:
    """
    The architecture of a config (or config dict): a VisionTrim one by its model_type, or a stock one it converts
    (`llava`, `qwen2_5_vl`, ...). A `ValueError` names the supported architectures otherwise.
    """
    model_type = _model_type(config)
    for architecture in ARCHITECTURES:
        if model_type in (architecture.model_type, architecture.stock_model_type):
            return architecture
    raise ValueError(f"model_type {model_type!r} is not an architecture VisionTrim supports: {supported()}.")


def of_family(architecture: Architecture, *families: str) -> Architecture:
    """
    `architecture`, checked to be of one of `families`; a `ValueError` naming their architectures and where to build
    the others.
    """
    if architecture.family not in families:
        members = [candidate for candidate in ARCHITECTURES if candidate.family in families]
        names = " or ".join(FAMILY_BUILDERS[family][0] for family in families)
        raise ValueError(
            f"{architecture.name} is not a {names}-family architecture ({supported(members)}): "
            f"build it with {FAMILY_BUILDERS[architecture.family][1]}."
        )
    return architecture


def is_visiontrim(config: Any) -> bool:
    """Whether a config (or config dict) of a supported architecture is VisionTrim's, not the stock one."""
    return _model_type(config) == architecture_of(config).model_type


def _model_type(config: Any) -> str | None:
    return config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)


def exports() -> dict[str, str]:
    """The public class names of every architecture, each with its module (for the package's lazy exports)."""
    return {
        class_name: architecture.modules()[kind]
        for architecture in ARCHITECTURES
        for kind, class_name in architecture.class_names.items()
    }


__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAMES",
    "LLAVA_FAMILY",
    "ONEVISION_FAMILY",
    "QWEN3_FAMILY",
    "QWEN_FAMILIES",
    "QWEN_FAMILY",
    "Architecture",
    "architecture_named",
    "architecture_of",
    "is_visiontrim",
    "of_family",
    "supported",
]
