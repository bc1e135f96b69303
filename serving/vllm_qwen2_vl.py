# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim Qwen2.5-VL and Qwen2-VL in vLLM (the shared design: `vllm_qwen.py`). Placeholders: an item of `N` merged
tokens per slice gets `max(1, round_half_up(N * (1 - reduction_ratio)))` per slice, from its grid alone, as the
folder's processor emits them. Positions: each item is one block of the prompt; the text after it continues at its
start plus its largest extent, time included (vLLM's rule for Qwen2.5-VL).
"""

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .vllm_common import GUIDANCE_FIELDS, ProfilingQuestionMixin, QuestionGuidanceMixin
from .vllm_qwen import (
    QWEN_USER_TURN,
    VisionTrimQwenProcessingInfoMixin,
    VisionTrimQwenVllmMixin,
)


class VisionTrimQwen2_5_VLProcessingInfo(VisionTrimQwenProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class VisionTrimQwen2VLProcessingInfo(VisionTrimQwenProcessingInfoMixin, Qwen2VLProcessingInfo):
    pass


class VisionTrimQwen2_5_VLDummyInputsBuilder(ProfilingQuestionMixin, Qwen2_5_VLDummyInputsBuilder):
    user_turn = QWEN_USER_TURN


class VisionTrimQwen2VLDummyInputsBuilder(ProfilingQuestionMixin, Qwen2VLDummyInputsBuilder):
    user_turn = QWEN_USER_TURN


class VisionTrimQwenProcessorMixin(QuestionGuidanceMixin):
    """vLLM's Qwen processing with the question of each prompt as guidance, and the kept tokens as placeholders."""

    guidance_fields = GUIDANCE_FIELDS

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        if not self.info.get_hf_config().compression_enabled:  # vLLM's own counts (EVS's, with video pruning)
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        merge_size = self.info.get_hf_config().vision_config.spatial_merge_size
        placeholder = {"image": vocab[processor.image_token], "video": vocab[processor.video_token]}

        def replacement(item_index: int, modality: str) -> list[int]:
            grid_thw = out_mm_kwargs[modality][item_index][f"{modality}_grid_thw"].data
            return [placeholder[modality]] * processor.kept_tokens(grid_thw, merge_size)

        return [
            PromptReplacement(
                modality=modality, target=[placeholder[modality]], replacement=partial(replacement, modality=modality)
            )
            for modality in ("image", "video")
        ]


class VisionTrimQwen2_5_VLMultiModalProcessor(VisionTrimQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


class VisionTrimQwen2VLMultiModalProcessor(VisionTrimQwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class VisionTrimQwen2VllmMixin(VisionTrimQwenVllmMixin):
    """The Qwen2.5-VL / Qwen2-VL positions: each item one block, its slices a time step apart."""

    def time_intervals(self, modality: str, media: Mapping[str, object], num_items: int) -> list[float]:
        """The temporal position step of each item's slices: 1, and for Qwen2.5-VL videos seconds x tokens/second."""
        seconds = media.get("second_per_grid_ts") if modality == "video" else None
        if seconds is None:
            return [1.0] * num_items
        tokens_per_second = self.config.vision_config.tokens_per_second
        return [float(value) * tokens_per_second for value in seconds.flatten().tolist()]

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """
        The prompt's M-RoPE positions `(3, tokens)` and delta at admission: text where stock Qwen puts it (after an
        item, at its start plus its largest extent), each kept token at its item's start until
        `recompute_mrope_positions` adds its unit's offsets.
        """
        if not self.config.compression_enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        pieces, text_start, next_position = [], 0, 0
        for feature, (offset, slices, rows, cols, interval) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            text_length = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            start = next_position + text_length
            pieces.append(np.full((3, feature.mm_position.length), start))
            extent = max(int((slices - 1) * interval), rows - 1, cols - 1) + 1
            next_position = start + extent
            text_start = offset + feature.mm_position.length
        text_length = len(input_tokens) - text_start
        pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimQwen2_5_VLMultiModalProcessor,
    info=VisionTrimQwen2_5_VLProcessingInfo,
    dummy_inputs=VisionTrimQwen2_5_VLDummyInputsBuilder,
)
class VisionTrimQwen2_5_VLForConditionalGeneration(VisionTrimQwen2VllmMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL keeping `max(1, round_half_up(N * (1 - reduction_ratio)))` tokens of each image (slice)."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimQwen2VLMultiModalProcessor,
    info=VisionTrimQwen2VLProcessingInfo,
    dummy_inputs=VisionTrimQwen2VLDummyInputsBuilder,
)
class VisionTrimQwen2VLForConditionalGeneration(VisionTrimQwen2VllmMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with VisionTrim, as [`VisionTrimQwen2_5_VLForConditionalGeneration`]."""
