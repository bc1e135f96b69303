# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
PyTorch VisionTrim LLaVA: LLaVA, LLaVA-NeXT, Video-LLaVA and LLaVA-NeXT-Video whose vision tokens (per image crop and
per video frame) are compressed by DVTS + TGVC before the projector.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    CLIPTextModelWithProjection,
    LlamaModel,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoModel,
    MistralModel,
    VideoLlavaForConditionalGeneration,
    VideoLlavaModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextModelOutputWithPast,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
    image_size_to_num_patches,
)
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoCausalLMOutputWithPast,
    LlavaNextVideoModelOutputWithPast,
    LlavaNextVideoMultiModalProjector,
    LlavaNextVideoPooler,
    LlavaNextVideoPreTrainedModel,
)
from transformers.models.video_llava.modeling_video_llava import (
    VideoLlavaCausalLMOutputWithPast,
    VideoLlavaModelOutputWithPast,
    VideoLlavaMultiModalProjector,
    VideoLlavaPreTrainedModel,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs, select_hidden_states

from .compression_visiontrim import (
    DominantVisionTokenSelection,
    TextGuidedVisionComplement,
    causal_attention_probabilities,
    gather_tokens,
    head_mean_attention,
    keep_per_image,
    llm_stage_scores,
    merge_into_kept,
    positions_where_false,
    pruned_order,
)
from .configuration_visiontrim import (
    AnyresSettings,
    VisionTrimLlavaConfig,
    VisionTrimLlavaNextConfig,
    VisionTrimLlavaNextVideoConfig,
    VisionTrimSettings,
    VisionTrimVideoLlavaConfig,
    vision_attention_layer,
)


# CLIP's initial temperature, log(1 / 0.07); trained CLIP checkpoints bring their own value.
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)

# Outputs of the projections recorded while the vision tower runs, per thread/task (see `record_outputs`).
_RECORDED_OUTPUTS: ContextVar[dict[nn.Module, torch.Tensor] | None] = ContextVar("visiontrim_recorded", default=None)


def _record_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    recorded = _RECORDED_OUTPUTS.get()
    if recorded is not None:
        recorded[module] = output


@contextmanager
def record_outputs(*modules: nn.Module) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """
    Records the outputs of `modules` during the block, keyed by module. The hooks live only for the block and write to
    a context-local dict, so concurrent calls on one model each see their own tensors.
    """
    recorded: dict[nn.Module, torch.Tensor] = {}
    context = _RECORDED_OUTPUTS.set(recorded)
    handles = [module.register_forward_hook(_record_output) for module in modules]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        _RECORDED_OUTPUTS.reset(context)


