# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim's vision stage as plain functions, shared by every model family (see `ALGORITHM.md`).

`compress_tokens` is the one pipeline: DVTS (dominant vision token selection) keeps the K_d best-scored tokens of each
item (a crop, a video frame or a temporal slice); TGVC (text-guided vision complement) merges the remaining tokens
into K_c seeds chosen by their relevance to the question. It is parameterised by what varies between families:
- the global score source: the CLS row of the scored layer (`head_mean_attention`) or the attention each token
  receives (`received_attention`), fused with LTAM by `global_local_scores`;
- the guidance embedder (`Guidance`): the CLIP text tower (`encode_guidance`) or the LLM's input embeddings;
- the layout: fixed crop grids (`compress_crops`) or packed grids of different sizes, padded and masked
  (`compress_units`).
Tower runs (`run_vision_tower`; a family's own, e.g. Qwen's) record the one scored layer's queries and keys.

Everything is batched over items, free of Python loops over tokens or items, deterministic (stable sorts,
first-index argmax, one-hot matmuls instead of scatter-adds) and computes scores in float32 whatever the model dtype.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging

from .configuration_visiontrim import CompressionSettings


logger = logging.get_logger(__name__)

# The LTAM weights of the paper: kappa_ij = -||x_i - x_j||^2 / (w1 var(X)) + w3 * (-||p_i - p_j||^2 / (w2 var(P))).
LTAM_W1 = 1.0
LTAM_W2 = 1.0
LTAM_W3 = 0.5
# Weight of the CLS term in the released code's received-attention score.
RECEIVED_ATTENTION_ALPHA = 0.5


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, num_heads: int, scaling: float) -> torch.Tensor:
    """
    Attention probabilities averaged over heads, `softmax(q k^T * scaling)`, computed in float32.

    Args:
        query: `(batch, rows, dim)` projected queries of the rows wanted (e.g. only the CLS row).
        key: `(batch, tokens, dim)` projected keys.
    Returns:
        `(batch, rows, tokens)`.
    """
    batch, rows, dim = query.shape
    head_dim = dim // num_heads
    query = query.float().view(batch, rows, num_heads, head_dim).transpose(1, 2)
    key = key.float().view(batch, key.shape[1], num_heads, head_dim).transpose(1, 2)
    return torch.softmax(query @ key.transpose(-1, -2) * scaling, dim=-1).mean(dim=1)


def masked_variance(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The unbiased variance of each row of `values` `(batch, n)` over its `mask`ed entries (all when None)."""
    if mask is None:
        return values.var(dim=-1)
    count = mask.sum(dim=-1)
    mean = (values * mask).sum(dim=-1) / count.clamp_min(1)
    squares = ((values - mean.unsqueeze(-1)).square() * mask).sum(dim=-1)
    return squares / (count - 1).clamp_min(1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension of `logits`, over the `mask`ed entries only (the others get 0)."""
    if mask is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0)


