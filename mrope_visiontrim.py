# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim for the Qwen models, whose LLM places vision tokens by M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the merged
vision tokens of each image (each temporal slice of a video) are compressed by DVTS + TGVC after the tower, and the
kept tokens keep their M-RoPE (t, h, w) positions.

A base model takes `QwenModelMixin`: `get_image_features` / `get_video_features` compress, `get_rope_index` gathers
the positions of the uncompressed layout at the kept tokens, and `forward` encodes the media before the positions are
computed. A generation class takes `QwenGenerationMixin`, which encodes the media before `generate()` computes its
positions. A family's modeling file states what its model changes (Qwen3-VL: the DeepStack features, a video's
slices as separate blocks of the prompt). The algorithm is `compress_units` in `compression_visiontrim.py`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.utils.generic import can_return_tuple
from transformers.vision_utils import get_vision_window_index

from .compression_visiontrim import CompressedUnits, QwenTowerRun, compress_units_with_question, record_outputs
from .configuration_visiontrim import QwenSettings
from .modeling_visiontrim_utils import GUIDANCE_INPUTS, VisionTrimGenerationMixin, forward_inputs


# Each modality's pixels and grid inputs.
MEDIA_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
# `mm_token_type_ids` of each modality's placeholders.
MEDIA_TOKEN_TYPES = {"image": 1, "video": 2}


