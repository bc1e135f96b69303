# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
PyTorch VisionTrim Qwen3-VL (dense and MoE): the Qwen models' compression (`mrope_visiontrim.py`), plus what Qwen3-VL
changes. DeepStack: the tower's DeepStack feature sets (added to the LLM's first layers at the visual positions) keep
the same tokens as the main features, selected and merged with the same units and TGVC assignments, so row `i` of
every set describes the same token. Videos: the prompt holds each temporal slice as its own block of placeholders,
after that slice's timestamp, and each slice keeps at least one token.
"""

from dataclasses import dataclass

import torch
from transformers import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeModel,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Transpose, WeightConverter

from .compression_visiontrim import CompressedUnits, QwenTowerRun
from .configuration_visiontrim_qwen3_vl import VisionTrimQwen3VLConfig, VisionTrimQwen3VLMoeConfig
from .modeling_visiontrim_utils import with_guidance_inputs
from .mrope_visiontrim import QwenEncoderOutput, QwenGenerationMixin, QwenModelMixin


@dataclass
class Qwen3EncoderOutput(QwenEncoderOutput):
    r"""
    deepstack_features (`list[tuple[torch.FloatTensor]]`):
        Per DeepStack level, per image (video) `(tokens, text_hidden)`: the rows of the kept tokens, in the order of
        `pooler_output` (a merged token's row merged like its main row).
    """

    deepstack_features: list[tuple[torch.FloatTensor, ...]] | None = None


class Qwen3ModelMixin(QwenModelMixin):
    """What Qwen3-VL changes in the Qwen models' compression: DeepStack rows, and a video's slices as blocks."""

    def encoder_output(self, run: QwenTowerRun, compressed: CompressedUnits) -> Qwen3EncoderOutput:
        output = super().encoder_output(run, compressed)
        levels = compressed.companions.chunk(len(run.outputs.deepstack_features), dim=-1)
        deepstack = [torch.split(level, compressed.tokens_per_media) for level in levels]
        return Qwen3EncoderOutput(**output, deepstack_features=deepstack)

    def placeholder_blocks(
        self, modality: str, kept_units: tuple[torch.LongTensor, ...], grid_thw: torch.LongTensor
    ) -> tuple[tuple[torch.LongTensor, ...], torch.LongTensor]:
        """Images: one block each. Videos: one block per temporal slice (the prompt puts its timestamp before it)."""
        if modality == "image":
            return super().placeholder_blocks(modality, kept_units, grid_thw)
        frames = grid_thw[:, 0].to(kept_units[0].device)
        slice_units = (grid_thw[:, 1:].prod(-1) // self.config.vision_config.spatial_merge_size**2).to(frames)
        lengths = torch.tensor([len(units) for units in kept_units], device=frames.device)
        video_of_token = torch.arange(len(kept_units), device=frames.device).repeat_interleave(lengths)
        units = torch.cat(kept_units)
        first_slice = frames.cumsum(0) - frames
        slice_of_token = first_slice[video_of_token] + units // slice_units[video_of_token]
        tokens_per_slice = torch.bincount(slice_of_token, minlength=int(frames.sum()))
        local_units = units % slice_units[video_of_token]
        return torch.split(local_units, tokens_per_slice.tolist()), slice_units.repeat_interleave(frames)


class VisionTrimQwen3VLModel(Qwen3ModelMixin, Qwen3VLModel):
    """`Qwen3VLModel` whose media features (main and DeepStack) are the DVTS + TGVC tokens of each image (slice)."""

    config: VisionTrimQwen3VLConfig


class VisionTrimQwen3VLForConditionalGeneration(QwenGenerationMixin, Qwen3VLForConditionalGeneration):
    """
    Qwen3-VL with VisionTrim: an image of `N` merged tokens gives the LLM `max(1, round_half_up(N * (1 -
    reduction_ratio)))` of them (DVTS-selected, then TGVC-merged), a video that many per temporal slice, at their own
    interleaved M-RoPE positions, with their DeepStack rows. Inputs come from `VisionTrimQwen3VLProcessor`.
    """

    config: VisionTrimQwen3VLConfig
    base_model_class = VisionTrimQwen3VLModel
    forward = with_guidance_inputs(Qwen3VLForConditionalGeneration.forward, "image", "video")


class VisionTrimQwen3VLMoeModel(Qwen3ModelMixin, Qwen3VLMoeModel):
    """`Qwen3VLMoeModel` with VisionTrim, as [`VisionTrimQwen3VLModel`]."""

    config: VisionTrimQwen3VLMoeConfig


class VisionTrimQwen3VLMoeForConditionalGeneration(QwenGenerationMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL MoE with VisionTrim, as [`VisionTrimQwen3VLForConditionalGeneration`]."""

    config: VisionTrimQwen3VLMoeConfig
    base_model_class = VisionTrimQwen3VLMoeModel
    forward = with_guidance_inputs(Qwen3VLMoeForConditionalGeneration.forward, "image", "video")


class ReleasedExpertLayout(Transpose):
    """
    The experts of the released Qwen3-VL MoE checkpoints, `(experts, in, out)`, where Transformers holds
    `(experts, out, in)`. VisionTrim folders hold the released layout, which vLLM's Qwen3-VL MoE loads (stock
    Transformers saves its own), so the experts are always transposed on save. On load, a checkpoint in Transformers'
    own layout (a stock folder saved by Transformers, for the converter) is taken as it is; a square expert, whose
    layout its shape cannot tell, is taken as released.
    """

    def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs) -> dict:
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        expected = kwargs["model"].get_parameter(kwargs["full_layer_name"]).shape
        if tensor.shape == expected and tensor.shape[self.dim0] != tensor.shape[self.dim1]:
            return {self.get_target_pattern(input_dict, source_patterns, target_patterns): tensor}
        return super().convert(input_dict, source_patterns, target_patterns, **kwargs)

    @property
    def reverse_op(self) -> Transpose:
        return Transpose(dim0=self.dim1, dim1=self.dim0)


# Transformers converts a checkpoint's experts only for the classes it registers.
register_checkpoint_conversion_mapping(
    VisionTrimQwen3VLMoeForConditionalGeneration.__name__,
    [
        WeightConverter(f"mlp.experts.{name}", f"mlp.experts.{name}", operations=[ReleasedExpertLayout(1, 2)])
        for name in ("gate_up_proj", "down_proj")
    ],
    overwrite=True,
)
for model_class in (VisionTrimQwen3VLForConditionalGeneration, VisionTrimQwen3VLMoeForConditionalGeneration):
    model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "Qwen3EncoderOutput",
    "VisionTrimQwen3VLForConditionalGeneration",
    "VisionTrimQwen3VLModel",
    "VisionTrimQwen3VLMoeForConditionalGeneration",
    "VisionTrimQwen3VLMoeModel",
]
