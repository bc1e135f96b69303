# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The VisionTrim settings every model family shares (`CompressionSettings`), the rules they are checked by and the budget
arithmetic its configs and processors use. A family's configuration file (`configuration_visiontrim_<family>.py`) adds
its own settings.

The configs are `@strict` dataclasses, as every Transformers config, made so by `strict_settings`. A rule on one
setting is a field validator (`setting`, the field metadata `@strict` reads): it
runs on construction and before every assignment, so a refused value is never stored. A rule relating settings (to
each other or to the stock config) is a class validator, a `validate_*` method: it runs on construction, by
`config.validate()` and by `save_pretrained`. Processors that keep a copy of a setting check it by the same functions.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import PreTrainedConfig
from transformers.configuration_utils import strict


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


def reduction_ratio_for_tokens(visual_tokens: Any, num_patches: int, owner: str) -> float:
    """The `reduction_ratio` keeping `visual_tokens` of `num_patches` tokens per crop (all of them: 0, off)."""
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or not 1 <= visual_tokens <= num_patches:
        raise ValueError(
            f"{owner}.visual_tokens must be an integer in [1, {num_patches}] (the vision tower has {num_patches} "
            f"patch tokens per crop), got {visual_tokens!r}."
        )
    return 1 - visual_tokens / num_patches


def check_budgets_agree(visual_tokens: Any, reduction_ratio: Any, num_patches: int, owner: str) -> None:
    """
    Raises a `ValueError` naming both when `visual_tokens` and a `reduction_ratio` other than the default ask for
    different budgets (a default ratio is taken as not given).
    """
    if reduction_ratio in (None, DEFAULT_REDUCTION_RATIO) or not isinstance(reduction_ratio, (int, float)):
        return
    kept = visual_tokens_per_crop(num_patches, reduction_ratio)
    if kept != visual_tokens:
        raise ValueError(
            f"{owner}: visual_tokens={visual_tokens} and reduction_ratio={reduction_ratio} (which keeps {kept} of "
            f"{num_patches} tokens per crop) ask for different budgets: give only one of them."
        )


# Field validators: each raises a `ValueError` whose message follows the field's name ("must be ...").


def valid_reduction_ratio(reduction_ratio: Any) -> None:
    """A number in [0, 1) (its type is checked here too, for the processors, whose copy has no field type)."""
    if isinstance(reduction_ratio, bool) or not isinstance(reduction_ratio, (int, float)):
        raise ValueError(f"must be a number in [0, 1), got {reduction_ratio!r}.")
    if not 0 <= reduction_ratio < 1:
        raise ValueError(
            "must be in [0, 1) (the share of each image's vision tokens removed; 0 switches compression off), got "
            f"{reduction_ratio}."
        )


def valid_dominant_ratio(dominant_ratio: float) -> None:
    """In [0, 1]."""
    if not 0 <= dominant_ratio <= 1:
        raise ValueError(
            "must be in [0, 1] (the share of kept tokens chosen by DVTS; 1 = DVTS only, 0 = TGVC only), got "
            f"{dominant_ratio!r}."
        )


def non_negative(value: int) -> None:
    """A count: >= 0."""
    if value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}.")


def one_of(allowed: tuple[str, ...]) -> Callable[[Any], None]:
    """The field validator that accepts only the values in `allowed`."""

    def validator(value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}, got {value!r}.")

    return validator


valid_empty_guidance = one_of(EMPTY_GUIDANCE_RULES)


def check_setting(validator: Callable[[Any], None], value: Any, owner: str, name: str) -> None:
    """Runs a field validator on a setting held outside a config (a processor's copy), naming `owner.name`."""
    try:
        validator(value)
    except ValueError as error:
        raise ValueError(f"{owner}.{name} {error}") from None


def check_keeps_a_token(reduction_ratio: float, num_patches: int, owner: str) -> None:
    """Raises a `ValueError` naming `owner.reduction_ratio` unless a crop of `num_patches` patches keeps a token."""
    if visual_tokens_per_crop(num_patches, reduction_ratio) < 1:
        raise ValueError(
            f"{owner}.reduction_ratio={reduction_ratio} keeps no token of the {num_patches} patches of a crop; the "
            f"largest ratio that keeps one token is {1 - 1 / num_patches:.6f}."
        )


def check_reduction_ratio(reduction_ratio: Any, owner: str, num_patches: int | None = None) -> None:
    """
    A processor's `reduction_ratio`, by the config's rules: `valid_reduction_ratio` and, for crops of a fixed
    `num_patches`, `check_keeps_a_token` (families whose budget is `max(1, ...)` pass no `num_patches`).
    """
    check_setting(valid_reduction_ratio, reduction_ratio, owner, "reduction_ratio")
    if num_patches is not None:
        check_keeps_a_token(reduction_ratio, num_patches, owner)