@dataclass
class VisionTrimImageOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`list[torch.FloatTensor]` or `torch.FloatTensor`):
        The projected tokens given to the LLM, in the stock class's layout: per image a `(tokens, text_hidden)` tensor
        (LLaVA, LLaVA-NeXT), or one tensor (Video-LLaVA images `(images, tokens, text_hidden)`, Video-LLaVA videos
        `(videos * frames, tokens, text_hidden)`, LLaVA-NeXT-Video videos `(videos, frames * tokens, text_hidden)`).
    dominant_indices (`torch.LongTensor` of shape `(crops, dominant_tokens)`):
        Raster indices, in each crop's patch grid, of the tokens DVTS kept (ascending).
    complement_seed_indices (`torch.LongTensor` of shape `(crops, complement_tokens)`):
        Raster indices of the TGVC seed tokens the other tokens were merged into (ascending).
    """

    dominant_indices: torch.LongTensor | None = None
    complement_seed_indices: torch.LongTensor | None = None


@dataclass
class VisionTowerRun:
    """The vision tower's outputs for a batch of crops, with what DVTS needs of the selected layer's attention."""

    outputs: BaseModelOutputWithPooling
    features: torch.Tensor  # (crops, patches + 1, vision_hidden): selected-layer features, CLS first
    attention: nn.Module  # that layer's attention block (num_heads, scale)
    query: torch.Tensor  # (crops, patches + 1, vision_hidden): its projected queries
    key: torch.Tensor  # (crops, patches + 1, vision_hidden): its projected keys
    visual_projection: nn.Module  # the tower's CLIP projection into the guidance text's embedding space
    logit_scale: torch.Tensor  # the tower's CLIP logit scale


@dataclass
class CompressedCrops:
    """DVTS + TGVC output for a batch of crops."""

    features: torch.Tensor  # (crops, visual_tokens, vision_hidden): DVTS tokens, then the merged TGVC seeds
    dominant_indices: torch.LongTensor  # (crops, dominant_tokens)
    complement_seed_indices: torch.LongTensor  # (crops, complement_tokens)


@dataclass
class LlmStagePruning:
    """Which prompt positions the layers from `llm_stage_layer` on keep; saved on the cache for the decode steps."""

    index: torch.LongTensor  # (batch, kept): kept prompt positions, left-padded
    valid: torch.BoolTensor  # (batch, kept): False at padding slots
    prompt_length: int


class LlmStageDecoderMixin:
    """
    A Llama-family decoder with VisionTrim's LLM stage (`config.llm_stage_layer` of the VisionTrim config set as
    `visiontrim_config`): during prefill, the visual tokens are ranked by layer `L-1`'s attention to the prompt's text,
    `llm_stage_tokens` per image are kept, the others merged into them, and layers >= `L` run on the shorter sequence
    with the kept tokens' original positions. Their cache holds the short prefix; every later step masks each layer
    for its own cache length. With the stage off (or no visual token) this is the stock decoder, step for step; a
    prompt continued on a cache that already holds tokens is not pruned.
    """

    visiontrim_config: VisionTrimSettings | None = None

    def build_mask(self, inputs_embeds, attention_mask, cache, position_ids, layer_idx=None):
        mask_function = create_causal_mask
        if getattr(self.config, "sliding_window", None) is not None:
            mask_function = create_sliding_window_causal_mask
        return mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer_idx,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        visual_token_mask: torch.Tensor | None = None,
        visual_keep_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        visual_token_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
            True at visual tokens (from `input_ids == image_token_id`); without it nothing is pruned.
        visual_keep_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
            Kept positions to use instead of ranking them (to recompute a pruned prefix exactly).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        stage = (
            self.visiontrim_config
            if self.visiontrim_config is not None and self.visiontrim_config.llm_stage_enabled
            else None
        )
        pruning = getattr(cache, "visiontrim_pruning", None) if stage is not None else None
        # Only a prompt on an empty cache is pruned: its positions are the whole prefix the later layers will see.
        prune_now = (
            stage is not None
            and pruning is None
            and (cache is None or cache.get_seq_length() == 0)
            and visual_token_mask is not None
            and inputs_embeds.shape[1] > 1
            and bool(visual_token_mask.any())
        )
        batch, tokens = inputs_embeds.shape[:2]
        key_mask = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch, tokens, dtype=torch.bool, device=inputs_embeds.device)
        )
        causal_mask = self.build_mask(inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        probabilities = None

        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if stage is not None and index == stage.llm_stage_layer and (prune_now or pruning is not None):
                if prune_now:
                    keep = visual_keep_mask
                    if keep is None:
                        scores = llm_stage_scores(probabilities, visual_token_mask, key_mask, stage.llm_stage_score)
                        keep = keep_per_image(scores, visual_token_mask, stage.llm_stage_tokens)
                    keep = keep.bool() & key_mask
                    hidden_states = merge_into_kept(
                        hidden_states, keep, visual_token_mask, stage.merge_iterations, stage.merge_update
                    )
                    kept, valid = pruned_order(keep)
                    pruning = LlmStagePruning(kept, valid, tokens)
                    if cache is not None:
                        cache.visiontrim_pruning = pruning
                    hidden_states = gather_tokens(hidden_states, kept)
                    position_ids = position_ids.expand(batch, -1).gather(1, kept)
                    layer_mask = valid.long()
                else:  # a decode step: the kept prefix, then every token seen since
                    seen = cache.get_seq_length(stage.llm_stage_layer) + tokens - pruning.index.shape[1]
                    tail = (
                        attention_mask[:, pruning.prompt_length :]
                        if attention_mask is not None
                        else torch.ones(batch, seen, dtype=torch.long, device=inputs_embeds.device)
                    )
                    layer_mask = torch.cat([pruning.valid.long(), tail.long()], dim=1)
                causal_mask = self.build_mask(hidden_states, layer_mask, cache, position_ids, stage.llm_stage_layer)
                position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
            if prune_now and visual_keep_mask is None and index == stage.llm_stage_layer - 1:
                probabilities = causal_attention_probabilities(
                    decoder_layer.self_attn,
                    decoder_layer.input_layernorm(hidden_states),
                    position_embeddings,
                    key_mask,
                )
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class VisionTrimLlamaModel(LlmStageDecoderMixin, LlamaModel):
    """`LlamaModel` (Vicuna: LLaVA-1.5 and 1.6) with VisionTrim's LLM stage; same weights and key names."""


class VisionTrimMistralModel(LlmStageDecoderMixin, MistralModel):
    """`MistralModel` (LLaVA-1.6-Mistral) with VisionTrim's LLM stage; same weights and key names."""


LLM_STAGE_DECODERS = {"llama": VisionTrimLlamaModel, "mistral": VisionTrimMistralModel}


def build_language_model(config: VisionTrimSettings) -> nn.Module:
    """The LLM: the LLM-stage decoder for Llama / Mistral (it reads `config` live), the stock one otherwise."""
    decoder_class = LLM_STAGE_DECODERS.get(config.text_config.model_type)
    if decoder_class is None:
        return AutoModel.from_config(config.text_config)
    decoder = decoder_class._from_config(config.text_config)
    decoder.visiontrim_config = config
    return decoder