@dataclass
class QwenEncoderOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`tuple[torch.FloatTensor]`):
        Per image (video) its kept tokens `(tokens, text_hidden)`: per temporal slice its DVTS tokens, then its merged
        TGVC seeds.
    kept_units (`tuple[torch.LongTensor]`):
        Per image (video) `(tokens,)`: the unit (merged token, raster order over `(t, h / 2, w / 2)`) each kept token
        stands at; a merged TGVC token stands at its seed. Its M-RoPE position is that unit's.
    dominant_units (`torch.LongTensor` of shape `(dominant_tokens,)`):
        The units DVTS kept, all images (videos) in order.
    complement_seed_units (`torch.LongTensor` of shape `(complement_tokens,)`):
        The units of the TGVC seeds the other units were merged into.
    """

    kept_units: tuple[torch.LongTensor, ...] | None = None
    dominant_units: torch.LongTensor | None = None
    complement_seed_units: torch.LongTensor | None = None


def run_qwen_tower(
    tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, block_index: int, **kwargs
):
    """
    Runs a Qwen vision tower on packed patches, recording block `block_index`'s queries and keys (rotary embedding
    applied) and output, in raster order: Qwen2.5-VL runs its blocks in window order, which is undone here as the
    tower undoes it after the merger. Every block keeps its own attention kernel. Qwen3-VL's DeepStack sets become the
    run's companions.
    """
    block = tower.blocks[block_index]
    attention = block.attn
    with record_outputs(attention.qkv, block, inputs_of=(attention,)) as recorded:
        outputs = tower(pixel_values, grid_thw=grid_thw, **kwargs)
    num_patches = recorded[block].shape[0]
    query, key, _ = recorded[attention.qkv].view(num_patches, 3, attention.num_heads, -1).unbind(1)
    query, key = apply_rotary_pos_emb_vision(query, key, *recorded[attention]["position_embeddings"])
    query, key, features = query.flatten(1), key.flatten(1), recorded[block]
    unit_size = tower.spatial_merge_size**2
    if getattr(tower, "window_size", None) is not None:
        window_index, _ = get_vision_window_index(
            grid_thw, tower.spatial_merge_size, tower.window_size, tower.patch_size
        )
        raster_order = torch.argsort(window_index.to(query.device))

        def in_raster_order(values: torch.Tensor) -> torch.Tensor:
            return values.view(-1, unit_size, values.shape[-1])[raster_order].flatten(0, 1)

        query, key, features = in_raster_order(query), in_raster_order(key), in_raster_order(features)
    deepstack = getattr(outputs, "deepstack_features", None)  # Qwen3-VL
    return QwenTowerRun(
        outputs,
        query,
        key,
        features,
        grid_thw,
        tower.spatial_merge_size,
        attention.num_heads,
        attention.scaling,
        torch.cat(deepstack, dim=-1) if deepstack else None,
    )


def uncompressed_layout(
    token_types: torch.Tensor,
    valid: torch.Tensor,
    media: dict[int, tuple[tuple[torch.LongTensor, ...], torch.LongTensor]],
) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
    """
    Where the tokens of compressed prompts stand in the uncompressed layout, every image (video) at full size: text
    and padding keep their order, and each kept media token stands at its unit's place in its image's full block.

    Args:
        token_types: `(batch, sequence)` `mm_token_type_ids` of the compressed prompts, 0 at padding.
        valid: `(batch, sequence)` bool, False at padding.
        media: per token type (1 image, 2 video), the kept units of each block of placeholders (an image or a
            video; Qwen3-VL: a video's temporal slice) in prompt order, and the blocks' full unit counts `(blocks,)`.
    Returns:
        The `(batch, sequence)` index of each token in the uncompressed layout, and that layout's `(batch, length)`
        token types and validity (False at padding and past a shorter row's end).
    """
    # Each token's width in the uncompressed layout: 1 for text and padding; a whole image's (video's) units on its
    # last token, 0 on its other tokens. A token's place is then the widths before it, plus its unit for media.
    widths = (token_types == 0).long()
    units = torch.zeros_like(widths)
    is_last = torch.zeros_like(valid)
    for token_type, (kept_units, full_units) in media.items():
        is_media = token_types == token_type
        last_token = torch.cumsum(torch.tensor([len(kept) for kept in kept_units], device=widths.device), 0) - 1
        units[is_media] = torch.cat(kept_units).to(widths.device)
        media_widths = torch.zeros(int(is_media.sum()), dtype=torch.long, device=widths.device)
        widths[is_media] = media_widths.scatter(0, last_token, full_units.to(widths.device))
        is_last[is_media] = torch.zeros_like(media_widths, dtype=torch.bool).index_fill(0, last_token, True)
    start = torch.cumsum(widths, dim=1) - widths
    full_index = start + units
    batch, length = widths.shape[0], int(widths.sum(dim=1).max())
    # Each image's block [start, start + units) gets its type: +type at its start, -type after it, summed up.
    boundaries = torch.zeros(batch, length + 1, dtype=torch.long, device=widths.device)
    rows = torch.nonzero(is_last)[:, 0]
    block_types = token_types[is_last].long()
    boundaries.index_put_((rows, start[is_last]), block_types, accumulate=True)
    boundaries.index_put_((rows, start[is_last] + widths[is_last]), -block_types, accumulate=True)
    full_types = boundaries.cumsum(dim=1)[:, :-1]
    full_valid = torch.arange(length, device=widths.device) < widths.sum(dim=1, keepdim=True)
    full_valid[torch.nonzero(~valid, as_tuple=True)[0], full_index[~valid]] = False
    return full_index, full_types, full_valid


class QwenModelMixin:
    """
    What VisionTrim changes in a Qwen2-VL / Qwen2.5-VL base model: the media features are the DVTS + TGVC tokens of
    each image (video slice), guided by the question embedded with the LLM's own input embeddings, and the M-RoPE
    positions are those of the kept tokens in the uncompressed layout. Nothing is added to the weights.
    """

    config: QwenSettings

    def compress(
        self,
        modality: str,
        pixel_values: torch.Tensor,
        grid_thw: torch.LongTensor,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> QwenEncoderOutput:
        """Runs the tower on the packed `modality` patches and keeps `config.kept_tokens(N)` tokens per slice."""
        if grid_thw is None:
            raise ValueError(f"Compressing Qwen {modality}s needs `{MEDIA_INPUTS[modality][1]}` (the processor's).")
        run = run_qwen_tower(
            self.visual, pixel_values.type(self.visual.dtype), grid_thw, self.config.scored_block, **kwargs
        )
        return self.compress_run(modality, run, guidance_input_ids, guidance_attention_mask)

    def compress_run(
        self,
        modality: str,
        run: QwenTowerRun,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
    ) -> QwenEncoderOutput:
        """DVTS + TGVC of a recorded tower run (`run_qwen_tower`), the guidance embedded with the LLM's embeddings."""
        embeddings = self.get_input_embeddings()
        compressed = compress_units_with_question(
            run,
            self.config,
            embeddings,
            guidance_input_ids,
            guidance_attention_mask,
            modality,
            embeddings.weight.device,
        )
        return self.encoder_output(run, compressed)

    def encoder_output(self, run: QwenTowerRun, compressed: CompressedUnits) -> QwenEncoderOutput:
        """`get_*_features`' output: each item's kept tokens and units, and the tower's own outputs."""
        return QwenEncoderOutput(
            last_hidden_state=run.outputs.last_hidden_state,
            pooler_output=torch.split(compressed.features, compressed.tokens_per_media),
            hidden_states=run.outputs.hidden_states,
            attentions=run.outputs.attentions,
            kept_units=torch.split(compressed.kept_units, compressed.tokens_per_media),
            dominant_units=compressed.dominant_units,
            complement_seed_units=compressed.complement_seed_units,
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes packed image patches and keeps `config.kept_tokens(N)` tokens of each image of `N` merged tokens
        (DVTS + TGVC, guided by the `(images, text)` guidance ids, in the LLM's vocabulary). With compression off
        (`reduction_ratio=0`) this is the stock `get_image_features`.
        """
        if not self.config.compression_enabled:
            return super().get_image_features(pixel_values, image_grid_thw, **kwargs)
        return self.compress(
            "image", pixel_values, image_grid_thw, guidance_input_ids, guidance_attention_mask, **kwargs
        )

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes packed video patches and keeps `config.kept_tokens(N)` tokens of each temporal slice of `N` merged
        tokens, all slices of a video guided by its question. With compression off this is the stock
        `get_video_features`.
        """
        if not self.config.compression_enabled:
            return super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)
        return self.compress(
            "video",
            pixel_values_videos,
            video_grid_thw,
            video_guidance_input_ids,
            video_guidance_attention_mask,
            **kwargs,
        )

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        mm_token_type_ids: torch.IntTensor,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, QwenEncoderOutput] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The stock M-RoPE positions `(3, batch, sequence)` and deltas `(batch, 1)` of a compressed prompt: the stock
        positions of the uncompressed layout (every image at full size), gathered at the kept tokens
        (`mm_encoder_outputs[modality].kept_units`), so a kept token keeps its (t, h, w) position and the text after an
        image continues where it would after the whole image.
        """
        grids = {"image": image_grid_thw, "video": video_grid_thw}
        if not self.config.compression_enabled:
            return super().get_rope_index(
                input_ids,
                mm_token_type_ids,
                attention_mask=attention_mask,
                **{f"{m}_grid_thw": g for m, g in grids.items()},
                **kwargs,
            )
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        token_types = mm_token_type_ids.to(input_ids.device) * valid
        media = {}
        for modality, token_type in MEDIA_TOKEN_TYPES.items():
            if grids[modality] is None:
                continue
            kept_units = getattr((mm_encoder_outputs or {}).get(modality), "kept_units", None)
            if kept_units is None:
                raise ValueError(
                    f"The positions of a compressed prompt depend on which {modality} tokens the model kept: pass "
                    f"`mm_encoder_outputs={{'{modality}': model.get_{modality}_features(...)}}`, or call the model or "
                    "`generate()` with the pixels."
                )
            placeholders, kept = int((token_types == token_type).sum()), [len(units) for units in kept_units]
            if placeholders != sum(kept):
                raise ValueError(
                    f"The prompts hold {placeholders} {modality} placeholders but the model keeps {sum(kept)} "
                    f"{modality} tokens ({kept} per {modality}; {self.config.describe_budget()}): give the processor "
                    f"the model's reduction_ratio={self.config.reduction_ratio}."
                )
            media[token_type] = self.placeholder_blocks(modality, kept_units, grids[modality])
        full_index, full_types, full_valid = uncompressed_layout(token_types, valid, media)
        positions, deltas = super().get_rope_index(
            torch.zeros_like(full_types),
            full_types,
            attention_mask=full_valid.long(),
            **{f"{m}_grid_thw": g for m, g in grids.items()},
            **kwargs,
        )
        positions = positions.gather(2, full_index.unsqueeze(0).expand(3, -1, -1))
        removed = full_valid.sum(dim=1) - valid.sum(dim=1)
        return positions.masked_fill(~valid, 0), deltas + removed.unsqueeze(-1)

    def placeholder_blocks(
        self, modality: str, kept_units: tuple[torch.LongTensor, ...], grid_thw: torch.LongTensor
    ) -> tuple[tuple[torch.LongTensor, ...], torch.LongTensor]:
        """
        The blocks of consecutive placeholders the prompts hold for the items of `modality` (here one per item), in
        prompt order: each block's kept units (within the block) and `(blocks,)` its full unit count.
        """
        return kept_units, grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2

    def forward(self, *args, **kwargs):
        """
        The stock `forward`, with the media encoded first (each `get_*_features` given its guidance), so that with
        compression on the M-RoPE positions can be those of the kept tokens (`get_rope_index`).
        """
        stock_forward = super().forward
        inputs, guidance = forward_inputs(stock_forward, args, kwargs)
        if not self.config.compression_enabled:
            return stock_forward(**inputs)
        encoded = dict(inputs.get("mm_encoder_outputs") or {})
        for modality, (pixels_name, grid_name) in MEDIA_INPUTS.items():
            pixels = inputs.get(pixels_name)
            if pixels is None or encoded.get(modality) is not None:
                continue
            ids_name, mask_name = GUIDANCE_INPUTS[modality]
            encoder = getattr(self, f"get_{modality}_features")
            encoded[modality] = encoder(
                pixels, inputs.get(grid_name), guidance.get(ids_name), guidance.get(mask_name), return_dict=True
            )
            inputs[pixels_name] = None
        if encoded:
            inputs["mm_encoder_outputs"] = encoded
        cache = inputs.get("cache")
        is_prefill = cache is None or cache.get_seq_length() == 0 or self.rope_deltas is None
        has_media = inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        can_position = inputs.get("input_ids") is not None and inputs.get("mm_token_type_ids") is not None
        if inputs.get("position_ids") is None and is_prefill and has_media and can_position:
            rope_inputs = {
                name: inputs[name]
                for name in ("image_grid_thw", "video_grid_thw", "attention_mask", "second_per_grid_ts")
                if inputs.get(name) is not None
            }
            inputs["position_ids"], self.rope_deltas = self.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], mm_encoder_outputs=encoded, **rope_inputs
            )
        return stock_forward(**inputs)


class QwenGenerationMixin(VisionTrimGenerationMixin):
    """
    What VisionTrim changes in a Qwen generation class: its base model is the VisionTrim one, and with compression on
    `generate()` encodes the media before it computes the prompt's M-RoPE positions, which depend on the kept tokens.
    """

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        if not self.config.compression_enabled:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        rope_inputs = {
            name: model_kwargs[name]
            for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if model_kwargs.get(name) is not None
        }
        self._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        return super()._prepare_position_ids_for_generation(inputs_tensor, {**model_kwargs, **rope_inputs})


__all__ = [
    "MEDIA_INPUTS",
    "QwenEncoderOutput",
    "QwenGenerationMixin",
    "QwenModelMixin",
    "run_qwen_tower",
    "uncompressed_layout",
]
