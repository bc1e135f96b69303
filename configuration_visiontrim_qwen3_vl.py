# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""VisionTrim configuration of the Qwen3-VL family: the Qwen3-VL config (dense) and its MoE variant."""

from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

from .configuration_visiontrim import QwenSettings, setting, strict_settings, valid_reduction_ratio


# Qwen models lose far more accuracy than LLaVA at LLaVA's 88.9% (see the model card): half of each image by default.
QWEN3_DEFAULT_REDUCTION_RATIO = 0.5


@strict_settings
class VisionTrimQwen3VLConfig(QwenSettings, Qwen3VLConfig):
    r"""
    Configuration of [`VisionTrimQwen3VLForConditionalGeneration`]: a [`Qwen3VLConfig`] plus the VisionTrim settings
    of [`QwenSettings`]. Every Qwen3-VL vision block attends over a whole temporal slice, so DVTS reads the last block
    by default (`dvts_layer`: any other). Each DeepStack feature set keeps the same tokens as the main features. The
    default `reduction_ratio` is 0.5, not LLaVA's 0.889: at ~90% pruning Qwen models lose far more accuracy.

    Example:

    ```python
    >>> config = VisionTrimQwen3VLConfig()  # reduction_ratio=0.5: a 1024 x 768 image keeps 384 of its 768 tokens
    >>> config.kept_tokens(768)
    (288, 96)
    ```"""

    model_type = "visiontrim_qwen3_vl"
    reduction_ratio: int | float = setting(valid_reduction_ratio, QWEN3_DEFAULT_REDUCTION_RATIO)


@strict_settings
class VisionTrimQwen3VLMoeConfig(QwenSettings, Qwen3VLMoeConfig):
    r"""
    Configuration of [`VisionTrimQwen3VLMoeForConditionalGeneration`]: a [`Qwen3VLMoeConfig`] plus the VisionTrim
    settings of [`QwenSettings`], as [`VisionTrimQwen3VLConfig`] (the MoE models share Qwen3-VL's vision tower).
    The text config states `norm_topk_prob=True` where it is absent, as the released checkpoints do: Qwen3-VL MoE
    always renormalises its router's top-k weights, and vLLM's MoE layers read the field.
    """

    model_type = "visiontrim_qwen3_vl_moe"
    reduction_ratio: int | float = setting(valid_reduction_ratio, QWEN3_DEFAULT_REDUCTION_RATIO)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not hasattr(self.text_config, "norm_topk_prob"):
            self.text_config.norm_topk_prob = True


VisionTrimQwen3VLConfig.register_for_auto_class()
VisionTrimQwen3VLMoeConfig.register_for_auto_class()

__all__ = ["QWEN3_DEFAULT_REDUCTION_RATIO", "VisionTrimQwen3VLConfig", "VisionTrimQwen3VLMoeConfig"]