class VisionTrimModelMixin:
    """
    The VisionTrim parts of a LLaVA-family base model, shared by the LLaVA, LLaVA-NeXT, Video-LLaVA and
    LLaVA-NeXT-Video classes: the CLIP text tower (`guidance_encoder`), CLIP's `visual_projection` and `logit_scale`
    (named so a `CLIPModel`'s weights map one to one), and DVTS + TGVC applied to a batch of crops or video frames.
    """

    config: VisionTrimSettings

    def init_visiontrim_modules(self, config: VisionTrimSettings) -> None:
        self.guidance_encoder = CLIPTextModelWithProjection(config.guidance_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        self.dominant_selection = DominantVisionTokenSelection(config)
        self.text_guided_complement = TextGuidedVisionComplement(config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisionTrimModelMixin):
            for name in ("logit_scale", "video_logit_scale"):
                if hasattr(module, name):
                    init.constant_(getattr(module, name), CLIP_LOGIT_SCALE_INIT)

    def clip_head(self, tower: nn.Module) -> tuple[nn.Module, torch.Tensor]:
        """The CLIP `visual_projection` and `logit_scale` that pair `tower`'s features with the guidance text."""
        return self.visual_projection, self.logit_scale

    def vision_attention_module(
        self, tower: nn.Module, vision_feature_layer: int, vision_feature_select_strategy: str
    ) -> nn.Module:
        """The attention block of `tower`'s layer whose output is `hidden_states[vision_feature_layer]`."""
        layer_index = vision_attention_layer(
            vision_feature_layer,
            vision_feature_select_strategy,
            self.config.vision_config.num_hidden_layers,
            type(self.config).__name__,
        )
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        attention = getattr(layers[layer_index], "self_attn", None) if layers is not None else None
        if attention is None or not all(
            hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "scale")
        ):
            raise ValueError(
                f"VisionTrim reads the attention of vision layer {layer_index} through "
                f"`vision_tower.encoder.layers[{layer_index}].self_attn` (q_proj, k_proj, num_heads, scale), which "
                f"{type(tower).__name__} does not have; use a CLIP-style vision tower."
            )
        return attention

    def encode_guidance(
        self,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
        num_images: int,
        input_name: str = "guidance",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Encodes the guidance text of each image (or video) with the CLIP text tower.

        Args:
            guidance_input_ids: `(images, text)` CLIP token ids, one row per image.
            guidance_attention_mask: `(images, text)`; a row of zeros marks an empty guidance text.
            input_name: the inputs' name prefix in error messages ("guidance", or "video_guidance" for videos).
        Returns:
            L2-normalised float32 token embeddings `(images, text, projection_dim)` and their validity mask
            `(images, text)` (bool; all False for an empty guidance text).
        """
        unit = "video" if input_name == "video_guidance" else "image"
        if guidance_input_ids is None:
            raise ValueError(
                f"TGVC needs the question of each {unit}: pass `{input_name}_input_ids` and "
                f"`{input_name}_attention_mask` (the VisionTrim processor returns them; give it `guidance_text=` to "
                "choose the text), or set `config.dominant_ratio=1.0` to run DVTS only."
            )
        if guidance_attention_mask is None:
            guidance_attention_mask = torch.ones_like(guidance_input_ids)
        if guidance_input_ids.shape[0] != num_images or guidance_attention_mask.shape != guidance_input_ids.shape:
            raise ValueError(
                f"`{input_name}_input_ids` {tuple(guidance_input_ids.shape)} and `{input_name}_attention_mask` "
                f"{tuple(guidance_attention_mask.shape)} must both have one row per {unit} ({num_images} {unit}s): "
                f"the VisionTrim processor repeats each prompt's guidance for each of its {unit}s."
            )
        device = self.guidance_encoder.device
        input_ids = guidance_input_ids.to(device)
        text_mask = guidance_attention_mask.to(device).bool()
        has_text = text_mask.any(dim=-1)
        if self.config.empty_guidance == "error" and not bool(has_text.all()):
            empty = torch.nonzero(~has_text).flatten().tolist()
            raise ValueError(
                f"The guidance text of {unit}(s) {empty} is empty, so TGVC has no question to rank tokens by: pass "
                "a non-empty `guidance_text=` to the processor, or set `config.empty_guidance='cls_similarity'` to "
                f"guide those {unit}s by their own CLS token."
            )
        # Rows without text still run on their special tokens, so no attention row is fully masked; they are ignored.
        encoder_mask = torch.where(has_text.unsqueeze(-1), text_mask, torch.ones_like(text_mask))
        hidden_states = self.guidance_encoder.text_model(input_ids=input_ids, attention_mask=encoder_mask.long())
        text_embeds = F.normalize(
            self.guidance_encoder.text_projection(hidden_states.last_hidden_state).float(), dim=-1
        )
        return text_embeds, text_mask

    def add_class_guidance(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, class_tokens: torch.Tensor, projection: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Guides the crops without guidance text (`config.empty_guidance == "cls_similarity"`) by their own CLS token:
        prepends a slot holding the crop's normalised `visual_projection(CLS)`, valid only for those crops.

        Args:
            text_embeds, text_mask: `(crops, text, projection_dim)` and `(crops, text)` from `encode_guidance`.
            class_tokens: `(crops, vision_hidden)` CLS tokens of the selected vision layer.
            projection: the tower's CLIP `visual_projection`.
        """
        has_text = text_mask.any(dim=-1)
        if bool(has_text.all()):
            return text_embeds, text_mask
        class_embeds = F.normalize(projection(class_tokens).float(), dim=-1).to(text_embeds.device)
        text_embeds = torch.cat([class_embeds.unsqueeze(1), text_embeds], dim=1)
        text_mask = torch.cat([~has_text.unsqueeze(-1), text_mask], dim=1)
        return text_embeds, text_mask

    def compress_crops(
        self,
        run: VisionTowerRun,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
        crops_per_image: list[int] | None = None,
        input_name: str = "guidance",
    ) -> CompressedCrops:
        """
        DVTS then TGVC on a batch of crops, all at once.

        Args:
            run: the `run_vision_tower` result: the selected layer's `(crops, patches + 1, vision_hidden)` features
                (CLS first, pre-layernorm), its attention block and its projected queries and keys.
            guidance_input_ids, guidance_attention_mask: `(images, text)` guidance of each image.
            crops_per_image: how many consecutive crops (or frames) each image (or video) has (default: one crop
                per image); the crops of an image share its guidance.
            input_name: the guidance inputs' name prefix in error messages ("guidance" or "video_guidance").
        """
        class_tokens, patches = run.features[:, 0], run.features[:, 1:]
        num_crops, num_patches, _ = patches.shape
        if num_patches != self.config.num_patches:
            raise ValueError(
                f"The vision tower gave {num_patches} patch tokens per crop but the config expects "
                f"{self.config.num_patches} ({self.config.vision_config.image_size} px / patch "
                f"{self.config.vision_config.patch_size}): feed images at the tower's resolution."
            )
        num_dominant = self.config.dominant_tokens
        if num_dominant > 0:
            rows = run.key.shape[1] if self.dominant_selection.needs_full_attention else 1
            attention_map = head_mean_attention(
                run.query[:, :rows], run.key, run.attention.num_heads, run.attention.scale
            )
            dominant_indices = self.dominant_selection(patches, attention_map)
        else:
            dominant_indices = torch.empty(num_crops, 0, dtype=torch.long, device=patches.device)
        dominant = gather_tokens(patches, dominant_indices)
        if not self.config.tgvc_enabled:
            return CompressedCrops(dominant, dominant_indices, dominant_indices[:, :0])

        crops_per_image = crops_per_image or [1] * num_crops
        text_embeds, text_mask = self.encode_guidance(
            guidance_input_ids, guidance_attention_mask, len(crops_per_image), input_name
        )
        repeats = torch.tensor(crops_per_image, device=text_embeds.device)
        text_embeds = text_embeds.repeat_interleave(repeats, dim=0).to(patches.device)
        text_mask = text_mask.repeat_interleave(repeats, dim=0).to(patches.device)
        text_embeds, text_mask = self.add_class_guidance(text_embeds, text_mask, class_tokens, run.visual_projection)

        is_dominant = torch.zeros(num_crops, num_patches, dtype=torch.bool, device=patches.device)
        is_dominant = is_dominant.scatter(1, dominant_indices, True)
        remaining_indices = positions_where_false(is_dominant, num_patches - num_dominant)
        remaining = gather_tokens(patches, remaining_indices)
        remaining_embeds = F.normalize(run.visual_projection(remaining).float(), dim=-1)
        merged, seed_positions = self.text_guided_complement(
            remaining, remaining_embeds, text_embeds, text_mask, run.logit_scale, run.visual_projection
        )
        return CompressedCrops(
            torch.cat([dominant, merged], dim=1), dominant_indices, remaining_indices.gather(1, seed_positions)
        )

    def run_vision_tower(
        self,
        tower: nn.Module,
        pixel_values: torch.Tensor,
        vision_feature_layer: int,
        vision_feature_select_strategy: str,
        **kwargs,
    ) -> VisionTowerRun:
        """Runs `tower` on `(crops, 3, height, width)` pixels, recording the selected layer's q and k."""
        attention = self.vision_attention_module(tower, vision_feature_layer, vision_feature_select_strategy)
        kwargs.setdefault("output_hidden_states", vision_feature_layer)  # only the selected layer is kept
        with record_outputs(attention.q_proj, attention.k_proj) as recorded:
            outputs = tower(pixel_values, return_dict=True, **kwargs)
        return VisionTowerRun(
            outputs,
            outputs.hidden_states[vision_feature_layer],
            attention,
            recorded[attention.q_proj],
            recorded[attention.k_proj],
            *self.clip_head(tower),
        )

    def compress_video_frames(
        self,
        tower: nn.Module,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int,
        vision_feature_select_strategy: str,
        video_guidance_input_ids: torch.LongTensor | None,
        video_guidance_attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[VisionTowerRun, CompressedCrops]:
        """
        Runs `tower` on every frame of `(videos, frames, 3, height, width)` pixels and compresses each frame on its own
        to `config.visual_tokens` tokens (DVTS + TGVC, exactly as an image), all frames of a video guided by its
        `(videos, text)` guidance. The compressed features are `(videos * frames, visual_tokens, vision_hidden)`,
        video-major.
        """
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)}: expected (videos, frames, "
                "channels, height, width); the videos of one batch need the same number of frames."
            )
        videos, frames = pixel_values_videos.shape[:2]
        run = self.run_vision_tower(
            tower, pixel_values_videos.flatten(0, 1), vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        compressed = self.compress_crops(
            run, video_guidance_input_ids, video_guidance_attention_mask, [frames] * videos, "video_guidance"
        )
        return run, compressed

    def encode_media_before_language_model(
        self,
        pixel_values: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
        vision_feature_layer: int | list[int] | None,
        vision_feature_select_strategy: str | None,
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
        video_guidance_input_ids: torch.LongTensor | None,
        video_guidance_attention_mask: torch.Tensor | None,
        **image_kwargs,
    ) -> dict[str, BaseModelOutputWithPooling] | None:
        """`encode_before_language_model` for the images and the videos of a video model's `forward`."""
        layers = {
            "vision_feature_layer": vision_feature_layer,
            "vision_feature_select_strategy": vision_feature_select_strategy,
        }
        _, mm_encoder_outputs = self.encode_before_language_model(
            "image",
            pixel_values,
            mm_encoder_outputs,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            **layers,
            **image_kwargs,
        )
        _, mm_encoder_outputs = self.encode_before_language_model(
            "video",
            pixel_values_videos,
            mm_encoder_outputs,
            video_guidance_input_ids=video_guidance_input_ids,
            video_guidance_attention_mask=video_guidance_attention_mask,
            **layers,
        )
        return mm_encoder_outputs

    def encoder_output(
        self, run: VisionTowerRun, compressed: CompressedCrops, features: list[torch.Tensor] | torch.Tensor
    ) -> VisionTrimImageOutput:
        """`get_image_features`' (or `get_video_features`') output: the tower's outputs, the kept tokens' indices and
        the projected tokens as `pooler_output`, laid out as the stock class lays them out."""
        return VisionTrimImageOutput(
            last_hidden_state=run.outputs.last_hidden_state,
            pooler_output=features,
            hidden_states=run.outputs.hidden_states,
            attentions=run.outputs.attentions,
            dominant_indices=compressed.dominant_indices,
            complement_seed_indices=compressed.complement_seed_indices,
        )

    def encode_before_language_model(
        self,
        modality: str,
        pixel_values: torch.Tensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
        **encoder_kwargs,
    ) -> tuple[torch.Tensor | None, dict[str, BaseModelOutputWithPooling] | None]:
        """
        Encodes the `modality` ("image" or "video") pixels with their guidance (in `encoder_kwargs`) before the LLM
        runs, as `generate()` does, so that the guidance tensors reach the encoder and never the LLM. Returns the
        `(pixel_values, mm_encoder_outputs)` to hand to the stock `forward`. Pixels of no image (an empty batch) are
        handed over as they are.
        """
        if pixel_values is None or pixel_values.size(0) == 0 or (mm_encoder_outputs or {}).get(modality) is not None:
            return pixel_values, mm_encoder_outputs
        encode = getattr(self, f"get_{modality}_features")
        return None, {**(mm_encoder_outputs or {}), modality: encode(pixel_values, return_dict=True, **encoder_kwargs)}

    def llm_stage_inputs(self, input_ids: torch.LongTensor | None) -> dict[str, torch.Tensor]:
        """
        What the LLM stage needs from the prompt: where its visual tokens are (found from the ids, per row); a video's
        tokens are one unit, like an image's.
        """
        if not self.config.llm_stage_enabled or input_ids is None:
            return {}
        visual_token_mask = input_ids == self.config.image_token_id
        if (video_token_id := getattr(self.config, "video_token_id", None)) is not None:
            visual_token_mask |= input_ids == video_token_id
        return {"visual_token_mask": visual_token_mask}

    def check_placeholder_count(
        self, input_ids: torch.LongTensor, features: torch.Tensor | None, hidden_size: int, modality: str
    ) -> None:
        """Raises a `ValueError` naming the budget unless the prompts hold one `modality` placeholder per feature."""
        if input_ids is None or features is None:
            return
        token_id = getattr(self.config, f"{modality}_token_id")
        num_placeholders, num_features = int((input_ids == token_id).sum()), features.numel() // hidden_size
        if num_placeholders != num_features:
            budget = (
                f"{self.config.visual_tokens} per video frame"
                if modality == "video"
                else self.config.describe_budget()
            )
            raise ValueError(
                f"The prompts hold {num_placeholders} {modality} placeholder tokens but the {modality}s give "
                f"{num_features} visual tokens: this model keeps {budget}. Build the inputs with the VisionTrim "
                "processor saved with the model, or give the processor the same settings as the model config (a "
                "stock processor emits every patch token)."
            )

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The stock placeholder mask(s), after checking the counts (`video_features` only for the video models)."""
        self.check_placeholder_count(input_ids, image_features, inputs_embeds.shape[-1], "image")
        self.check_placeholder_count(input_ids, video_features, inputs_embeds.shape[-1], "video")
        if video_features is None:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        return super().get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=image_features, video_features=video_features
        )


class VisionTrimLlavaModel(VisionTrimModelMixin, LlavaModel):
    """`LlavaModel` whose image features are the DVTS + TGVC tokens of each image, `config.visual_tokens` per image."""

    config: VisionTrimLlavaConfig

    def __init__(self, config: VisionTrimLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = build_language_model(config)
        self.init_visiontrim_modules(config)
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, 3, height, width)` pixels and keeps `config.visual_tokens` tokens per image (DVTS + TGVC,
        guided by the CLIP-tokenised `(images, text)` guidance), projected to the LLM width. With compression off
        (`reduction_ratio=0`) this is stock LLaVA's `get_image_features`.
        """
        if not self.config.compression_enabled:
            return super().get_image_features(
                pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                **kwargs,
            )
        if image_sizes is not None:
            raise ValueError(
                "`image_sizes` is for variable-resolution vision towers; VisionTrim's LLaVA class compresses "
                "fixed-size crops of the tower's resolution only: leave `image_sizes` unset."
            )
        run = self.run_vision_tower(
            self.vision_tower, pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        compressed = self.compress_crops(run, guidance_input_ids, guidance_attention_mask)
        image_features = self.multi_modal_projector(compressed.features)
        return self.encoder_output(run, compressed, list(image_features))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaModelOutputWithPast:
        r"""
        guidance_input_ids (`torch.LongTensor` of shape `(images, text)`, *optional*):
            CLIP-tokenised guidance text of each image (`VisionTrimProcessor` returns it); needed when TGVC is on.
        guidance_attention_mask (`torch.Tensor` of shape `(images, text)`, *optional*):
            Mask of `guidance_input_ids`; a row of zeros marks an empty guidance text.
        """
        pixel_values, mm_encoder_outputs = self.encode_before_language_model(
            "image",
            pixel_values,
            mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            **kwargs,
        )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **self.llm_stage_inputs(input_ids),
            **kwargs,
        )


def check_labels_without_llm_stage(config: VisionTrimSettings, labels: torch.Tensor | None) -> None:
    if labels is not None and config.llm_stage_enabled:
        raise ValueError(
            "The LLM stage drops visual positions inside the LLM, so its logits do not line up with `labels`: compute "
            "the loss with `config.llm_stage_layer=None`."
        )


class VisionTrimLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """
    LLaVA-1.5 with VisionTrim: the LLM sees `config.visual_tokens` tokens per image (DVTS-selected dominant tokens,
    then TGVC-merged question-relevant tokens) instead of every patch token. Inputs come from `VisionTrimProcessor`.
    """

    config: VisionTrimLlavaConfig

    def __init__(self, config: VisionTrimLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VisionTrimLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaCausalLMOutputWithPast:
        r"""
        `LlavaForConditionalGeneration.forward` plus the guidance text of each image:

        guidance_input_ids (`torch.LongTensor` of shape `(images, text)`, *optional*):
            CLIP-tokenised guidance text of each image (`VisionTrimProcessor` returns it); needed when TGVC is on.
        guidance_attention_mask (`torch.Tensor` of shape `(images, text)`, *optional*):
            Mask of `guidance_input_ids`; a row of zeros marks an empty guidance text.
        """
        check_labels_without_llm_stage(self.config, labels)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            **kwargs,
        )


class AnyresModelMixin(VisionTrimModelMixin):
    """
    VisionTrim's anyres image path, shared by the LLaVA-NeXT and LLaVA-NeXT-Video base models: every crop of an image
    (base view first, then the high-res crops in raster order) becomes `config.visual_tokens` DVTS + TGVC tokens,
    followed by `image_newline` when `config.crop_newline` is set.
    """

    config: AnyresSettings

    def crops_per_image(self, image_sizes: torch.Tensor) -> list[int]:
        """Crops of each image, base view included, from its `(height, width)` and `config.image_grid_pinpoints`."""
        return [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, max_crops, 3, height, width)` anyres pixels (or their `(crops, 3, height, width)`
        concatenation) and compresses every crop to `config.visual_tokens` tokens with DVTS + TGVC, all crops of an
        image guided by its `(images, text)` guidance. Each image gives `crops * (visual_tokens + crop_newline)`
        tokens, base crop first. With compression off this is stock LLaVA-NeXT's `get_image_features` (unpadding and
        newline per row included).
        """
        if not self.config.compression_enabled:
            return super().get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        crops_per_image = self.crops_per_image(image_sizes)
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(crops_per_image):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(crops_per_image)}: pass "
                    "the image_sizes the processor returned with the pixels."
                )
            crops = zip(pixel_values, crops_per_image, strict=True)
            pixel_values = torch.cat([pixels[:count] for pixels, count in crops], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, crops, channels, height, "
                "width) or (crops, channels, height, width)."
            )
        run = self.run_vision_tower(
            self.vision_tower, pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        compressed = self.compress_crops(run, guidance_input_ids, guidance_attention_mask, crops_per_image)
        features = self.multi_modal_projector(compressed.features)
        if self.config.crop_newline:
            newline = self.image_newline.to(features)[None, None].expand(features.shape[0], 1, -1)
            features = torch.cat([features, newline], dim=1)
        tokens_per_crop = features.shape[1]
        per_image = torch.split(features.flatten(0, 1), [crops * tokens_per_crop for crops in crops_per_image])
        return self.encoder_output(run, compressed, list(per_image))


class VisionTrimLlavaNextModel(AnyresModelMixin, LlavaNextModel):
    """
    `LlavaNextModel` whose image features are, per crop (base view first, then the high-res crops in raster order),
    the `config.visual_tokens` DVTS + TGVC tokens followed by `image_newline` when `config.crop_newline` is set.
    """

    config: VisionTrimLlavaNextConfig

    def __init__(self, config: VisionTrimLlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = build_language_model(config)
        self.init_visiontrim_modules(config)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaNextModelOutputWithPast:
        r"""
        guidance_input_ids (`torch.LongTensor` of shape `(images, text)`, *optional*):
            CLIP-tokenised guidance text of each image (the processor returns it); needed when TGVC is on.
        guidance_attention_mask (`torch.Tensor` of shape `(images, text)`, *optional*):
            Mask of `guidance_input_ids`; a row of zeros marks an empty guidance text.
        """
        pixel_values, mm_encoder_outputs = self.encode_before_language_model(
            "image",
            pixel_values,
            mm_encoder_outputs,
            image_sizes=image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
        )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **self.llm_stage_inputs(input_ids),
            **kwargs,
        )


class VisionTrimLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """
    LLaVA-NeXT (anyres) with VisionTrim: every crop of an image (base view and high-res crops) is compressed to
    `config.visual_tokens` tokens by DVTS + TGVC, guided by the image's question. Inputs come from
    `VisionTrimLlavaNextProcessor`.
    """

    config: VisionTrimLlavaNextConfig

    def __init__(self, config: VisionTrimLlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = VisionTrimLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaNextCausalLMOutputWithPast:
        r"""
        `LlavaNextForConditionalGeneration.forward` plus the guidance text of each image:

        guidance_input_ids (`torch.LongTensor` of shape `(images, text)`, *optional*):
            CLIP-tokenised guidance text of each image (the processor returns it); needed when TGVC is on.
        guidance_attention_mask (`torch.Tensor` of shape `(images, text)`, *optional*):
            Mask of `guidance_input_ids`; a row of zeros marks an empty guidance text.
        """
        check_labels_without_llm_stage(self.config, labels)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            **kwargs,
        )


GUIDANCE_DOCSTRING = r"""
        guidance_input_ids (`torch.LongTensor` of shape `(images, text)`, *optional*):
            CLIP-tokenised guidance text of each image (the processor returns it); needed when TGVC is on.
        guidance_attention_mask (`torch.Tensor` of shape `(images, text)`, *optional*):
            Mask of `guidance_input_ids`; a row of zeros marks an empty guidance text.
        video_guidance_input_ids (`torch.LongTensor` of shape `(videos, text)`, *optional*):
            CLIP-tokenised guidance text of each video, shared by all its frames; needed when TGVC is on.
        video_guidance_attention_mask (`torch.Tensor` of shape `(videos, text)`, *optional*):
            Mask of `video_guidance_input_ids`; a row of zeros marks an empty guidance text.
"""


class VisionTrimVideoLlavaModel(VisionTrimModelMixin, VideoLlavaModel):
    """
    `VideoLlavaModel` whose image features are `config.visual_tokens` DVTS + TGVC tokens per image (image tower) and
    whose video features are `config.visual_tokens` tokens per frame (video tower; each frame compressed on its own,
    all frames guided by the video's question). The guidance text tower (`guidance_encoder`) is the video encoder's
    (LanguageBind's); each tower has its own CLIP head: `visual_projection` / `logit_scale` for the image tower,
    `video_visual_projection` / `video_logit_scale` for the video tower.
    """

    config: VisionTrimVideoLlavaConfig

    def __init__(self, config: VisionTrimVideoLlavaConfig):
        VideoLlavaPreTrainedModel.__init__(self, config)
        self.video_tower = AutoModel.from_config(config.vision_config)
        self.image_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VideoLlavaMultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = build_language_model(config)
        self.init_visiontrim_modules(config)
        self.video_visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.video_logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        self.post_init()

    def clip_head(self, tower: nn.Module) -> tuple[nn.Module, torch.Tensor]:
        if tower is self.video_tower:
            return self.video_visual_projection, self.video_logit_scale
        return super().clip_head(tower)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, 3, height, width)` pixels with the image tower and keeps `config.visual_tokens` tokens per
        image (DVTS + TGVC, guided by the `(images, text)` guidance): `pooler_output` is `(images, visual_tokens,
        text_hidden)`. With compression off this is stock Video-LLaVA's `get_image_features`.
        """
        if not self.config.compression_enabled:
            return super().get_image_features(
                pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        run = self.run_vision_tower(
            self.image_tower, pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        compressed = self.compress_crops(run, guidance_input_ids, guidance_attention_mask)
        return self.encoder_output(run, compressed, self.multi_modal_projector(compressed.features))

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(videos, frames, 3, height, width)` pixels with the video tower and keeps `config.visual_tokens`
        tokens per frame (the CLS token is dropped, as DVTS scores by it), all frames of a video guided by its
        `(videos, text)` guidance: `pooler_output` is `(videos * frames, visual_tokens, text_hidden)`. With compression
        off this is stock Video-LLaVA's `get_video_features` (CLS kept: 257 tokens per 224 px frame).
        """
        if not self.config.compression_enabled:
            return super().get_video_features(pixel_values_videos, vision_feature_layer=vision_feature_layer, **kwargs)
        run, compressed = self.compress_video_frames(
            self.video_tower,
            pixel_values_videos,
            vision_feature_layer,
            vision_feature_select_strategy,
            video_guidance_input_ids,
            video_guidance_attention_mask,
            **kwargs,
        )
        return self.encoder_output(run, compressed, self.multi_modal_projector(compressed.features))

    @can_return_tuple
    @deprecate_kwarg("pixel_values_images", version="v5.23", new_name="pixel_values")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | VideoLlavaModelOutputWithPast:
        mm_encoder_outputs = self.encode_media_before_language_model(
            pixel_values,
            pixel_values_videos,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            guidance_input_ids,
            guidance_attention_mask,
            video_guidance_input_ids,
            video_guidance_attention_mask,
        )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **self.llm_stage_inputs(input_ids),
            **kwargs,
        )

    forward.__doc__ = GUIDANCE_DOCSTRING


