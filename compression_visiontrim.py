# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim's vision stage as plain functions, shared by every model class (see `ALGORITHM.md`).

`compress_crops` is the whole stage for a batch of crops (image crops or video frames): DVTS (dominant vision token
selection) keeps the K_d most important patch tokens of each crop; TGVC (text-guided vision complement) merges the
remaining tokens into K_c seeds chosen by their relevance to the question. Its inputs come from `run_vision_tower`
(the tower's outputs, with the one scored layer's queries and keys recorded) and the CLIP text tower.

Everything is batched over crops, free of Python loops over tokens or crops, deterministic (stable sorts, first-index
argmax, one-hot matmuls instead of scatter-adds) and computes scores in float32 whatever the model dtype.
"""

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging

from .configuration_visiontrim import VisionTrimSettings


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
            kappa = -feature_distance / (LTAM_W1 * feature_variance.view(batch, 1, 1)) - (
                LTAM_W3 * position_distance / (LTAM_W2 * position_variance)
            )
            affinity = affinity + torch.where(inside[:, rows, cols], kappa, 0.0)
    return affinity.view(batch, num_patches) / 9


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

    grid_size = round(features.shape[1] ** 0.5)
    global_scores = torch.softmax(cls_attention, dim=-1)
    local_scores = torch.softmax(torch.softmax(local_token_affinity(features, grid_size), dim=-1), dim=-1)
    global_variance = global_scores.var(dim=-1, keepdim=True)
    local_variance = local_scores.var(dim=-1, keepdim=True)
    total_variance = (global_variance + local_variance).clamp_min(torch.finfo(torch.float32).tiny)
    return (local_variance / total_variance) * global_scores + (global_variance / total_variance) * local_scores


def select_dominant_tokens(
    features: torch.Tensor, attention: torch.Tensor, num_tokens: int, score: str
) -> torch.LongTensor:
    """DVTS: the `(batch, num_tokens)` indices of the best-scored patches (`dominant_token_scores`), ascending."""
    return top_indices_in_order(dominant_token_scores(features, attention, score), num_tokens)


def text_guided_complement(
    tokens: torch.Tensor,
    token_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    visual_projection: nn.Module,
    num_seeds: int,
    merge_iterations: int,
    merge_update: str,
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
        merge_iterations, merge_update: how often, and how (`merge_step`), the other tokens are merged into the seeds.
    Returns:
        The merged seeds `(batch, num_seeds, dim)` and the seeds' positions in `tokens` `(batch, num_seeds)`,
        ascending.
    """
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
    for _ in range(merge_iterations):
        seed_embeds = F.normalize(visual_projection(seeds.to(tokens.dtype)).float(), dim=-1)
        affinity = query_text @ (scale * text_embeds @ seed_embeds.transpose(1, 2))
        assignment = F.one_hot(affinity.argmax(dim=-1), num_seeds).float()
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


def top_indices_in_order(scores: torch.Tensor, k: int) -> torch.LongTensor:
    """The `(batch, k)` indices of the `k` highest `scores` `(batch, n)`, ties to the lower index, sorted ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def positions_where_false(mask: torch.Tensor, count: int) -> torch.LongTensor:
    """The `(batch, count)` ascending positions where `mask` `(batch, n)` is False; every row has exactly `count`."""
    return torch.sort(mask.to(torch.uint8), dim=-1, stable=True).indices[:, :count]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tokens` `(batch, n, dim)` at `indices` `(batch, k)` -> `(batch, k, dim)`."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


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
    device = text_encoder.device
    input_ids = guidance_input_ids.to(device)
    text_mask = guidance_attention_mask.to(device).bool()
    has_text = text_mask.any(dim=-1)
    if empty_guidance == "error" and not bool(has_text.all()):
        empty = torch.nonzero(~has_text).flatten().tolist()
        raise ValueError(
            f"The guidance text of {unit}(s) {empty} is empty, so TGVC has no question to rank tokens by: pass "
            "a non-empty `guidance_text=` to the processor, or set `config.empty_guidance='cls_similarity'` to "
            f"guide those {unit}s by their own CLS token."
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

    def __init__(self, config: VisionTrimSettings):
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
    Guides the crops without guidance text (`config.empty_guidance == "cls_similarity"`) by their own CLS token:
    prepends a slot holding the crop's normalised `visual_projection(CLS)`, valid only for those crops.

    Args:
        text_embeds, text_mask: `(crops, text, projection_dim)` and `(crops, text)` from `encode_guidance`.
        class_tokens: `(crops, vision_hidden)` CLS tokens of the selected vision layer.
    """
    has_text = text_mask.any(dim=-1)
    if bool(has_text.all()):
        return text_embeds, text_mask
    logger.warning_once(
        "An image or video has no question (an image-only prompt): TGVC ranks its tokens by their similarity to its "
        "own CLS token (config.empty_guidance='cls_similarity'); set empty_guidance='error' to refuse such prompts."
    )
    class_embeds = F.normalize(visual_projection(class_tokens).float(), dim=-1).to(text_embeds.device)
    text_embeds = torch.cat([class_embeds.unsqueeze(1), text_embeds], dim=1)
    text_mask = torch.cat([~has_text.unsqueeze(-1), text_mask], dim=1)
    return text_embeds, text_mask


def compress_crops(
    run: VisionTowerRun,
    config: VisionTrimSettings,
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
    num_dominant = config.dominant_tokens
    if num_dominant > 0:
        rows = run.key.shape[1] if config.dvts_score == "received_attention" else 1  # the CLS row is enough
        attention = head_mean_attention(run.query[:, :rows], run.key, run.num_heads, run.scaling)
        dominant_indices = select_dominant_tokens(patches, attention, num_dominant, config.dvts_score)
    else:
        dominant_indices = torch.empty(num_crops, 0, dtype=torch.long, device=patches.device)
    dominant = gather_tokens(patches, dominant_indices)
    if not config.tgvc_enabled:
        return CompressedCrops(dominant, dominant_indices, dominant_indices[:, :0], crops_per_unit)

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
    text_embeds = text_embeds.repeat_interleave(repeats, dim=0).to(patches.device)
    text_mask = text_mask.repeat_interleave(repeats, dim=0).to(patches.device)
    text_embeds, text_mask = add_class_guidance(text_embeds, text_mask, class_tokens, visual_projection)

    is_dominant = torch.zeros(num_crops, num_patches, dtype=torch.bool, device=patches.device)
    is_dominant = is_dominant.scatter(1, dominant_indices, True)
    remaining_indices = positions_where_false(is_dominant, num_patches - num_dominant)
    remaining = gather_tokens(patches, remaining_indices)
    remaining_embeds = F.normalize(visual_projection(remaining).float(), dim=-1)
    merged, seed_positions = text_guided_complement(
        remaining,
        remaining_embeds,
        text_embeds,
        text_mask,
        logit_scale,
        visual_projection,
        config.complement_tokens,
        config.merge_iterations,
        config.merge_update,
    )
    return CompressedCrops(
        torch.cat([dominant, merged], dim=1),
        dominant_indices,
        remaining_indices.gather(1, seed_positions),
        crops_per_unit,
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
    "GuidanceEmbeddingCache",
    "VisionTowerRun",
    "anyres_image_tokens",
    "compress_crops",
    "dominant_token_scores",
    "encode_guidance",
    "head_mean_attention",
    "local_token_affinity",
    "merge_step",
    "run_vision_tower",
    "select_dominant_tokens",
    "text_guided_complement",
]
