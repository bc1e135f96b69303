# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The VisionTrim settings every model family shares (`CompressionSettings`) and the budget arithmetic its configs and
processors use. A family's configuration file (`configuration_visiontrim_<family>.py`) adds its own settings.
"""

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

from transformers import PreTrainedConfig


MERGE_UPDATES = ("add", "mean")
EMPTY_GUIDANCE_RULES = ("error", "cls_similarity")

# The published budget: 64 of CLIP ViT-L/14-336's 576 patch tokens per crop (88.9% removed).
DEFAULT_REDUCTION_RATIO = 1 - 64 / 576


def round_half_up(value: float) -> int:
    """Rounds to the nearest integer, halves upwards (Python's `round` rounds halves to even)."""
    return math.floor(value + 0.5)


def visual_tokens_per_crop(num_patches: int, reduction_ratio: float) -> int:
    """Tokens kept per crop: all `num_patches` for a ratio of 0, else `num_patches * (1 - ratio)`, rounded."""
    if reduction_ratio == 0:
        return num_patches
    return round_half_up(num_patches * (1 - reduction_ratio))


def check_reduction_ratio(reduction_ratio: Any, owner: str, num_patches: int | None = None) -> None:
    """
    Raises a `ValueError` naming `owner.reduction_ratio` unless it is a number in [0, 1) and, for crops of a fixed
    `num_patches`, keeps at least one token (families whose budget is `max(1, ...)` pass no `num_patches`).
    """
    if isinstance(reduction_ratio, bool) or not isinstance(reduction_ratio, (int, float)):
        raise ValueError(f"{owner}.reduction_ratio must be a number in [0, 1), got {reduction_ratio!r}.")
    if not 0 <= reduction_ratio < 1:
        raise ValueError(
            f"{owner}.reduction_ratio must be in [0, 1) (the share of each image's vision tokens removed; 0 switches "
            f"compression off), got {reduction_ratio}."
        )
    if num_patches is not None and visual_tokens_per_crop(num_patches, reduction_ratio) < 1:
        raise ValueError(
            f"{owner}.reduction_ratio={reduction_ratio} keeps no token of the {num_patches} patches of a crop; the "
            f"largest ratio that keeps one token is {1 - 1 / num_patches:.6f}."
        )


@functools.cache
def settings_fields(config_class: type) -> frozenset[str]:
    """
    The names of `config_class`'s VisionTrim settings: the fields of the settings dataclass it derives from
    (`VisionTrimSettings`, `QwenSettings` or one of their subclasses that is not itself a model config), not the
    fields of the stock model config.
    """
    settings_class = next(
        base
        for base in config_class.__mro__
        if issubclass(base, CompressionSettings) and not issubclass(base, PreTrainedConfig)
    )
    return frozenset(field.name for field in fields(settings_class)) - {"guidance_config"}


@dataclass(kw_only=True)
class CompressionSettings:
    """
    The settings every VisionTrim config has, whatever the model family (`VisionTrimSettings` for LLaVA,
    `QwenSettings` for Qwen2-VL / Qwen2.5-VL), checked whenever one is set. See `VisionTrimSettings` for each field.
    A subclass adds fields and extends `check_compression_settings`.
    """

    reduction_ratio: int | float = DEFAULT_REDUCTION_RATIO
    dominant_ratio: int | float = 0.75
    merge_iterations: int = 3
    merge_update: str = "add"
    empty_guidance: str = "cls_similarity"

    def __setattr__(self, name: str, value: Any) -> None:
        # `from_pretrained(..., reduction_ratio=...)` sets fields after construction: check those values too.
        if name in settings_fields(type(self)) and getattr(self, "_post_init_done", False):
            previous = getattr(self, name)
            super().__setattr__(name, value)
            try:
                self.check_compression_settings()
            except ValueError:
                super().__setattr__(name, previous)
                raise
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """
        `PreTrainedConfig.from_dict`, with the VisionTrim settings among `kwargs` (the overrides of
        `from_pretrained(path, llm_stage_layer=2, llm_stage_tokens=32)`) applied together before the config is built,
        so they are checked once, all in place, whatever their order. `visual_tokens=K` replaces the stored ratio.
        """
        names = (*settings_fields(cls), "guidance_config", "visual_tokens")
        overrides = {name: kwargs.pop(name) for name in names if name in kwargs}
        if overrides.get("visual_tokens") is not None:
            config_dict = {key: value for key, value in config_dict.items() if key != "reduction_ratio"}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @property
    def compression_enabled(self) -> bool:
        return self.reduction_ratio > 0

    @property
    def llm_stage_enabled(self) -> bool:
        """Whether the LLM stage runs; only families with an LLM-stage decoder turn it on."""
        return False

    def check_compression_settings(self) -> None:
        """Raises a `ValueError` that names the field and its allowed values for any invalid compression setting."""
        owner = type(self).__name__
        dominant_ratio = self.dominant_ratio
        if (
            isinstance(dominant_ratio, bool)
            or not isinstance(dominant_ratio, (int, float))
            or not 0 <= dominant_ratio <= 1
        ):
            raise ValueError(
                f"{owner}.dominant_ratio must be in [0, 1] (the share of kept tokens chosen by DVTS; 1 = DVTS only, "
                f"0 = TGVC only), got {dominant_ratio!r}."
            )
        for name, allowed in (("merge_update", MERGE_UPDATES), ("empty_guidance", EMPTY_GUIDANCE_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{owner}.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        value = self.merge_iterations
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}.merge_iterations must be an integer >= 0, got {value!r}.")


__all__ = [
    "CompressionSettings",
    "check_reduction_ratio",
    "round_half_up",
    "settings_fields",
    "visual_tokens_per_crop",
]