class VisionTrimVideoLlavaForConditionalGeneration(VideoLlavaForConditionalGeneration):
    """
    Video-LLaVA with VisionTrim: each image and each video frame is compressed to `config.visual_tokens` tokens by
    DVTS + TGVC, guided by its prompt's question. Inputs come from `VisionTrimVideoLlavaProcessor`.
    """

    config: VisionTrimVideoLlavaConfig

    def __init__(self, config: VisionTrimVideoLlavaConfig):
        VideoLlavaPreTrainedModel.__init__(self, config)
        self.model = VisionTrimVideoLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("pixel_values_images", version="v5.23", new_name="pixel_values")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | VideoLlavaCausalLMOutputWithPast:
        check_labels_without_llm_stage(self.config, labels)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            video_guidance_input_ids=video_guidance_input_ids,
            video_guidance_attention_mask=video_guidance_attention_mask,
            **kwargs,
        )

    forward.__doc__ = "`VideoLlavaForConditionalGeneration.forward` plus the guidance text:\n" + GUIDANCE_DOCSTRING


class VisionTrimLlavaNextVideoModel(AnyresModelMixin, LlavaNextVideoModel):
    """
    `LlavaNextVideoModel` with VisionTrim: images are compressed per crop as in `VisionTrimLlavaNextModel`; each video
    frame is compressed on its full patch grid to `config.visual_tokens` tokens (DVTS + TGVC, all frames guided by
    the video's question) and the spatial pooling (`vision_resampler`) is skipped: pooling a set of selected, merged
    tokens has no grid to pool. A video of `f` frames gives `f * visual_tokens` tokens (stock: `f * 144`).
    """

    config: VisionTrimLlavaNextVideoConfig

    def __init__(self, config: VisionTrimLlavaNextVideoConfig):
        LlavaNextVideoPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextVideoMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = build_language_model(config)
        self.vision_resampler = LlavaNextVideoPooler(config)
        self.init_visiontrim_modules(config)
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(videos, frames, 3, height, width)` pixels and keeps `config.visual_tokens` tokens of each frame's
        patch grid, unpooled, all frames of a video guided by its `(videos, text)` guidance: `pooler_output` is
        `(videos, frames * visual_tokens, text_hidden)`. With compression off this is stock LLaVA-NeXT-Video's
        `get_video_features` (pooled: 144 tokens per 336 px frame).
        """
        if not self.config.compression_enabled:
            return super().get_video_features(
                pixel_values_videos,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        run, compressed = self.compress_video_frames(
            self.vision_tower,
            pixel_values_videos,
            vision_feature_layer,
            vision_feature_select_strategy,
            video_guidance_input_ids,
            video_guidance_attention_mask,
            **kwargs,
        )
        features = self.multi_modal_projector(compressed.features)
        return self.encoder_output(run, compressed, features.unflatten(0, pixel_values_videos.shape[:2]).flatten(1, 2))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaNextVideoModelOutputWithPast:
        mm_encoder_outputs = self.encode_media_before_language_model(
            pixel_values,
            pixel_values_videos,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            guidance_input_ids,
            guidance_attention_mask,
            video_guidance_input_ids,
            video_guidance_attention_mask,
            image_sizes=image_sizes,
        )
        return super().forward(
            input_ids=input_ids,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **self.llm_stage_inputs(input_ids),
            **kwargs,
        )

    forward.__doc__ = GUIDANCE_DOCSTRING


class VisionTrimLlavaNextVideoForConditionalGeneration(LlavaNextVideoForConditionalGeneration):
    """
    LLaVA-NeXT-Video with VisionTrim: image crops and video frames are each compressed to `config.visual_tokens`
    tokens by DVTS + TGVC, guided by their prompt's question. Inputs come from `VisionTrimLlavaNextVideoProcessor`.
    """

    config: VisionTrimLlavaNextVideoConfig

    def __init__(self, config: VisionTrimLlavaNextVideoConfig):
        LlavaNextVideoPreTrainedModel.__init__(self, config)
        self.model = VisionTrimLlavaNextVideoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | LlavaNextVideoCausalLMOutputWithPast:
        check_labels_without_llm_stage(self.config, labels)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
            video_guidance_input_ids=video_guidance_input_ids,
            video_guidance_attention_mask=video_guidance_attention_mask,
            **kwargs,
        )

    forward.__doc__ = "`LlavaNextVideoForConditionalGeneration.forward` plus the guidance text:\n" + GUIDANCE_DOCSTRING


# Custom classes skip Transformers' llava-hf key renaming unless it is registered for them: without this, a llava-hf
# checkpoint would load with a randomly initialised LLM.
register_checkpoint_conversion_mapping(
    "VisionTrimLlavaForConditionalGeneration", get_checkpoint_conversion_mapping("llava"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "VisionTrimLlavaNextForConditionalGeneration", get_checkpoint_conversion_mapping("llava_next"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "VisionTrimVideoLlavaForConditionalGeneration", get_checkpoint_conversion_mapping("video_llava"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "VisionTrimLlavaNextVideoForConditionalGeneration",
    get_checkpoint_conversion_mapping("llava_next_video"),
    overwrite=True,
)
for model_class in (
    VisionTrimLlavaForConditionalGeneration,
    VisionTrimLlavaNextForConditionalGeneration,
    VisionTrimVideoLlavaForConditionalGeneration,
    VisionTrimLlavaNextVideoForConditionalGeneration,
):
    model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "VisionTrimImageOutput",
    "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaModel",
    "VisionTrimLlavaNextForConditionalGeneration",
    "VisionTrimLlavaNextModel",
    "VisionTrimLlavaNextVideoForConditionalGeneration",
    "VisionTrimLlavaNextVideoModel",
    "VisionTrimModelMixin",
    "VisionTrimVideoLlavaForConditionalGeneration",
    "VisionTrimVideoLlavaModel",
]