@functools.cache
def settings_fields(config_class: type) -> frozenset[str]:
    """
    The names of `config_class`'s VisionTrim settings: the fields of the settings dataclass it derives from
    (`VisionTrimSettings`, `QwenSettings` or one of their subclasses that is not itself a model config), not the
    fields of the stock model config.
    """

    # By class name, not identity: vLLM sends remote-code config classes to its workers by value (cloudpickle), so
    # the classes in a config's MRO there are copies of this module's.
    def derives_from(base: type, name: str) -> bool:
        return any(ancestor.__name__ == name for ancestor in base.__mro__)

    settings_class = next(
        base
        for base in config_class.__mro__
        if derives_from(base, CompressionSettings.__name__) and not derives_from(base, PreTrainedConfig.__name__)
    )
    return frozenset(settings_field.name for settings_field in fields(settings_class)) - {"guidance_config"}


def setting(validator: Callable[[Any], None], default: Any) -> Any:
    """A settings field whose value `validator` checks (the field metadata `@strict` reads), with its `default`."""
    return field(default=default, metadata={"validator": validator})


def strict_settings(config_class: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """
    `@strict` (the decorator of every Transformers config) for a model config with VisionTrim settings, each refusal
    a `ValueError`, as VisionTrim configs always raised, where `@strict` wraps it in an error of its own: a VisionTrim
    setting's refused type or value names `<config class>.<field>`, and a class validator's error is raised as the
    validator raised it.
    """
    config_class = strict(config_class)
    strict_setattr = config_class.__setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        """`@strict`'s `__setattr__`; a VisionTrim setting is first checked here by the same validators."""
        if name in settings_fields(type(self)):
            for validator in self.__validators__.get(name, []):  # the field's type first, then its own rule
                try:
                    validator(value)
                except TypeError:
                    annotation = self.__dataclass_fields__[name].type
                    expected = getattr(annotation, "__name__", annotation)
                    raise ValueError(f"{type(self).__name__}.{name} must be {expected}, got {value!r}.") from None
                except ValueError as error:
                    raise ValueError(f"{type(self).__name__}.{name} {error}") from None
        strict_setattr(self, name, value)  # validates before it sets: a refused value is never stored

    def validate(self) -> None:
        """`@strict`'s `validate`: every class validator (`validate_*`), each raising its own error."""
        for validator in type(self).__class_validators__:
            validator(self)

    validate.__is_defined_by_strict_decorator__ = True  # lets a subclass be `@strict` in turn
    config_class.__setattr__, config_class.validate = __setattr__, validate
    return config_class


@dataclass(kw_only=True)
class CompressionSettings:
    """
    The settings every VisionTrim config has, whatever the model family (`VisionTrimSettings` for LLaVA,
    `QwenSettings` for the Qwen models). See `VisionTrimSettings` for each field. A subclass adds fields, with
    their validators, and `validate_*` class validators.
    """

    reduction_ratio: int | float = setting(valid_reduction_ratio, DEFAULT_REDUCTION_RATIO)
    dominant_ratio: int | float = setting(valid_dominant_ratio, 0.75)
    merge_iterations: int = setting(non_negative, 3)
    merge_update: str = setting(one_of(MERGE_UPDATES), "add")
    empty_guidance: str = setting(valid_empty_guidance, "cls_similarity")

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

    def split_kept(self, kept: int) -> tuple[int, int]:
        """`(K_d, K_c)` of an item keeping `kept` tokens: `K_d = round_half_up(kept * dominant_ratio)` by DVTS."""
        dominant = round_half_up(kept * self.dominant_ratio)
        return dominant, kept - dominant


@dataclass(kw_only=True)
class CropSettings(CompressionSettings):
    """
    The budget of the families whose tower sees fixed-size crops (LLaVA's CLIP, LLaVA-OneVision's SigLIP): every crop
    of `num_patches` patches keeps `visual_tokens = round_half_up(num_patches * (1 - reduction_ratio))` tokens,
    `dominant_tokens` by DVTS and `complement_tokens` by TGVC. `visual_tokens=K` is accepted instead of the ratio at
    construction and in `from_pretrained`, and is stored as the ratio `1 - K / num_patches`.
    """

    def __post_init__(self, visual_tokens: int | None = None, **kwargs):
        super().__post_init__(**kwargs)
        if visual_tokens is not None:
            check_budgets_agree(visual_tokens, self.reduction_ratio, self.num_patches, type(self).__name__)
            self.reduction_ratio = reduction_ratio_for_tokens(visual_tokens, self.num_patches, type(self).__name__)

    @property
    def num_patches(self) -> int:
        """Patch tokens per crop of the vision tower (576 for CLIP ViT-L/14 at 336 px, 729 for SigLIP at 384 px)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per crop given to the LLM (read-only: set `reduction_ratio`)."""
        return visual_tokens_per_crop(self.num_patches, self.reduction_ratio)

    @property
    def dominant_tokens(self) -> int:
        """Tokens per crop DVTS keeps."""
        return self.split_kept(self.visual_tokens)[0]

    @property
    def complement_tokens(self) -> int:
        """Tokens per crop TGVC produces."""
        return self.split_kept(self.visual_tokens)[1]

    @property
    def tgvc_enabled(self) -> bool:
        """Whether TGVC runs (and so whether a guidance text is needed): compression on and `dominant_ratio` < 1."""
        return self.compression_enabled and self.complement_tokens > 0

    def describe_budget(self) -> str:
        """The visual tokens per crop the LLM sees, with the settings that decide it (for error messages)."""
        return f"{self.visual_tokens} per crop (config.reduction_ratio={self.reduction_ratio})"

    def validate_budget_keeps_a_token(self) -> None:
        """Class validator: `reduction_ratio` keeps at least one of a crop's `num_patches` tokens."""
        check_keeps_a_token(self.reduction_ratio, self.num_patches, type(self).__name__)


def qwen_visual_tokens(units: int, reduction_ratio: float) -> int:
    """
    Tokens kept of an image (or a video's temporal slice) of `units` merged tokens: `max(1, round_half_up(units * (1 -
    reduction_ratio)))`, all of them for a ratio of 0.
    """
    return max(1, visual_tokens_per_crop(units, reduction_ratio))


@dataclass(kw_only=True)
class QwenSettings(CompressionSettings):
    """
    The VisionTrim settings of the Qwen configs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). The unit is the merged token the LLM
    sees (2 x 2 patches); each image, and each temporal slice of a video, is compressed on its own.

    Args:
        reduction_ratio (`float`, defaults to `1 - 64/576`):
            Share of each image's (video slice's) merged tokens removed, in [0, 1); 0 switches compression off. An
            image with `image_grid_thw = (t, h, w)` has `N = t * h * w / 4` merged tokens and keeps
            `K = max(1, round_half_up(N * (1 - reduction_ratio)))`; a video keeps `K` per slice of `h * w / 4`.
        dominant_ratio (`float`, defaults to 0.75):
            `K_d = round_half_up(K * dominant_ratio)` tokens are chosen by DVTS, the other `K - K_d` are TGVC's merged
            seeds.
        merge_iterations, merge_update:
            as in [`VisionTrimSettings`].
        empty_guidance (`str`, defaults to `"cls_similarity"`):
            For an image without a question: `"cls_similarity"` guides TGVC by the image's own mean merged token
            (Qwen's tower has no CLS token; logged once), `"error"` raises.
        dvts_layer (`int`, *optional*):
            The vision block whose attention (the attention each merged token receives) and output (the features of
            the local term) DVTS reads. None: the last full-attention block (`fullatt_block_indexes[-1]` for
            Qwen2.5-VL; the last block for Qwen2-VL and Qwen3-VL, whose blocks all attend over the whole image).
    """

    dvts_layer: int | None = None

    def __post_init__(self, visual_tokens: int | None = None, **kwargs):
        if visual_tokens is not None:
            raise ValueError(
                f"{type(self).__name__} takes its budget as a share of each image's tokens (images have any size): "
                f"set reduction_ratio={1 - visual_tokens / 576:.6f} instead of visual_tokens={visual_tokens} for "
                f"{visual_tokens} of every 576 tokens."
            )
        super().__post_init__(**kwargs)

    @property
    def scored_block(self) -> int:
        """The index of the vision block DVTS reads (`dvts_layer`, or the last full-attention block)."""
        if self.dvts_layer is not None:
            return self.dvts_layer
        full_attention_blocks = getattr(self.vision_config, "fullatt_block_indexes", None)
        return full_attention_blocks[-1] if full_attention_blocks else self.vision_config.depth - 1

    def kept_tokens(self, units: int) -> tuple[int, int]:
        """`(K_d, K_c)`: the DVTS tokens and TGVC seeds kept of an image (video slice) of `units` merged tokens."""
        kept = qwen_visual_tokens(units, self.reduction_ratio)
        return self.split_kept(kept) if self.compression_enabled else (kept, 0)

    def describe_budget(self) -> str:
        ratio = self.reduction_ratio
        return f"max(1, round_half_up(N * (1 - {ratio}))) of each image's N merged tokens (reduction_ratio)"

    def validate_dvts_layer(self) -> None:
        """Class validator: `dvts_layer` is None or a full-attention block of the vision tower."""
        owner, depth, layer = type(self).__name__, self.vision_config.depth, self.dvts_layer
        if layer is not None and not 0 <= layer < depth:
            raise ValueError(
                f"{owner}.dvts_layer must be None (the last full-attention block) or a vision block index in "
                f"[0, {depth - 1}], got {layer!r}."
            )
        full_attention_blocks = getattr(self.vision_config, "fullatt_block_indexes", None)
        if layer is not None and full_attention_blocks and layer not in full_attention_blocks:
            raise ValueError(
                f"{owner}.dvts_layer={layer} is a window-attention block: DVTS needs the attention over the whole "
                f"image, so pick one of fullatt_block_indexes {list(full_attention_blocks)} (or None for the last)."
            )


__all__ = [
    "CompressionSettings",
    "CropSettings",
    "QwenSettings",
    "check_budgets_agree",
    "check_reduction_ratio",
    "qwen_visual_tokens",
    "reduction_ratio_for_tokens",
    "round_half_up",
    "setting",
    "settings_fields",
    "strict_settings",
    "visual_tokens_per_crop",
]
