# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The two VisionTrim stages, shared by the LLaVA, LLaVA-NeXT and video classes (see `ALGORITHM.md`).

DVTS (dominant vision token selection) keeps the K_d most important patch tokens of a crop; TGVC (text-guided vision
complement) merges the remaining tokens into K_c seeds chosen by their relevance to the question. Everything is batched
over crops, free of Python loops over tokens or crops, deterministic (stable sorts, first-index argmax, one-hot matmuls
instead of scatter-adds) and computes scores in float32 whatever the model dtype.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .configuration_visiontrim import VisionTrimSettings


# LTAM weights of the paper (feature distance, position distance, position term).
LTAM_FEATURE_WEIGHT = 1.0
LTAM_POSITION_WEIGHT = 1.0
LTAM_POSITION_SCALE = 0.5
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


def local_token_affinity(features: torch.Tensor, grid_size: int) -> torch.Tensor:
    """
    LTAM: mean affinity of each patch to the 9 slots of its 3x3 window (itself included; slots outside the grid add 0).

    `kappa_ij = -||x_i - x_j||^2 / (w1 var(X)) - w3 ||p_i - p_j||^2 / (w2 var(P))`, `l_i = sum_j kappa_ij / 9`, with
    `var(X)` the unbiased variance of all entries of the crop's features and `var(P)` that of all 2N grid coordinates.

    Args:
        features: `(batch, grid_size**2, dim)` patch features in raster order.
    Returns:
        `(batch, grid_size**2)` float32 affinities `l` (before softmax).
    """
    batch, num_patches, dim = features.shape
    features = features.float()
    feature_variance = features.reshape(batch, -1).var(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    coordinates = torch.arange(grid_size, device=features.device, dtype=torch.float32)
    position_variance = coordinates.repeat_interleave(grid_size).repeat(2).var()

    grid = features.view(batch, grid_size, grid_size, dim)
    padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
    inside = F.pad(torch.ones(1, grid_size, grid_size, dtype=torch.bool, device=features.device), (1, 1, 1, 1))
    affinity = torch.zeros(batch, grid_size, grid_size, device=features.device, dtype=torch.float32)
    for row_offset in (-1, 0, 1):
        for col_offset in (-1, 0, 1):
            rows = slice(1 + row_offset, 1 + row_offset + grid_size)
            cols = slice(1 + col_offset, 1 + col_offset + grid_size)
            feature_distance = (grid - padded[:, rows, cols]).square().sum(dim=-1)
            position_distance = float(row_offset**2 + col_offset**2)
            kappa = -feature_distance / (LTAM_FEATURE_WEIGHT * feature_variance.view(batch, 1, 1)) - (
                LTAM_POSITION_SCALE * position_distance / (LTAM_POSITION_WEIGHT * position_variance)
            )
            affinity = affinity + torch.where(inside[:, rows, cols], kappa, 0.0)
    return affinity.view(batch, num_patches) / 9


class DominantVisionTokenSelection(nn.Module):
    """DVTS: scores every patch of a crop and keeps the `config.dominant_tokens` best, in raster order."""

    def __init__(self, config: VisionTrimSettings):
        super().__init__()
        self.config = config

    @property
    def needs_full_attention(self) -> bool:
        """Whether `forward` reads the whole attention map (received attention) or only its CLS row."""
        return self.config.dvts_score == "received_attention"

    def scores(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: `(batch, patches, dim)` patch features of the selected layer, CLS removed.
            attention: `(batch, rows, patches + 1)` head-mean attention of the same layer; row 0 is the CLS query, and
                all `patches + 1` rows are needed for the received-attention score.
        Returns:
            `(batch, patches)` float32 scores.
        """
        cls_attention = attention[:, 0, 1:].float()
        if self.needs_full_attention:
            num_patches = features.shape[1]
            patch_attention = attention[:, 1:, 1:].float()
            patch_attention = patch_attention * (1 - torch.eye(num_patches, device=attention.device))
            received = patch_attention.sum(dim=1) / (num_patches - 1)
            return RECEIVED_ATTENTION_ALPHA * F.normalize(cls_attention, dim=-1) + (
                1 - RECEIVED_ATTENTION_ALPHA
            ) * F.normalize(received, dim=-1)

        grid_size = round(features.shape[1] ** 0.5)
        global_scores = torch.softmax(cls_attention, dim=-1)
        local_scores = torch.softmax(torch.softmax(local_token_affinity(features, grid_size), dim=-1), dim=-1)
        global_variance = global_scores.var(dim=-1, keepdim=True)
        local_variance = local_scores.var(dim=-1, keepdim=True)
        total_variance = (global_variance + local_variance).clamp_min(torch.finfo(torch.float32).tiny)
        return (local_variance / total_variance) * global_scores + (global_variance / total_variance) * local_scores

    def forward(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Returns the `(batch, dominant_tokens)` indices of the kept patches, ascending (raster order)."""
        return top_indices_in_order(self.scores(features, attention), self.config.dominant_tokens)


class TextGuidedVisionComplement(nn.Module):
    """TGVC: picks `config.complement_tokens` seeds by text relevance and merges the other tokens into them."""

    def __init__(self, config: VisionTrimSettings):
        super().__init__()
        self.config = config

    def forward(
        self,
        tokens: torch.Tensor,
        token_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        logit_scale: torch.Tensor,
        visual_projection: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: `(batch, remaining, dim)` the tokens DVTS left, in raster order.
            token_embeds: `(batch, remaining, proj)` their L2-normalised `visual_projection`.
            text_embeds: `(batch, text, proj)` L2-normalised guidance token embeddings.
            text_mask: `(batch, text)` bool, True for real guidance tokens (at least one per row); the embeddings at
                other positions are ignored, whatever they hold.
            logit_scale: CLIP's scalar logit scale (log of the temperature `s`).
            visual_projection: CLIP's `visual_projection`, to re-embed the seeds after each update.
        Returns:
            The merged seeds `(batch, complement_tokens, dim)` and the seeds' positions in `tokens`
            `(batch, complement_tokens)`, ascending.
        """
        num_seeds = self.config.complement_tokens
        scale = logit_scale.float().exp().to(tokens.device)
        text_embeds = text_embeds.float().masked_fill(~text_mask.unsqueeze(-1), 0)
        similarity = scale * token_embeds.float() @ text_embeds.transpose(1, 2)
        relevance = similarity.sum(dim=-1) / text_mask.sum(dim=-1, keepdim=True)
        seed_positions = top_indices_in_order(relevance, num_seeds)

        is_seed = torch.zeros_like(relevance, dtype=torch.bool).scatter(1, seed_positions, True)
        query_positions = positions_where_false(is_seed, tokens.shape[1] - num_seeds)
        seeds = gather_tokens(tokens, seed_positions).float()
        queries = gather_tokens(tokens, query_positions).float()
        query_text = gather_tokens(similarity, query_positions)
        original_seeds = seeds
        for _ in range(self.config.merge_iterations):
            seed_embeds = F.normalize(visual_projection(seeds.to(tokens.dtype)).float(), dim=-1)
            affinity = query_text @ (scale * text_embeds @ seed_embeds.transpose(1, 2))
            assignment = F.one_hot(affinity.argmax(dim=-1), num_seeds).float()
            seeds = merge_step(seeds, original_seeds, assignment, queries, self.config.merge_update)
        return seeds.to(tokens.dtype), seed_positions


def merge_step(
    seeds: torch.Tensor, original_seeds: torch.Tensor, assignment: torch.Tensor, members: torch.Tensor, update: str
) -> torch.Tensor:
    """
    One TGVC merge update, "add" (each seed adds the mean of its members) or "mean" (each seed becomes the mean of
    its original self and its members).

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


def causal_attention_probabilities(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """
    What eager attention computes in a Llama-style block (RoPE, grouped key/value heads, causal, padding masked),
    averaged over heads, in float32; one head at a time, so memory stays `(batch, tokens, tokens)`.

    Args:
        attention: the block (q_proj, k_proj, head_dim, num_key_value_groups, scaling).
        hidden_states: `(batch, tokens, hidden)` its input (after the layer's input norm).
        position_embeddings: its RoPE `(cos, sin)`, each `(batch, tokens, head_dim)`.
        key_mask: `(batch, tokens)` bool, False for padding.
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
    allowed = (positions[None, :, None] >= positions[None, None, :]) & key_mask[:, None, :]
    allowed = allowed | torch.eye(tokens, dtype=torch.bool, device=hidden_states.device)
    probabilities = torch.zeros(batch, tokens, tokens, device=hidden_states.device, dtype=torch.float32)
    for head in range(query.shape[1]):
        scores = query[:, head].float() @ key[:, head].float().transpose(1, 2) * attention.scaling
        probabilities += torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probabilities / query.shape[1]


def image_ids(visual_mask: torch.Tensor) -> torch.Tensor:
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


def keep_per_image(scores: torch.Tensor, visual_mask: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """
    `(batch, tokens)` True for text and for the `tokens_per_image` best-scored visual tokens of each image (ties to
    the earlier token); an image with no more tokens keeps them all.
    """
    ids = image_ids(visual_mask)
    positions = torch.arange(scores.shape[1], device=scores.device)
    same_image = (ids[:, :, None] == ids[:, None, :]) & visual_mask[:, None, :]
    better = (scores[:, None, :] > scores[:, :, None]) | (
        (scores[:, None, :] == scores[:, :, None]) & (positions[None, None, :] < positions[None, :, None])
    )
    rank = (same_image & better).sum(dim=-1)
    return ~visual_mask | (rank < tokens_per_image)


def merge_into_kept(
    hidden_states: torch.Tensor, keep: torch.Tensor, visual_mask: torch.Tensor, iterations: int, update: str
) -> torch.Tensor:
    """
    Merges each dropped visual token into the kept visual token of its image it is most similar to
    (`h_q . h_k / sqrt(d)`, argmax), `iterations` times, with TGVC's update ("add": a kept token adds the mean of its
    dropped tokens each iteration; "mean": it becomes the mean of itself and them). Returns `(batch, tokens, hidden)`
    with only the kept visual tokens changed.
    """
    ids = image_ids(visual_mask)
    dropped, kept = visual_mask & ~keep, visual_mask & keep
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


def top_indices_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The `(batch, k)` indices of the `k` highest `scores` `(batch, n)`, ties to the lower index, sorted ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def positions_where_false(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The `(batch, count)` ascending positions where `mask` `(batch, n)` is False; every row has exactly `count`."""
    return torch.sort(mask.to(torch.uint8), dim=-1, stable=True).indices[:, :count]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tokens` `(batch, n, dim)` at `indices` `(batch, k)` -> `(batch, k, dim)`."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


__all__ = [
    "DominantVisionTokenSelection",
    "TextGuidedVisionComplement",
    "causal_attention_probabilities",
    "head_mean_attention",
    "keep_per_image",
    "llm_stage_scores",
    "local_token_affinity",
    "merge_into_kept",
    "pruned_order",
]
