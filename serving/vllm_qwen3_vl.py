# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim Qwen3-VL in vLLM, dense and MoE (the shared design: `vllm_qwen.py`). What Qwen3-VL changes:

- Placeholders: an image keeps `max(1, round_half_up(N * (1 - reduction_ratio)))` of its `N` merged tokens; a video
  keeps stock Qwen3-VL's layout, each temporal slice `<t seconds><|vision_start|>...<|vision_end|>`, with that many
  placeholders per slice, as the folder's processor emits them.
- DeepStack: vLLM's tower returns each merged token with its DeepStack rows beside it; they ride through
  `compress_units` as the run's companions (kept and merged with the same tokens), and vLLM's LLM takes them apart.
- Positions: every image and every video slice is its own block of the prompt (the text after a block continues at
  its start plus `max(h, w)`); a kept token's offset is its unit's (row, column) in its block.
"""

from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .vllm_common import GUIDANCE_FIELDS, GUIDANCE_INPUTS, ProfilingQuestionMixin, QuestionGuidanceMixin
from .vllm_qwen import (
    QWEN_USER_TURN,
    VisionTrimQwenProcessingInfoMixin,
    VisionTrimQwenVllmMixin,
)


class VisionTrimQwen3VLProcessingInfo(VisionTrimQwenProcessingInfoMixin, Qwen3VLProcessingInfo):
    pass


class VisionTrimQwen3VLMoeProcessingInfo(VisionTrimQwenProcessingInfoMixin, Qwen3VLMoeProcessingInfo):
    pass


class VisionTrimQwen3VLDummyInputsBuilder(ProfilingQuestionMixin, Qwen3VLDummyInputsBuilder):
    user_turn = QWEN_USER_TURN


class VisionTrimQwen3VLMultiModalProcessor(QuestionGuidanceMixin, Qwen3VLMultiModalProcessor):
    """
    vLLM's Qwen3-VL processing with the question of each prompt as guidance, and the kept tokens as placeholders: per
    image, and per video slice after the slice's timestamp.
    """

    guidance_fields = GUIDANCE_FIELDS

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        """
        The processed media plus each item's guidance (vLLM's Qwen3-VL processing calls the folder's processor once
        per video and once for the images, so the rows are made here, one per item, from the prompt's question).
        """
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        guidance = hf_processor_mm_kwargs.get("guidance_text")
        if not isinstance(guidance, str):
            return processed
        processor = self.info.get_hf_processor()
        for modality, (ids_name, _) in GUIDANCE_INPUTS.items():
            grids = processed.get(f"{modality}_grid_thw")
            if grids is not None and len(grids):
                prefix = ids_name.removesuffix("_input_ids")
                processed.update(processor.tokenize_guidance([guidance] * len(grids), prefix, "pt"))
        return processed

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        if not config.compression_enabled:  # vLLM's own counts (EVS's, with video pruning)
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge_size = config.vision_config.spatial_merge_size

        def image(item_index: int) -> list[int]:
            grid_thw = out_mm_kwargs["image"][item_index]["image_grid_thw"].data
            return [config.image_token_id] * processor.kept_tokens(grid_thw, merge_size)

        def video(item_index: int):
            item = out_mm_kwargs["video"][item_index]
            slices, height, width = (int(value) for value in item["video_grid_thw"].data)
            kept = processor.kept_tokens((1, height, width), merge_size)
            return self.get_video_repl(
                tokens_per_frame=[kept] * slices,
                timestamps=item["timestamps"].data,
                tokenizer=self.info.get_tokenizer(),
                vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id,
                select_token_id=True,
            )

        target = [config.video_token_id]
        if not self._expands_only_video_token(processor):
            target = [config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]
        return [
            PromptReplacement(modality="image", target=[config.image_token_id], replacement=image),
            PromptReplacement(modality="video", target=target, replacement=video),
        ]


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimQwen3VLMultiModalProcessor,
    info=VisionTrimQwen3VLProcessingInfo,
    dummy_inputs=VisionTrimQwen3VLDummyInputsBuilder,
)
class VisionTrimQwen3VLForConditionalGeneration(VisionTrimQwenVllmMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL keeping `max(1, round_half_up(N * (1 - reduction_ratio)))` tokens of each image (slice)."""

    def tower_outputs(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vLLM's Qwen3-VL tower gives each merged token `(visual_dim,)` then its DeepStack rows, side by side."""
        return outputs[:, : self.visual_dim], outputs[:, self.visual_dim :]

    def time_intervals(self, modality: str, media: Mapping[str, object], num_items: int) -> list[float]:
        """Each slice is its own block of the prompt: a kept token's offset is within its slice (no time step)."""
        return [0.0] * num_items

    def placeholder_blocks(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> Iterator[tuple[int, int, int, int]]:
        """Each block of placeholders: its offset in the prompt, its unit grid's rows and columns, its kept tokens."""
        merge_size = self.config.vision_config.spatial_merge_size
        video_blocks = partial(
            self._iter_mm_grid_hw,
            input_tokens,
            video_token_id=self.config.video_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
            vision_end_token_id=self.config.vision_end_token_id,
            spatial_merge_size=merge_size,
        )
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            if feature.modality == "image":
                _, height, width = feature.data["image_grid_thw"].data.tolist()
                yield feature.mm_position.offset, height // merge_size, width // merge_size, feature.mm_position.length
            else:  # one block per slice, found between its vision start and end tokens
                yield from video_blocks([feature])

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """
        The prompt's M-RoPE positions `(3, tokens)` and delta at admission: text (timestamps included) where stock
        Qwen3-VL puts it, after a block at its start plus `max(h, w)`; each kept token at its block's start until
        `recompute_mrope_positions` adds its unit's offsets.
        """
        if not self.config.compression_enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces, text_start, next_position = [], 0, 0
        for offset, rows, cols, tokens in self.placeholder_blocks(input_tokens, mm_features):
            text_length = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            start = next_position + text_length
            pieces.append(np.full((3, tokens), start))
            next_position = start + max(rows, cols)
            text_start = offset + tokens
        text_length = len(input_tokens) - text_start
        pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimQwen3VLMultiModalProcessor,
    info=VisionTrimQwen3VLMoeProcessingInfo,
    dummy_inputs=VisionTrimQwen3VLDummyInputsBuilder,
)
class VisionTrimQwen3VLMoeForConditionalGeneration(
    VisionTrimQwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
):
    """vLLM's Qwen3-VL MoE, compressed as the dense model (the vision path is the same)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        text_config = vllm_config.model_config.hf_config.text_config
        if getattr(text_config, "norm_topk_prob", None) is not True:
            raise ValueError(
                f"{vllm_config.model_config.model}: vLLM's Qwen3 MoE layers renormalise the router's top-k weights "
                "only if the text config's `norm_topk_prob` is true, and Qwen3-VL MoE always does (Transformers "
                'leaves the field out for that reason). Set `"norm_topk_prob": true` in config.json\'s '
                "`text_config`, as the released Qwen3-VL MoE checkpoints and `visiontrim-convert` write it."
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