def grid_position_variance(heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """
    The unbiased variance of all `2 * h * w` (row, column) coordinates of an `h x w` grid, for each `(batch,)` pair
    of `heights` and `widths`: `var(P)` of LTAM, in closed form.
    """
    heights, widths = heights.double(), widths.double()
    count = 2 * heights * widths
    total = widths * heights * (heights - 1) / 2 + heights * widths * (widths - 1) / 2
    squares = (
        widths * (heights - 1) * heights * (2 * heights - 1) / 6
        + heights * (widths - 1) * widths * (2 * widths - 1) / 6
    )
    return ((squares - total.square() / count) / (count - 1).clamp_min(1)).float()


def local_token_affinity(grid: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """
    LTAM: mean affinity of each token to the 9 slots of its 3x3 window (itself included; slots outside the grid add 0).

    `kappa_ij = -||x_i - x_j||^2 / (w1 var(X)) - w3 ||p_i - p_j||^2 / (w2 var(P))`, `l_i = sum_j kappa_ij / 9`, with
    `var(X)` the unbiased variance of all entries of the grid's features and `var(P)` that of all 2N grid coordinates.

    Args:
        grid: `(batch, height, width, dim)` token features on their grid.
        valid: `(batch, height, width)` bool, True on each grid's own `h x w` top-left cells, for grids of different
            sizes padded to one shape; None when every grid fills the shape.
    Returns:
        `(batch, height, width)` float32 affinities `l` (before softmax; 0 outside `valid`).
    """
    batch, height, width, dim = grid.shape
    grid = grid.float()
    if valid is None:
        feature_variance = grid.reshape(batch, -1).var(dim=-1)
        inside = torch.ones(batch, height, width, dtype=torch.bool, device=grid.device)
        heights = torch.full((batch,), height, device=grid.device)
        widths = torch.full((batch,), width, device=grid.device)
    else:
        inside = valid
        entry_mask = valid.unsqueeze(-1).expand(-1, -1, -1, dim).reshape(batch, -1)
        feature_variance = masked_variance(grid.reshape(batch, -1), entry_mask)
        heights, widths = valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)
        grid = grid * valid.unsqueeze(-1)
    feature_variance = feature_variance.clamp_min(torch.finfo(torch.float32).tiny).view(batch, 1, 1)
    position_variance = grid_position_variance(heights, widths).clamp_min(torch.finfo(torch.float32).tiny)
    position_variance = position_variance.to(grid.device).view(batch, 1, 1)

    padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
    padded_inside = F.pad(inside, (1, 1, 1, 1))
    affinity = torch.zeros(batch, height, width, device=grid.device, dtype=torch.float32)
    for row_offset in (-1, 0, 1):
        for col_offset in (-1, 0, 1):
            rows = slice(1 + row_offset, 1 + row_offset + height)
            cols = slice(1 + col_offset, 1 + col_offset + width)
            feature_distance = (grid - padded[:, rows, cols]).square().sum(dim=-1)
            position_distance = float(row_offset**2 + col_offset**2)
            kappa = -feature_distance / (LTAM_W1 * feature_variance) - (
                LTAM_W3 * position_distance / (LTAM_W2 * position_variance)
            )
            affinity = affinity + torch.where(padded_inside[:, rows, cols], kappa, 0.0)
    return (affinity / 9).masked_fill(~inside, 0)


def variance_weighted_fusion(
    global_scores: torch.Tensor, local_affinity: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The paper's DVTS score: `w_G * G + w_L * Lo`, with `Lo = softmax(softmax(l))` of the LTAM affinities,
    `w_G = var(Lo) / (var(G) + var(Lo))` and `w_L = var(G) / (var(G) + var(Lo))`.

    Args:
        global_scores: `(batch, tokens)` the global term `G`, a distribution over each row's tokens.
        local_affinity: `(batch, tokens)` LTAM affinities `l`.
        valid: `(batch, tokens)` bool, the real tokens of rows padded to one length; None: all.
    Returns:
        `(batch, tokens)` float32 scores (0 outside `valid`).
    """
    local_scores = masked_softmax(masked_softmax(local_affinity, valid), valid)
    global_variance = masked_variance(global_scores, valid).unsqueeze(-1)
    local_variance = masked_variance(local_scores, valid).unsqueeze(-1)
    total_variance = (global_variance + local_variance).clamp_min(torch.finfo(torch.float32).tiny)
    return (local_variance / total_variance) * global_scores + (global_variance / total_variance) * local_scores


def dominant_token_scores(features: torch.Tensor, attention: torch.Tensor, score: str) -> torch.Tensor:
    """
    The DVTS score of every patch.

    Args:
        features: `(batch, patches, dim)` patch features of the selected layer, CLS removed, in raster order.
        attention: `(batch, rows, patches + 1)` head-mean attention of the same layer; row 0 is the CLS query, and
            all `patches + 1` rows are needed for the received-attention score.
        score: `"global_local"` (the paper's: CLS attention and LTAM, variance-weighted) or `"received_attention"`
            (the released code's: CLS attention and the attention each patch receives from the others).
    Returns:
        `(batch, patches)` float32 scores.
    """
    cls_attention = attention[:, 0, 1:].float()
    if score == "received_attention":
        num_patches = features.shape[1]
        patch_attention = attention[:, 1:, 1:].float()
        patch_attention = patch_attention * (1 - torch.eye(num_patches, device=attention.device))
        received = patch_attention.sum(dim=1) / (num_patches - 1)
        return RECEIVED_ATTENTION_ALPHA * F.normalize(cls_attention, dim=-1) + (
            1 - RECEIVED_ATTENTION_ALPHA
        ) * F.normalize(received, dim=-1)

    batch, num_patches, dim = features.shape
    grid_size = round(num_patches**0.5)
    return global_local_scores(cls_attention, features.view(batch, grid_size, grid_size, dim))


def global_local_scores(
    global_attention: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The paper's DVTS score (`dvts_score="global_local"`) of tokens on a grid: `G = softmax(g_raw)` of the raw global
    attention (CLS -> patch for CLIP towers, the normalised attention each unit receives for towers without a CLS
    token) and LTAM's `Lo = softmax(softmax(l))`, fused by `variance_weighted_fusion`.

    Args:
        global_attention: `(batch, height * width)` the raw global term `g_raw`, raster order.
        grid: `(batch, height, width, dim)` the features LTAM compares.
        valid: `(batch, height, width)` bool, each grid's own cells when grids of different sizes are padded to one
            shape; None when every grid fills it.
    Returns:
        `(batch, height * width)` float32 scores (0 outside `valid`).
    """
    flat_valid = valid.flatten(1) if valid is not None else None
    local_affinity = local_token_affinity(grid, valid).flatten(1)
    return variance_weighted_fusion(masked_softmax(global_attention.float(), flat_valid), local_affinity, flat_valid)


def select_dominant_tokens(
    features: torch.Tensor, attention: torch.Tensor, num_tokens: int, score: str
) -> torch.LongTensor:
    """DVTS: the `(batch, num_tokens)` indices of the best-scored patches (`dominant_token_scores`), ascending."""
    scores = dominant_token_scores(features, attention, score)
    every_patch = torch.ones_like(scores, dtype=torch.bool)
    kept = top_k_mask(scores, torch.full((scores.shape[0],), num_tokens, device=scores.device), every_patch)
    return positions_where(kept, num_tokens)


def text_guided_complement(
    tokens: torch.Tensor,
    token_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    visual_projection: nn.Module,
    num_seeds: int | torch.LongTensor,
    merge_iterations: int,
    merge_update: str,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """
    TGVC: picks `num_seeds` seeds by their relevance to the text and merges the other tokens into them.

    Args:
        tokens: `(batch, remaining, dim)` the tokens DVTS left, in raster order.
        token_embeds: `(batch, remaining, proj)` their L2-normalised `visual_projection`.
        text_embeds: `(batch, text, proj)` L2-normalised guidance token embeddings.
        text_mask: `(batch, text)` bool, True for real guidance tokens (at least one per row); the embeddings at
            other positions are ignored, whatever they hold.
        logit_scale: CLIP's scalar logit scale (log of the temperature `s`).
        visual_projection: CLIP's `visual_projection`, to re-embed the seeds after each update.
        num_seeds: seeds per row: one number, or a `(batch,)` tensor for rows of different sizes.
        merge_iterations, merge_update: how often, and how (`merge_step`), the other tokens are merged into the seeds.
        token_mask: `(batch, remaining)` bool, the real tokens of rows padded to one length (first in each row);
            None: all.
    Returns:
        The merged seeds `(batch, max_seeds, dim)` and the seeds' positions in `tokens` `(batch, max_seeds)`,
        ascending; a row with fewer seeds has its own first, then padding.
    """
    batch, num_tokens, _ = tokens.shape
    scale = logit_scale.float().exp().to(tokens.device)
    text_embeds = text_embeds.float().masked_fill(~text_mask.unsqueeze(-1), 0)
    similarity = scale * token_embeds.float() @ text_embeds.transpose(1, 2)
    relevance = similarity.sum(dim=-1) / text_mask.sum(dim=-1, keepdim=True)
    if token_mask is None:
        token_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=tokens.device)
    num_seeds = torch.as_tensor(num_seeds, device=tokens.device).expand(batch)
    max_seeds = int(num_seeds.max()) if batch else 0
    is_seed = top_k_mask(relevance, num_seeds, token_mask)
    is_query = token_mask & ~is_seed
    seed_positions = positions_where(is_seed, max_seeds)
    query_positions = positions_where(is_query, int(is_query.sum(dim=-1).max()) if batch else 0)
    seed_valid = torch.arange(max_seeds, device=tokens.device) < num_seeds.unsqueeze(-1)
    query_valid = is_query.gather(1, query_positions)
    seeds = gather_tokens(tokens, seed_positions).float()
    queries = gather_tokens(tokens, query_positions).float()
    query_text = gather_tokens(similarity, query_positions)
    original_seeds = seeds
    for _ in range(merge_iterations if max_seeds else 0):
        seed_embeds = F.normalize(visual_projection(seeds.to(tokens.dtype)).float(), dim=-1)
        affinity = query_text @ (scale * text_embeds @ seed_embeds.transpose(1, 2))
        nearest = affinity.masked_fill(~seed_valid.unsqueeze(1), float("-inf")).argmax(dim=-1)
        assignment = F.one_hot(nearest, max_seeds).float() * query_valid.unsqueeze(-1)
        seeds = merge_step(seeds, original_seeds, assignment, queries, merge_update)
    return seeds.to(tokens.dtype), seed_positions


def merge_step(
    seeds: torch.Tensor, original_seeds: torch.Tensor, assignment: torch.Tensor, members: torch.Tensor, update: str
) -> torch.Tensor:
    """
    One merge update, "add" (each seed adds the mean of its members) or "mean" (each seed becomes the mean of its
    original self and its members). Used by TGVC and by the LLM stage.

    Args:
        seeds, original_seeds: `(batch, seeds, dim)` float32, now and before the first update.
        assignment: `(batch, members, seeds)` one-hot (a row of zeros: a member assigned to no seed).
        members: `(batch, members, dim)` float32 tokens being merged.
    Returns:
        `(batch, seeds, dim)` the updated seeds.
    """
    assigned_sum = assignment.transpose(1, 2) @ members
    assigned_count = assignment.sum(dim=1).unsqueeze(-1)
    if update == "add":
        return seeds + assigned_sum / assigned_count.clamp_min(1)
    return (original_seeds + assigned_sum) / (1 + assigned_count)


def top_k_mask(scores: torch.Tensor, k: torch.LongTensor, valid: torch.Tensor) -> torch.Tensor:
    """
    `(batch, n)` bool: the `k[b]` highest `scores` `(batch, n)` among each row's `valid` entries, ties to the lower
    index.
    """
    order = torch.sort(scores.float().masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < k.unsqueeze(-1)) & valid


def positions_where(mask: torch.Tensor, count: int) -> torch.LongTensor:
    """
    The `(batch, count)` ascending positions where `mask` `(batch, n)` is True; a row with fewer True entries is
    filled up with positions where it is False.
    """
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :count]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tokens` `(batch, n, dim)` at `indices` `(batch, k)` -> `(batch, k, dim)`."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class Guidance:
    """
    What TGVC ranks and merges tokens by: each item's question, embedded per token in the space `projection` maps the
    vision tokens into (CLIP's joint space through `visual_projection`, or the LLM's input space through the identity).
    """

    embeds: torch.Tensor  # (items, text, proj): L2-normalised float32 token embeddings
    mask: torch.Tensor  # (items, text) bool; an all-False row: the item has no question
    projection: nn.Module  # (…, dim) tokens -> (…, proj)
    logit_scale: torch.Tensor  # scalar log of the similarity scale `s` (CLIP's logit_scale; 0 for s = 1)


@dataclass
class CompressedTokens:
    """`compress_tokens`' output for items (crops, frames or temporal slices) padded to one length."""

    features: torch.Tensor  # (items, max_dominant + max_complement, dim): DVTS tokens, then merged TGVC seeds
    valid: torch.Tensor  # (items, max_dominant + max_complement) bool: each item's own tokens
    dominant_indices: torch.LongTensor  # (items, max_dominant): positions DVTS kept, ascending, then padding
    dominant_valid: torch.Tensor  # (items, max_dominant) bool
    complement_seed_indices: torch.LongTensor  # (items, max_complement): the TGVC seeds' positions, likewise
    complement_seed_valid: torch.Tensor  # (items, max_complement) bool


def compress_tokens(
    tokens: torch.Tensor,
    scores: torch.Tensor | None,
    num_dominant: torch.LongTensor,
    num_complement: torch.LongTensor,
    guidance: Guidance | None,
    global_tokens: torch.Tensor | None,
    merge_iterations: int,
    merge_update: str,
    valid: torch.Tensor | None = None,
) -> CompressedTokens:
    """
    VisionTrim on a batch of items, whatever the model family: DVTS keeps each item's `num_dominant` best-scored
    tokens (raster order), then TGVC picks `num_complement` seeds among the others by their relevance to the guidance
    and merges the rest into them. The family supplies the scores (global source and local term), the guidance
    (embedder) and the layout (`valid`).

    Args:
        tokens: `(items, tokens, dim)` the tokens kept or merged, raster order (padded items: each one's own first).
        scores: `(items, tokens)` DVTS scores (`global_local_scores`, `dominant_token_scores`); None when no item
            keeps a DVTS token.
        num_dominant, num_complement: `(items,)` each item's `K_d` and `K_c`.
        guidance: the question of each item; None when no item has a TGVC seed.
        global_tokens: `(items, dim)` each item's global token (CLS, or the mean token), which guides the items
            whose guidance has no text (`config.empty_guidance="cls_similarity"`).
        merge_iterations, merge_update: the TGVC merge (`text_guided_complement`).
        valid: `(items, tokens)` bool, the real tokens of items padded to one length; None: all.
    """
    batch, num_tokens, _ = tokens.shape
    device = tokens.device
    if valid is None:
        valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    max_dominant, max_complement = int(num_dominant.max()), int(num_complement.max())
    is_dominant = top_k_mask(scores, num_dominant, valid) if max_dominant > 0 else torch.zeros_like(valid)
    dominant_indices = positions_where(is_dominant, max_dominant)
    dominant_valid = torch.arange(max_dominant, device=device) < num_dominant.unsqueeze(-1)
    dominant = gather_tokens(tokens, dominant_indices)
    if max_complement == 0:
        return CompressedTokens(
            dominant, dominant_valid, dominant_indices, dominant_valid, dominant_indices[:, :0], dominant_valid[:, :0]
        )

    is_remaining = valid & ~is_dominant
    remaining_indices = positions_where(is_remaining, int(is_remaining.sum(dim=-1).max()))
    remaining_valid = is_remaining.gather(1, remaining_indices)
    remaining = gather_tokens(tokens, remaining_indices)
    text_embeds, text_mask = add_class_guidance(guidance.embeds, guidance.mask, global_tokens, guidance.projection)
    seeds, seed_positions = text_guided_complement(
        remaining,
        F.normalize(guidance.projection(remaining).float(), dim=-1),
        text_embeds.to(device),
        text_mask.to(device),
        guidance.logit_scale,
        guidance.projection,
        num_complement,
        merge_iterations,
        merge_update,
        token_mask=remaining_valid,
    )
    seed_valid = torch.arange(max_complement, device=device) < num_complement.unsqueeze(-1)
    return CompressedTokens(
        torch.cat([dominant, seeds.to(dominant.dtype)], dim=1),
        torch.cat([dominant_valid, seed_valid], dim=1),
        dominant_indices,
        dominant_valid,
        remaining_indices.gather(1, seed_positions),
        seed_valid,
    )


# Outputs of the projections recorded while the vision tower runs, per thread/task (see `record_outputs`).
_RECORDED_OUTPUTS: ContextVar[dict[nn.Module, torch.Tensor] | None] = ContextVar("visiontrim_recorded", default=None)


def _record_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    recorded = _RECORDED_OUTPUTS.get()
    if recorded is not None:
        recorded[module] = output


def _record_keyword_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    recorded = _RECORDED_OUTPUTS.get()
    if recorded is not None:
        recorded[module] = kwargs


@contextmanager
def record_outputs(*modules: nn.Module, inputs_of: tuple[nn.Module, ...] = ()) -> Iterator[dict[nn.Module, Any]]:
    """
    Records the outputs of `modules` (and the keyword arguments `inputs_of` are called with) during the block, keyed
    by module. The hooks live only for the block and write to a context-local dict, so concurrent calls on one model
    each see their own tensors.
    """
    recorded: dict[nn.Module, Any] = {}
    context = _RECORDED_OUTPUTS.set(recorded)
    handles = [module.register_forward_hook(_record_output) for module in modules]
    handles += [module.register_forward_pre_hook(_record_keyword_inputs, with_kwargs=True) for module in inputs_of]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        _RECORDED_OUTPUTS.reset(context)


@dataclass
class VisionTowerRun:
    """The vision tower's outputs for a batch of crops, with what DVTS needs of the scored layer's attention."""

    outputs: BaseModelOutputWithPooling
    features: torch.Tensor  # (crops, patches + 1, vision_hidden): the selected layer's features, CLS first
    query: torch.Tensor  # (crops, patches + 1, vision_hidden): that layer's projected queries
    key: torch.Tensor  # (crops, patches + 1, vision_hidden): its projected keys
    num_heads: int
    scaling: float


@dataclass
class CompressedCrops:
    """DVTS + TGVC output for a batch of crops."""

    features: torch.Tensor  # (crops, visual_tokens, vision_hidden): DVTS tokens, then the merged TGVC seeds
    dominant_indices: torch.LongTensor  # (crops, dominant_tokens): raster indices in the crop's patch grid
    complement_seed_indices: torch.LongTensor  # (crops, complement_tokens)
    crops_per_unit: list[int]  # consecutive crops (frames) of each image (video)


def scored_attention_block(tower: nn.Module, layer_index: int) -> nn.Module:
    """The attention block of `tower`'s encoder layer `layer_index`, whose queries and keys DVTS records."""
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    attention = getattr(layers[layer_index], "self_attn", None) if layers is not None else None
    if attention is None or not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "scale")):
        raise ValueError(
            f"VisionTrim reads the attention of vision layer {layer_index} through "
            f"`vision_tower.encoder.layers[{layer_index}].self_attn` (q_proj, k_proj, num_heads, scale), which "
            f"{type(tower).__name__} does not have; use a CLIP-style vision tower."
        )
    return attention


def run_vision_tower(
    tower: nn.Module, pixel_values: torch.Tensor, vision_feature_layer: int, layer_index: int, **tower_kwargs
) -> VisionTowerRun:
    """
    Runs `tower` on `(crops, 3, height, width)` pixels, keeping `hidden_states[vision_feature_layer]` (only that one
    unless `tower_kwargs` ask for more) and recording the queries and keys of encoder layer `layer_index` (the one
    producing it): no attention map is needed, so every layer keeps its fast attention kernel.
    """
    attention = scored_attention_block(tower, layer_index)
    tower_kwargs.setdefault("output_hidden_states", vision_feature_layer)
    with record_outputs(attention.q_proj, attention.k_proj) as recorded:
        outputs = tower(pixel_values, return_dict=True, **tower_kwargs)
    return VisionTowerRun(
        outputs,
        outputs.hidden_states[vision_feature_layer],
        recorded[attention.q_proj],
        recorded[attention.k_proj],
        attention.num_heads,
        attention.scale,
    )


def checked_guidance(
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    num_units: int,
    empty_guidance: str,
    input_name: str,
    device: torch.device,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """
    The guidance ids of each image (or video) on `device` and their bool mask `(units, text)`, after checking that
    there is one row per unit and, with `empty_guidance="error"`, that no row is empty. Errors name the inputs and
    what to change.
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
    if guidance_input_ids.shape[0] != num_units or guidance_attention_mask.shape != guidance_input_ids.shape:
        raise ValueError(
            f"`{input_name}_input_ids` {tuple(guidance_input_ids.shape)} and `{input_name}_attention_mask` "
            f"{tuple(guidance_attention_mask.shape)} must both have one row per {unit} ({num_units} {unit}s): "
            f"the VisionTrim processor repeats each prompt's guidance for each of its {unit}s."
        )
    input_ids = guidance_input_ids.to(device)
    text_mask = guidance_attention_mask.to(device).bool()
    has_text = text_mask.any(dim=-1)
    if empty_guidance == "error" and not bool(has_text.all()):
        empty = torch.nonzero(~has_text).flatten().tolist()
        raise ValueError(
            f"The guidance text of {unit}(s) {empty} is empty, so TGVC has no question to rank tokens by: pass "
            "a non-empty `guidance_text=` to the processor, or set `config.empty_guidance='cls_similarity'` to "
            f"guide those {unit}s by their own global token (CLS; Qwen: the mean merged token)."
        )
    return input_ids, text_mask


def encode_guidance(
    text_encoder: CLIPTextModelWithProjection,
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    num_units: int,
    empty_guidance: str,
    input_name: str = "guidance",
    cache: "GuidanceEmbeddingCache | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Encodes the guidance text of each image (or video) with the CLIP text tower (or takes it from `cache`).

    Args:
        guidance_input_ids: `(units, text)` CLIP token ids, one row per image (or video).
        guidance_attention_mask: `(units, text)`; a row of zeros marks an empty guidance text.
        num_units: how many images (or videos) there are.
        empty_guidance: `config.empty_guidance`; `"error"` refuses an empty guidance text.
        input_name: the inputs' name prefix in error messages ("guidance", or "video_guidance" for videos).
        cache: recent texts' embeddings (`GuidanceEmbeddingCache`), used without gradients; None runs the tower.
    Returns:
        L2-normalised float32 token embeddings `(units, text, projection_dim)` and their validity mask
        `(units, text)` (bool; all False for an empty guidance text).
    """
    input_ids, text_mask = checked_guidance(
        guidance_input_ids, guidance_attention_mask, num_units, empty_guidance, input_name, text_encoder.device
    )
    if cache is None or torch.is_grad_enabled():
        return run_text_tower(text_encoder, input_ids, text_mask), text_mask
    return cache.embed(text_encoder, input_ids, text_mask), text_mask


def run_text_tower(
    text_encoder: CLIPTextModelWithProjection, input_ids: torch.LongTensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """
    The L2-normalised float32 `(rows, text, projection_dim)` token embeddings of `(rows, text)` guidance ids. Rows
    without text (an all-False `text_mask` row) run on their special tokens, so no attention row is fully masked;
    their embeddings are to be ignored.
    """
    has_text = text_mask.any(dim=-1, keepdim=True)
    encoder_mask = torch.where(has_text, text_mask, torch.ones_like(text_mask))
    hidden_states = text_encoder.text_model(input_ids=input_ids, attention_mask=encoder_mask.long())
    return F.normalize(text_encoder.text_projection(hidden_states.last_hidden_state).float(), dim=-1)


class GuidanceEmbeddingCache:
    """
    The CLIP text tower's embeddings of recent guidance texts, keyed by their token ids (least recently used out
    first, at most `capacity` texts): a repeated question (POPE's template over many images, a serving system's fixed
    question) costs no text-tower run. Padding does not change a text's embeddings (right padding, causal attention),
    so each is stored unpadded. Entries are dropped whenever the tower's weights, device or dtype change; the cache is
    used only without gradients. Its capacity is `config.guidance_cache_size`, read live.
    """

    def __init__(self, config: CompressionSettings):
        self.config = config
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.weights_stamp: tuple | None = None

    def clear(self) -> None:
        self.entries.clear()

    def embed(
        self, text_encoder: CLIPTextModelWithProjection, input_ids: torch.LongTensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """`run_text_tower`'s embeddings of `(rows, text)` ids; the texts not cached run through the tower at once."""
        stamp = tuple((weight.data_ptr(), weight._version, weight.dtype) for weight in text_encoder.parameters())
        if stamp != self.weights_stamp:
            self.entries.clear()
            self.weights_stamp = stamp
        host_ids, host_mask = input_ids.cpu(), text_mask.cpu()  # one transfer for all rows
        keys = [tuple(ids[mask].tolist()) for ids, mask in zip(host_ids, host_mask, strict=True)]
        missing = sorted({row for row, key in enumerate(keys) if key and key not in self.entries})
        if missing:
            fresh = run_text_tower(text_encoder, input_ids[missing], text_mask[missing])
            for embeds, row in zip(fresh, missing, strict=True):
                self.entries[keys[row]] = embeds[: len(keys[row])]
        empty = torch.zeros(0, text_encoder.config.projection_dim, device=input_ids.device)
        rows = [self.entries[key] if key else empty for key in keys]  # an empty text's row is ignored downstream
        for key in keys:
            if key:
                self.entries.move_to_end(key)
        while len(self.entries) > self.config.guidance_cache_size:
            self.entries.popitem(last=False)
        text_embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return F.pad(text_embeds, (0, 0, 0, input_ids.shape[1] - text_embeds.shape[1]))


def add_class_guidance(
    text_embeds: torch.Tensor, text_mask: torch.Tensor, class_tokens: torch.Tensor, visual_projection: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Guides the crops without guidance text (`config.empty_guidance == "cls_similarity"`) by their own CLS token (for
    Qwen, whose tower has none, the mean of the slice's merged tokens): prepends a slot holding the crop's normalised
    `visual_projection(CLS)`, valid only for those crops.

    Args:
        text_embeds, text_mask: `(crops, text, projection_dim)` and `(crops, text)` from `encode_guidance`.
        class_tokens: `(crops, vision_hidden)` CLS tokens of the selected vision layer.
    """
    has_text = text_mask.any(dim=-1)
    if bool(has_text.all()):
        return text_embeds, text_mask
    logger.warning_once(
        "An image or video has no question (an image-only prompt): TGVC ranks its tokens by their similarity to its "
        "own CLS token (Qwen: its mean merged token; config.empty_guidance='cls_similarity'); set "
        "empty_guidance='error' to refuse such prompts."
    )
    class_embeds = F.normalize(visual_projection(class_tokens).float(), dim=-1).to(text_embeds.device)
    text_embeds = torch.cat([class_embeds.unsqueeze(1), text_embeds], dim=1)
    text_mask = torch.cat([~has_text.unsqueeze(-1), text_mask], dim=1)
    return text_embeds, text_mask


def compress_crops(
    run: VisionTowerRun,
    config: CompressionSettings,
    visual_projection: nn.Module,
    logit_scale: torch.Tensor,
    text_encoder: CLIPTextModelWithProjection,
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    crops_per_unit: list[int],
    input_name: str = "guidance",
    guidance_cache: GuidanceEmbeddingCache | None = None,
) -> CompressedCrops:
    """
    DVTS then TGVC on a batch of crops, all at once: each crop keeps `config.dominant_tokens` DVTS tokens followed by
    `config.complement_tokens` merged TGVC seeds.

    Args:
        run: `run_vision_tower`'s result for `(crops, 3, height, width)` pixels.
        visual_projection, logit_scale: the tower's CLIP head, into the guidance text's embedding space.
        text_encoder: the CLIP text tower of the guidance (only run when TGVC is on).
        guidance_input_ids, guidance_attention_mask: `(units, text)` guidance of each image (or video).
        crops_per_unit: how many consecutive crops (or frames) each image (or video) has; the crops of a unit share
            its guidance.
        input_name: the guidance inputs' name prefix in error messages ("guidance" or "video_guidance").
        guidance_cache: recent guidance texts' embeddings, to skip the text tower for a repeated question.
    """
    class_tokens, patches = run.features[:, 0], run.features[:, 1:]
    num_crops, num_patches, _ = patches.shape
    if num_patches != config.num_patches:
        raise ValueError(
            f"The vision tower gave {num_patches} patch tokens per crop but the config expects "
            f"{config.num_patches} ({config.vision_config.image_size} px / patch "
            f"{config.vision_config.patch_size}): feed images at the tower's resolution."
        )
    scores = None
    if config.dominant_tokens > 0:
        rows = run.key.shape[1] if config.dvts_score == "received_attention" else 1  # the CLS row is enough
        attention = head_mean_attention(run.query[:, :rows], run.key, run.num_heads, run.scaling)
        scores = dominant_token_scores(patches, attention, config.dvts_score)
    guidance = None
    if config.tgvc_enabled:
        text_embeds, text_mask = encode_guidance(
            text_encoder,
            guidance_input_ids,
            guidance_attention_mask,
            len(crops_per_unit),
            config.empty_guidance,
            input_name,
            guidance_cache,
        )
        repeats = torch.tensor(crops_per_unit, device=text_embeds.device)
        guidance = Guidance(
            text_embeds.repeat_interleave(repeats, dim=0).to(patches.device),
            text_mask.repeat_interleave(repeats, dim=0).to(patches.device),
            visual_projection,
            logit_scale,
        )
    compressed = compress_tokens(
        patches,
        scores,
        torch.full((num_crops,), config.dominant_tokens, device=patches.device),
        torch.full((num_crops,), config.complement_tokens, device=patches.device),
        guidance,
        class_tokens,
        config.merge_iterations,
        config.merge_update,
    )
    return CompressedCrops(
        compressed.features, compressed.dominant_indices, compressed.complement_seed_indices, crops_per_unit
    )


# The most attention-probability entries `received_attention` holds at once (16 MiB in float32: faster on a CPU than
# larger chunks, which leave its caches).
ATTENTION_CHUNK_ELEMENTS = 2**22


def received_attention(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, num_heads: int, scaling: float
) -> torch.Tensor:
    """
    The attention each token receives: head-mean attention probabilities `softmax(q k^T * scaling)` among each
    sequence's valid tokens, averaged over its valid queries, in float32. The queries run in chunks, so memory stays
    bounded for the thousands of patches of a large image.

    Args:
        query, key: `(sequences, tokens, dim)` projected queries and keys (with their rotary embedding), sequences of
            different lengths padded to one.
        valid: `(sequences, tokens)` bool, True for real tokens.
    Returns:
        `(sequences, tokens)`, 0 at padding; each row sums to 1 over its valid tokens.
    """
    sequences, tokens, dim = query.shape
    head_dim = dim // num_heads
    query = query.float().view(sequences, tokens, num_heads, head_dim).transpose(1, 2) * scaling
    key = key.float().view(sequences, tokens, num_heads, head_dim).permute(0, 2, 3, 1)
    key_bias = torch.zeros(sequences, 1, 1, tokens, device=query.device).masked_fill(
        ~valid[:, None, None, :], float("-inf")
    )
    query_weights = valid.float() / (num_heads * valid.sum(dim=-1, keepdim=True).clamp_min(1))
    chunk = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, sequences * num_heads * tokens))
    received = torch.zeros(sequences, tokens, device=query.device)
    for start in range(0, tokens, chunk):
        probabilities = torch.softmax(torch.matmul(query[:, :, start : start + chunk], key) + key_bias, dim=-1)
        received = received + torch.einsum("shqt,sq->st", probabilities, query_weights[:, start : start + chunk])
    return received


def pad_segments(values: torch.Tensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `values` `(total, ...)`, the consecutive segments of `lengths` `(segments,)`, padded into `(segments,
    max_length, ...)` (padding repeats a real entry), with the `(segments, max_length)` validity mask.
    """
    max_length = int(lengths.max())
    starts = F.pad(lengths.cumsum(0), (1, 0))[:-1]
    offsets = torch.arange(max_length, device=values.device)
    valid = offsets < lengths.unsqueeze(-1)
    index = (starts.unsqueeze(-1) + offsets).masked_fill(~valid, 0)
    return values[index], valid


@dataclass
class QwenTowerRun:
    """A Qwen2-VL / Qwen2.5-VL vision tower's outputs for packed images (or videos), with what DVTS needs."""

    outputs: BaseModelOutputWithPooling  # the tower's own outputs; pooler_output: the merged tokens in raster order
    query: torch.Tensor  # (patches, vision_hidden): the scored block's queries, rotary embedding applied, raster order
    key: torch.Tensor  # (patches, vision_hidden): its keys, likewise
    features: torch.Tensor  # (patches, vision_hidden): the scored block's output, raster order
    grid_thw: torch.LongTensor  # (media, 3): each image's (video's) patch grid
    merge_size: int
    num_heads: int
    scaling: float
    # (merged tokens, dim): features the tower gives beside each merged token, kept and merged with it (Qwen3-VL's
    # DeepStack sets, side by side); None: none.
    companions: torch.Tensor | None = None


@dataclass
class CompressedUnits:
    """DVTS + TGVC output for packed Qwen images (or videos), every temporal slice compressed on its own."""

    features: torch.Tensor  # (kept, text_hidden): per slice its DVTS tokens, then its merged TGVC seeds
    kept_units: torch.LongTensor  # (kept,): the unit of each token (a merged token's seed) in its image or video
    dominant_units: torch.LongTensor  # (dominant,): the DVTS tokens' units, raster order within each slice
    complement_seed_units: torch.LongTensor  # (complement,): the TGVC seeds' units, likewise
    tokens_per_media: list[int]  # how many tokens each image (video) keeps
    companions: torch.Tensor | None = None  # (kept, companion_dim): the companions' rows of the same tokens


class LeadingFeatures(nn.Module):
    """The first `width` features of each token `(..., dim)`: the main features of tokens carrying companions."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., : self.width]


def compress_units(
    run: QwenTowerRun,
    config: CompressionSettings,
    text_embeds: torch.Tensor | None,
    text_mask: torch.Tensor | None,
) -> CompressedUnits:
    """
    DVTS then TGVC on the merged tokens ("units", 2 x 2 patches each) of Qwen images or videos, every temporal slice
    on its own grid, all slices batched (padded to the largest grid). A slice of `N` units keeps
    `config.kept_tokens(N)` = `(K_d, K_c)`: its `K_d` best DVTS units in raster order, then its `K_c` TGVC seeds.
    The run's companion features (Qwen3-VL's DeepStack sets) ride along each unit: the kept units' rows, merged with
    the same assignments at every TGVC iteration; they never take part in a choice.

    DVTS: the global term is the attention each unit receives at the scored block (head-mean probabilities over the
    image's or video's patches, averaged over its queries, summed over the unit's patches, normalised over the
    slice); the local term is LTAM on the slice's unit grid, a unit's feature being the mean of its patches'
    features; both fused by `variance_weighted_fusion`. TGVC compares the merged tokens (the LLM's inputs) with the
    guidance in the LLM's embedding space (identity projection).

    Args:
        run: the tower's run (`QwenTowerRun`).
        config: the compression settings.
        text_embeds: `(media, text, text_hidden)` L2-normalised guidance embeddings of each image (video); None
            when TGVC is off.
        text_mask: `(media, text)` bool validity of `text_embeds`.
    """
    unit_size = run.merge_size**2
    grid = run.grid_thw.to(run.query.device)
    frames, patch_rows, patch_cols = grid.unbind(-1)
    unit_rows, unit_cols = patch_rows // run.merge_size, patch_cols // run.merge_size
    units_per_slice = unit_rows * unit_cols

    # Each temporal slice attends only within itself (the scored block's `cu_seqlens` segments).
    patches_per_slice = (patch_rows * patch_cols).repeat_interleave(frames)
    query, valid_patches = pad_segments(run.query, patches_per_slice)
    key, _ = pad_segments(run.key, patches_per_slice)
    received = received_attention(query, key, valid_patches, run.num_heads, run.scaling)
    received = received.view(received.shape[0], -1, unit_size).sum(dim=-1)
    unit_received = received[valid_patches[:, ::unit_size]]  # (units,) in media order: slices consecutive

    slice_rows = unit_rows.repeat_interleave(frames)
    slice_cols = unit_cols.repeat_interleave(frames)
    slice_units = units_per_slice.repeat_interleave(frames)
    num_slices = slice_units.shape[0]
    slice_of_unit = torch.arange(num_slices, device=grid.device).repeat_interleave(slice_units)
    local_unit = (
        torch.arange(slice_of_unit.shape[0], device=grid.device) - F.pad(slice_units.cumsum(0), (1, 0))[slice_of_unit]
    )
    max_rows, max_cols = int(slice_rows.max()), int(slice_cols.max())
    grid_cell = (local_unit // slice_cols[slice_of_unit]) * max_cols + local_unit % slice_cols[slice_of_unit]
    valid = torch.zeros(num_slices, max_rows * max_cols, dtype=torch.bool, device=grid.device)
    valid[slice_of_unit, grid_cell] = True

    def on_grid(values: torch.Tensor) -> torch.Tensor:
        padded = values.new_zeros(num_slices, max_rows * max_cols, *values.shape[1:])
        padded[slice_of_unit, grid_cell] = values
        return padded

    global_scores = on_grid(unit_received.float())
    global_scores = global_scores / global_scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    unit_features = on_grid(run.features.view(-1, unit_size, run.features.shape[-1]).float().mean(dim=1))
    budgets = [config.kept_tokens(units) for units in slice_units.tolist()]
    num_dominant = torch.tensor([dominant for dominant, _ in budgets], device=grid.device)
    num_complement = torch.tensor([complement for _, complement in budgets], device=grid.device)
    # Companions as extra columns of the merged tokens: DVTS gathers, and TGVC's merge sums, columns independently.
    width = run.outputs.pooler_output.shape[-1]
    tokens, companions = run.outputs.pooler_output, run.companions
    if companions is not None:
        tokens = torch.cat([tokens, companions.to(tokens)], dim=-1)
    if text_embeds is not None:
        text_embeds = text_embeds.repeat_interleave(frames.to(text_embeds.device), dim=0).to(grid.device)
        text_mask = text_mask.repeat_interleave(frames.to(text_mask.device), dim=0).to(grid.device)
    compressed = compress_grids(
        on_grid(tokens),
        global_scores,
        unit_features.view(num_slices, max_rows, max_cols, -1),
        num_dominant,
        num_complement,
        text_embeds,
        text_mask,
        config,
        valid,
        width,
    )

    first_slice = F.pad(frames.cumsum(0), (1, 0))[:-1].repeat_interleave(frames)
    slice_start = (torch.arange(num_slices, device=grid.device) - first_slice) * slice_units

    def unit_index(cells: torch.Tensor) -> torch.Tensor:
        """Padded grid cells -> the unit's raster index in its image or video (slice offset included)."""
        return slice_start.unsqueeze(-1) + (cells // max_cols) * slice_cols.unsqueeze(-1) + cells % max_cols

    kept_cells = torch.cat([compressed.dominant_indices, compressed.complement_seed_indices], dim=1)
    tokens_per_slice = num_dominant + num_complement
    tokens_per_media = torch.zeros(len(frames), dtype=torch.long, device=grid.device).index_add_(
        0, torch.arange(len(frames), device=grid.device).repeat_interleave(frames), tokens_per_slice
    )
    kept = compressed.features[compressed.valid]
    return CompressedUnits(
        kept[:, :width],
        unit_index(kept_cells)[compressed.valid],
        unit_index(compressed.dominant_indices)[compressed.dominant_valid],
        unit_index(compressed.complement_seed_indices)[compressed.complement_seed_valid],
        tokens_per_media.tolist(),
        kept[:, width:] if companions is not None else None,
    )


def compress_grids(
    tokens: torch.Tensor,
    global_attention: torch.Tensor,
    grid_features: torch.Tensor,
    num_dominant: torch.LongTensor,
    num_complement: torch.LongTensor,
    text_embeds: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    config: CompressionSettings,
    valid: torch.Tensor | None = None,
    width: int | None = None,
) -> CompressedTokens:
    """
    `compress_tokens` for items on grids guided in the LLM's embedding space (towers without a CLS token or a CLIP text
    tower: Qwen, LLaVA-OneVision): DVTS by `global_local_scores` of the raw global term and the grid's LTAM; TGVC
    with the identity projection and `s = 1`; an item without a question guided by its mean token.

    Args:
        tokens: `(items, rows * cols, dim)` the tokens kept or merged (the LLM's inputs), raster order.
        global_attention: `(items, rows * cols)` the raw global term `g_raw` (e.g. the attention each token receives).
        grid_features: `(items, rows, cols, feature_dim)` the features LTAM compares.
        num_dominant, num_complement: `(items,)` each item's `K_d` and `K_c`.
        text_embeds: `(items, text, width)` L2-normalised guidance embeddings of each item; None when TGVC is off.
        text_mask: `(items, text)` bool validity of `text_embeds`.
        valid: `(items, rows * cols)` bool, each item's own cells of grids of different sizes padded to one shape (its
            `h x w` top-left cells); None when every grid fills it.
        width: how many leading columns of `tokens` TGVC compares with the guidance (the others ride along, merged
            with the same assignments); None: all.
    """
    items, rows, cols, _ = grid_features.shape
    grid_valid = valid.view(items, rows, cols) if valid is not None else None
    scores = global_local_scores(global_attention, grid_features, grid_valid)
    guidance = item_means = None
    if text_embeds is not None:
        guidance = Guidance(
            text_embeds, text_mask, LeadingFeatures(width or tokens.shape[-1]), torch.zeros((), device=tokens.device)
        )
        present = valid if valid is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        item_means = (tokens * present.unsqueeze(-1)).sum(dim=1) / present.sum(dim=-1, keepdim=True)
    return compress_tokens(
        tokens,
        scores,
        num_dominant,
        num_complement,
        guidance,
        item_means,
        config.merge_iterations,
        config.merge_update,
        valid,
    )


def embed_question(
    embed_tokens: Callable[[torch.LongTensor], torch.Tensor],
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    num_media: int,
    empty_guidance: str,
    modality: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Each image's (video's) question in the LLM's embedding space: its `(media, text)` guidance ids, checked by
    `checked_guidance` and moved to `device`, embedded by the LLM's `embed_tokens` and L2-normalised (float32), with
    their `(media, text)` bool mask.
    """
    input_name = "guidance" if modality == "image" else "video_guidance"
    input_ids, text_mask = checked_guidance(
        guidance_input_ids, guidance_attention_mask, num_media, empty_guidance, input_name, device
    )
    return F.normalize(embed_tokens(input_ids).float(), dim=-1), text_mask


def compress_units_with_question(
    run: QwenTowerRun,
    config: CompressionSettings,
    embed_tokens: Callable[[torch.LongTensor], torch.Tensor],
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    modality: str,
    device: torch.device,
) -> CompressedUnits:
    """
    `compress_units` guided by each image's (video's) question in the LLM's embedding space (`embed_question`). With
    TGVC off (`dominant_ratio=1`) there is no guidance.
    """
    text_embeds = text_mask = None
    if config.dominant_ratio < 1:
        text_embeds, text_mask = embed_question(
            embed_tokens,
            guidance_input_ids,
            guidance_attention_mask,
            run.grid_thw.shape[0],
            config.empty_guidance,
            modality,
            device,
        )
    return compress_units(run, config, text_embeds, text_mask)


def compress_pooled_crops(
    run: VisionTowerRun,
    tokens: torch.Tensor,
    pool: Callable[[torch.Tensor], torch.Tensor] | None,
    config: CompressionSettings,
    kept: int,
    items_per_media: list[int],
    embed_tokens: Callable[[torch.LongTensor], torch.Tensor],
    guidance_input_ids: torch.LongTensor | None,
    guidance_attention_mask: torch.Tensor | None,
    modality: str,
) -> CompressedTokens:
    """
    DVTS + TGVC on the crops (video frames) of a tower without a CLS token, guided in the LLM's embedding space
    (LLaVA-OneVision's SigLIP): every item keeps `kept` tokens, `config.split_kept(kept)` = `(K_d, K_c)`. The global
    term is the attention each patch receives at the scored layer (`received_attention`); LTAM compares the scored
    layer's features on the item's grid. With `pool` (OneVision's 2 x 2 pooling of a frame, applied to `(items,
    patches, dim)`), the received attention (renormalised to sum 1), the features and the tokens are pooled first.

    Args:
        run: the tower's run on `(items, 3, height, width)` pixels; `run.features` `(items, patches, vision_hidden)`.
        tokens: `(items, patches, text_hidden)` the projector's outputs, the tokens kept or merged.
        items_per_media: how many consecutive items (crops, frames) each image (video) has; they share its question.
        embed_tokens, guidance_input_ids, guidance_attention_mask, modality: the question (`embed_question`).
    """
    features = run.features
    every_patch = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    received = received_attention(run.query, run.key, every_patch, run.num_heads, run.scaling)
    if pool is not None:
        received = pool(received.unsqueeze(-1)).squeeze(-1)
        received = received / received.sum(dim=-1, keepdim=True)
        features, tokens = pool(features), pool(tokens)
    items, units, _ = tokens.shape
    side = round(units**0.5)
    num_dominant, num_complement = config.split_kept(kept)
    text_embeds = text_mask = None
    if num_complement > 0:
        text_embeds, text_mask = embed_question(
            embed_tokens,
            guidance_input_ids,
            guidance_attention_mask,
            len(items_per_media),
            config.empty_guidance,
            modality,
            tokens.device,
        )
        repeats = torch.tensor(items_per_media, device=tokens.device)
        text_embeds, text_mask = text_embeds.repeat_interleave(repeats, 0), text_mask.repeat_interleave(repeats, 0)
    return compress_grids(
        tokens,
        received,
        features.view(items, side, side, -1),
        torch.full((items,), num_dominant, device=tokens.device),
        torch.full((items,), num_complement, device=tokens.device),
        text_embeds,
        text_mask,
        config,
    )


def anyres_image_tokens(
    crop_features: torch.Tensor, crops_per_image: list[int], image_newline: torch.Tensor | None
) -> list[torch.Tensor]:
    """
    The LLM-ready tokens of each anyres image: its crops' tokens in order (base view first), each crop followed by
    `image_newline` when given.

    Args:
        crop_features: `(crops, visual_tokens, text_hidden)` projected compressed crops, the crops of each image
            consecutive.
        crops_per_image: how many crops each image has.
        image_newline: `(text_hidden,)`, or None for no newline.
    Returns:
        Per image a `(crops * (visual_tokens + 1 if image_newline is given else visual_tokens), text_hidden)` tensor.
    """
    if image_newline is not None:
        newline = image_newline.to(crop_features)[None, None].expand(crop_features.shape[0], 1, -1)
        crop_features = torch.cat([crop_features, newline], dim=1)
    tokens_per_image = [crops * crop_features.shape[1] for crops in crops_per_image]
    return list(torch.split(crop_features.flatten(0, 1), tokens_per_image))


__all__ = [
    "CompressedCrops",
    "CompressedUnits",
    "QwenTowerRun",
    "GuidanceEmbeddingCache",
    "LeadingFeatures",
    "VisionTowerRun",
    "anyres_image_tokens",
    "compress_crops",
    "compress_grids",
    "compress_pooled_crops",
    "compress_units",
    "compress_units_with_question",
    "dominant_token_scores",
    "embed_question",
    "encode_guidance",
    "head_mean_attention",
    "local_token_affinity",
    "merge_step",
    "received_attention",
    "run_vision_tower",
    "select_dominant_tokens",
    "text_guided_complement",
]
