# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim's optional LLM stage (see `ALGORITHM.md`, stage 3): during prefill, after decoder layer `L-1`, the visual
tokens are ranked by that layer's attention to the prompt's text, `llm_stage_tokens` per image are kept, the others
are merged into them, and layers >= `L` run on the shorter sequence with the kept tokens' original positions.

The scoring, keep and merge steps are plain batched functions, composed by the prune step (`prune_visual_tokens`);
the mask step (`pruned_causal_mask`) masks layers >= `L` for their own cache length at every later step. What a
prompt kept lives on its cache (`LlmStageCache.visiontrim_pruning`), and `LlmStageDecoderMixin` is the stock
Llama / Mistral decoder loop with these two steps before layer `L`.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlamaModel, MistralModel, PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .compression_visiontrim import gather_tokens, merge_step
from .configuration_visiontrim_llava import VisionTrimSettings


def causal_attention_probabilities(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """
    What eager attention computes in a Llama-style block (RoPE, grouped key/value heads, causal, padding masked, and
    the sliding window of a Mistral decoder), averaged over heads, in float32; one head at a time, so memory stays
    `(batch, tokens, tokens)`.

    Args:
        attention: the block (q_proj, k_proj, head_dim, num_key_value_groups, scaling).
        hidden_states: `(batch, tokens, hidden)` its input (after the layer's input norm).
        position_embeddings: its RoPE `(cos, sin)`, each `(batch, tokens, head_dim)`.
        key_mask: `(batch, tokens)` bool, False for padding.
        sliding_window: a query sees only the keys fewer than this many positions back (None: all of them).
    Returns:
        `(batch, tokens, tokens)`; rows of padding queries attend to themselves only.
    """
    batch, tokens, _ = hidden_states.shape
    head_dim = attention.head_dim
    cos, sin = position_embeddings
    query = attention.q_proj(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key = repeat_kv(key, attention.num_key_value_groups)
    positions = torch.arange(tokens, device=hidden_states.device)
    distance = positions[:, None] - positions[None, :]
    seen = (distance >= 0) if sliding_window is None else (distance >= 0) & (distance < sliding_window)
    allowed = seen[None] & key_mask[:, None, :]
    allowed = allowed | torch.eye(tokens, dtype=torch.bool, device=hidden_states.device)
    probabilities = torch.zeros(batch, tokens, tokens, device=hidden_states.device, dtype=torch.float32)
    for head in range(query.shape[1]):
        scores = query[:, head].float() @ key[:, head].float().transpose(1, 2) * attention.scaling
        probabilities += torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probabilities / query.shape[1]


def visual_unit_index(visual_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, tokens)`: which image (0, 1, ...) of its sequence each visual token belongs to, -1 for text."""
    starts = visual_mask & ~F.pad(visual_mask[:, :-1], (1, 0), value=False)
    return torch.where(visual_mask, starts.long().cumsum(dim=1) - 1, -1)


def llm_stage_scores(
    probabilities: torch.Tensor, visual_mask: torch.Tensor, key_mask: torch.Tensor, rule: str
) -> torch.Tensor:
    """
    How much each visual token matters to the prompt's text at one layer.

    Args:
        probabilities: `(batch, tokens, tokens)` head-mean attention of the layer.
        visual_mask: `(batch, tokens)` True at visual tokens.
        key_mask: `(batch, tokens)` False at padding.
        rule: "text_to_image" (mean attention the text after the last image pays the token), "image_to_text" (mean
            attention the token pays the text before the first image) or "both" (their mean).
    Returns:
        `(batch, tokens)` float32 scores, `-inf` outside visual tokens.
    """
    positions = torch.arange(visual_mask.shape[1], device=visual_mask.device)
    visual_positions = torch.where(visual_mask, positions, -1)
    last_visual = visual_positions.max(dim=1, keepdim=True).values
    first_visual = torch.where(visual_mask, positions, visual_mask.shape[1]).min(dim=1, keepdim=True).values
    text = key_mask & ~visual_mask
    after = (text & (positions > last_visual)).float()
    before = (text & (positions < first_visual)).float()
    text_to_image = (probabilities * after[:, :, None]).sum(dim=1) / after.sum(dim=1, keepdim=True).clamp_min(1)
    image_to_text = (probabilities * before[:, None, :]).sum(dim=2) / before.sum(dim=1, keepdim=True).clamp_min(1)
    if rule == "both":
        scores = (text_to_image + image_to_text) / 2
    else:
        scores = {"text_to_image": text_to_image, "image_to_text": image_to_text}[rule]
    return scores.masked_fill(~visual_mask, float("-inf"))


def keep_per_image(
    scores: torch.Tensor,
    visual_mask: torch.Tensor,
    tokens_per_image: int,
    layout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `(batch, tokens)` True for text and for the `tokens_per_image` best-scored visual tokens of each image (ties to
    the earlier token); an image with no more tokens keeps them all. Layout tokens (`layout_mask`, e.g. LLaVA-NeXT's
    `image_newline`) are kept and not counted.
    """
    ids = visual_unit_index(visual_mask)
    content = visual_mask if layout_mask is None else visual_mask & ~layout_mask
    positions = torch.arange(scores.shape[1], device=scores.device)
    same_image = (ids[:, :, None] == ids[:, None, :]) & content[:, None, :]
    better = (scores[:, None, :] > scores[:, :, None]) | (
        (scores[:, None, :] == scores[:, :, None]) & (positions[None, None, :] < positions[None, :, None])
    )
    rank = (same_image & better).sum(dim=-1)
    return ~content | (rank < tokens_per_image)


def merge_into_kept(
    hidden_states: torch.Tensor,
    keep: torch.Tensor,
    visual_mask: torch.Tensor,
    iterations: int,
    update: str,
    layout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Merges each dropped visual token into the kept visual token of its image it is most similar to
    (`h_q . h_k / sqrt(d)`, argmax), `iterations` times, with TGVC's update ("add": a kept token adds the mean of its
    dropped tokens each iteration; "mean": it becomes the mean of itself and them). Layout tokens (`layout_mask`)
    neither merge nor take merges. Returns `(batch, tokens, hidden)` with only the kept visual tokens changed.
    """
    ids = visual_unit_index(visual_mask)
    content = visual_mask if layout_mask is None else visual_mask & ~layout_mask
    dropped, kept = content & ~keep, content & keep
    allowed = dropped[:, :, None] & kept[:, None, :] & (ids[:, :, None] == ids[:, None, :])
    assigned_rows = allowed.any(dim=-1, keepdim=True).float()
    states = hidden_states.float()
    merged, original = states, states
    scale = 1 / math.sqrt(states.shape[-1])
    for _ in range(iterations):
        similarity = (states @ merged.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        assignment = F.one_hot(similarity.argmax(dim=-1), states.shape[1]).float() * assigned_rows
        merged = merge_step(merged, original, assignment, states, update)
    return torch.where(kept.unsqueeze(-1), merged.to(hidden_states.dtype), hidden_states)


def pruned_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The kept positions of each row in order, left-padded to the longest row: `(batch, kept)` indices into the
    sequence, and `(batch, kept)` True where a slot holds a kept position (False: padding, index 0).
    """
    positions = torch.arange(keep.shape[1], device=keep.device)
    order = torch.sort(torch.where(keep, positions, -1), dim=1).values[:, -int(keep.sum(dim=1).max()) :]
    return order.clamp_min(0), order >= 0


@dataclass
class LlmStagePruning:
    """
    What the LLM stage kept of a prompt: layers >= `llm_stage_layer` hold these positions of it (`index.shape[1]`
    cache entries per row), layers below all `prompt_length`.
    """

    index: torch.LongTensor  # (batch, kept): the kept prompt positions of each row, in order, left-padded
    valid: torch.BoolTensor  # (batch, kept): False at padding slots
    prompt_length: int  # the prompt's length before pruning


@dataclass
class LlmStagePrompt:
    """What the prune step reads of a prefill besides its hidden states; each mask is `(batch, tokens)`."""

    visual_mask: torch.Tensor  # True at visual tokens
    key_mask: torch.Tensor  # False at padding
    layout_mask: torch.Tensor | None  # True at layout visual tokens (LLaVA-NeXT's image_newline)
    keep: torch.Tensor | None  # the positions to keep, instead of ranking them
    text_length: int | None  # how many leading positions' text ranks the visual tokens (None: all)


class LlmStageCache(DynamicCache):
    """
    A `DynamicCache` that also holds what the LLM stage kept of its prompt (`visiontrim_pruning`, None while nothing
    was pruned), so every later step can mask layers >= `llm_stage_layer` for their shorter cache.
    """

    visiontrim_pruning: LlmStagePruning | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.visiontrim_pruning = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the layers and the kept positions (`(batch,)` `beam_idx`) for beam search."""
        super().reorder_cache(beam_idx)
        if (pruning := self.visiontrim_pruning) is not None:
            rows = beam_idx.to(pruning.index.device)
            self.visiontrim_pruning = replace(pruning, index=pruning.index[rows], valid=pruning.valid[rows])


def generation_cache(cache: Cache | None, config: VisionTrimSettings) -> Cache | None:
    """The cache `generate()` made, or while the LLM stage is on an `LlmStageCache` in place of its `DynamicCache`."""
    if not config.llm_stage_enabled or type(cache) is not DynamicCache:
        return cache
    stage_cache = LlmStageCache(config=config.get_text_config(decoder=True), offloading=cache.offloading)
    stage_cache.layers = cache.layers  # the (empty) layers as `generate()` set them up, e.g. to record past states
    return stage_cache


def decoder_causal_mask(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.LongTensor,
    layer_idx: int | None = None,
) -> torch.Tensor | None:
    """
    The stock Llama / Mistral decoder mask (with Mistral's sliding window when set) for `inputs_embeds`
    `(batch, tokens, dim)`, a 2D padding mask `(batch, keys)` and the cache length of layer `layer_idx`.
    """
    mask_function = create_causal_mask
    if getattr(config, "sliding_window", None) is not None:
        mask_function = create_sliding_window_causal_mask
    return mask_function(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layer_idx,
    )


def prune_visual_tokens(
    layer: nn.Module,
    layer_input: torch.Tensor,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.LongTensor,
    prompt: LlmStagePrompt,
    settings: VisionTrimSettings,
) -> tuple[torch.Tensor, torch.LongTensor, LlmStagePruning]:
    """
    The prune step, after decoder layer `L-1` of a prefill: scores the visual tokens by that layer's attention to the
    prompt's text, keeps the best `llm_stage_tokens` of each image (or `prompt.keep`), merges the others into them,
    and keeps only the kept positions (text included; padding dropped).

    Args:
        layer: decoder layer `L-1`.
        layer_input: `(batch, tokens, dim)` its input.
        hidden_states: `(batch, tokens, dim)` its output.
        position_embeddings: its RoPE `(cos, sin)`, each `(batch, tokens, head_dim)`.
        position_ids: `(batch or 1, tokens)`.
    Returns:
        `(batch, kept, dim)` hidden states and `(batch, kept)` original position ids of the kept positions, and the
        pruning (rows that keep fewer positions are left-padded).
    """
    keep = prompt.keep
    if keep is None:
        probabilities = causal_attention_probabilities(
            layer.self_attn,
            layer.input_layernorm(layer_input),
            position_embeddings,
            prompt.key_mask,
            getattr(layer.self_attn.config, "sliding_window", None),
        )
        text = prompt.key_mask.clone()
        text[:, prompt.text_length or hidden_states.shape[1] :] = False
        scores = llm_stage_scores(probabilities, prompt.visual_mask, text, settings.llm_stage_score)
        keep = keep_per_image(scores, prompt.visual_mask, settings.llm_stage_tokens, prompt.layout_mask)
    keep = keep.bool() & prompt.key_mask
    merged = merge_into_kept(
        hidden_states, keep, prompt.visual_mask, settings.merge_iterations, settings.merge_update, prompt.layout_mask
    )
    index, valid = pruned_order(keep)
    kept_positions = position_ids.expand(index.shape[0], -1).gather(1, index)
    return gather_tokens(merged, index), kept_positions, LlmStagePruning(index, valid, hidden_states.shape[1])


def pruned_causal_mask(
    config: PreTrainedConfig,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.LongTensor,
    pruning: LlmStagePruning,
    layer_idx: int,
) -> torch.Tensor | None:
    """
    The mask step: the attention mask of layers >= `L` (`layer_idx`) at the prune step and at every step after it,
    built for that layer's cache length. Its keys are the kept prompt slots (`pruning.valid`), then every token after
    the prompt (`attention_mask`'s columns from `pruning.prompt_length` on; all valid without it).

    Args:
        hidden_states: `(batch, tokens, dim)` the step's input to layer `L`.
        attention_mask: `(batch, prompt_length + later tokens)` the 2D padding mask of the whole sequence, or None.
        position_ids: `(batch or 1, tokens)` the step's position ids.
    """
    cached = cache.get_seq_length(layer_idx) if cache is not None else 0
    later = cached + hidden_states.shape[1] - pruning.index.shape[1]
    after_prompt = (
        attention_mask[:, pruning.prompt_length :]
        if attention_mask is not None
        else torch.ones(hidden_states.shape[0], later, dtype=torch.long, device=hidden_states.device)
    )
    padding = torch.cat([pruning.valid.long(), after_prompt.long()], dim=1)
    return decoder_causal_mask(config, hidden_states, padding, cache, position_ids, layer_idx)


class LlmStageDecoderMixin:
    """
    A Llama-family decoder with VisionTrim's LLM stage (`visiontrim_config.llm_stage_layer` = `L`): the stock decoder
    loop, plus after layer `L-1` the prune step (`prune_visual_tokens`) of a prefill and the mask step for the later
    layers (`pruned_causal_mask`) of that prefill and of every step on its cache. With the stage off (or no visual
    token) this is the stock decoder, step for step; a prompt continued on a cache that already holds tokens is not
    pruned.
    """

    visiontrim_config: VisionTrimSettings | None

    def __init__(self, config: PreTrainedConfig, visiontrim_config: VisionTrimSettings | None = None) -> None:
        super().__init__(config)
        self.visiontrim_config = visiontrim_config

    @property
    def llm_stage(self) -> VisionTrimSettings | None:
        """The VisionTrim settings while the LLM stage is on (read live), else None."""
        settings = self.visiontrim_config
        return settings if settings is not None and settings.llm_stage_enabled else None

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
        layout_token_mask: torch.Tensor | None = None,
        llm_stage_prompt_length: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        visual_token_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
            True at visual tokens (from `input_ids == image_token_id`); without it nothing is pruned.
        visual_keep_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
            Kept positions to use instead of ranking them (to recompute a pruned prefix exactly).
        layout_token_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
            True at visual tokens that are layout, not content (LLaVA-NeXT's `image_newline`): always kept, never
            ranked or merged, not counted in `llm_stage_tokens`.
        llm_stage_prompt_length (`int`, *optional*):
            How many leading positions are the prompt, when the sequence also holds generated tokens (`generate`
            with `use_cache=False` recomputes it whole at every step): only the prompt's text ranks the visual
            tokens, so every step keeps what the first one kept. Default: all positions.
        """
        stage = self.llm_stage  # VisionTrim: None while the LLM stage is off
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = (DynamicCache if stage is None else LlmStageCache)(config=self.config)  # VisionTrim: its cache
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = decoder_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        # VisionTrim: the prompt this forward prunes, or what an earlier forward on this cache kept.
        prompt, pruning = self.llm_stage_state(
            cache, attention_mask, visual_token_mask, visual_keep_mask, layout_token_mask, llm_stage_prompt_length
        )

        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            layer_input = hidden_states  # VisionTrim: layer L-1's input scores the visual tokens
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            # VisionTrim: after layer L-1, the layers run on the kept positions, masked for their own cache length.
            if stage is not None and index == stage.llm_stage_layer - 1 and (prompt or pruning):
                if prompt is not None:
                    hidden_states, position_ids, pruning = prune_visual_tokens(
                        decoder_layer, layer_input, hidden_states, position_embeddings, position_ids, prompt, stage
                    )
                    position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
                    if cache is not None:
                        cache.visiontrim_pruning = pruning
                causal_mask = pruned_causal_mask(
                    self.config, hidden_states, attention_mask, cache, position_ids, pruning, index + 1
                )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
        )

    def llm_stage_state(
        self,
        cache: Cache | None,
        attention_mask: torch.Tensor | None,
        visual_token_mask: torch.Tensor | None,
        visual_keep_mask: torch.Tensor | None,
        layout_token_mask: torch.Tensor | None,
        text_length: int | None,
    ) -> tuple[LlmStagePrompt | None, LlmStagePruning | None]:
        """
        What the prune step reads of this forward (the masks are `(batch, tokens)`, see `forward`), and what an
        earlier prune step kept of the prompt on `cache`; None and None while the stage is off. Only a prompt with
        visual tokens on an empty cache is pruned: its positions are the whole prefix the later layers see.
        """
        if self.llm_stage is None:
            return None, None
        if cache is not None and cache.get_seq_length() > 0:
            return None, cache.visiontrim_pruning if isinstance(cache, LlmStageCache) else None
        if visual_token_mask is None or visual_token_mask.shape[1] < 2 or not bool(visual_token_mask.any()):
            return None, None
        if cache is not None and not isinstance(cache, LlmStageCache):
            raise ValueError(
                f"The LLM stage keeps what it pruned on its cache, an `LlmStageCache`; got a {type(cache).__name__}. "
                "Pass no cache (one is made), an `LlmStageCache`, or set `config.llm_stage_layer=None`."
            )
        key_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual_token_mask)
        return LlmStagePrompt(visual_token_mask, key_mask, layout_token_mask, visual_keep_mask, text_length), None


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
    return decoder_class._from_config(config.text_config, visiontrim_config=config)


def llm_stage_inputs(
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    image_features: torch.Tensor | None,
    image_newline: torch.Tensor | None,
    config: VisionTrimSettings,
) -> dict[str, torch.Tensor]:
    """
    The decoder kwargs the LLM stage needs from a prompt (none while the stage is off): where its visual tokens are
    (`input_ids == image_token_id`, or the video token, per row; a video's tokens are one unit, like an image's) and,
    for LLaVA-NeXT, which of them are `image_newline` layout tokens (the image features equal to `image_newline`).

    Args:
        image_features: `(image tokens, text_hidden)` the features placed at the image tokens, in order.
    """
    if not config.llm_stage_enabled:
        return {}
    if input_ids is None:
        if inputs_embeds is None:
            return {}
        raise ValueError(
            "The LLM stage finds the visual tokens from `input_ids` (the image placeholders); it cannot find them in "
            "`inputs_embeds`: pass `input_ids`, or set `config.llm_stage_layer=None`."
        )
    is_image = input_ids == config.image_token_id
    inputs = {"visual_token_mask": is_image.clone()}
    if (video_token_id := getattr(config, "video_token_id", None)) is not None:
        inputs["visual_token_mask"] |= input_ids == video_token_id
    if image_newline is not None and image_features is not None and image_features.shape[0] == int(is_image.sum()):
        is_newline = (image_features == image_newline.to(image_features)).all(dim=-1)
        inputs["layout_token_mask"] = torch.zeros_like(is_image).masked_scatter(
            is_image, is_newline.to(is_image.device)
        )
    return inputs


__all__ = [
    "LlmStageCache",
    "LlmStageDecoderMixin",
    "LlmStagePrompt",
    "LlmStagePruning",
    "VisionTrimLlamaModel",
    "VisionTrimMistralModel",
    "build_language_model",
    "causal_attention_probabilities",
    "decoder_causal_mask",
    "generation_cache",
    "keep_per_image",
    "llm_stage_inputs",
    "llm_stage_scores",
    "merge_into_kept",
    "prune_visual_tokens",
    "pruned_causal_mask",
    "pruned_order",
    "visual_unit_index",
]
