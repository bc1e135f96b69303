"""
Slow reference of the VisionTrim compression rule for LLaVA-OneVision (SigLIP crops and pooled video frames).

Written only from `ALGORITHM.md`, the OneVision rule text, and the stock Transformers sources of LLaVA-OneVision and
SigLIP. Everything is computed one item (crop / frame) at a time, one token / query / seed at a time, in float64.
The caller's model is never modified: the vision tower and projector are rebuilt in float64 from its weights.

Interpretations made (each one a place where the rule text left a choice):

1. Features. X = `hidden_states[vision_feature_layer]` of a float64 stock tower, run on one crop at a time (SigLIP
   has no cross-crop interaction, so this equals the stock batched call). The tower and projector are freshly built
   stock modules (`AutoModel.from_config(vision_config)`, `LlavaOnevisionMultiModalProjector(config)`) loaded with
   the caller's weights (every stock weight must be present), so patches or hooks of the caller's (sub)classes do
   not leak in; `apply_pooling` and `pack_image_features` are called as the stock `LlavaOnevisionModel` functions on
   `model.model` (they read only its config). Only an `int` `vision_feature_layer` and
   `vision_feature_select_strategy == "full"` are supported (SigLIP has no CLS row; anything else is a ValueError).
   The scored layer is encoder layer `vision_feature_layer % (L + 1) - 1`; a selection of the embeddings (index 0)
   has no attention and is a ValueError. It is checked that the scored layer's recorded output equals X.
2. Attention. The float64 tower is built with the "sdpa" attention implementation, because the stock eager
   function computes its softmax in float32 even for float64 inputs; sdpa is exact float64. The map is recomputed
   from the scored layer's recorded input: `layer_norm1`, then `q_proj` / `k_proj`, per head `softmax(q k^T * scale)`
   with the module's own `scale`, mean over heads. On every item, `(per-head probabilities @ v_proj) -> out_proj` is
   asserted equal to the layer's recorded self-attention output (hook on `self_attn`), so q, k and scale are stock.
3. Received attention `g_raw_i = (1/N) sum_q A[q, i]`; all variances are unbiased (torch `.var()`), including
   `var(P)` of the 2N grid coordinates (as tests/reference.py's `slow_local_token_affinity`, which is reused here;
   it loops over patches and window slots, skips out-of-grid slots and divides by 9).
4. Budgets: `round_half_up(x) = math.floor(x + 0.5)` on Python floats of `N * (1 - reduction_ratio)` and
   `K * dominant_ratio`. Crops use no `max(1, .)` (the rule gives none: K may be 0 and then the crop contributes
   only its newline); frames use `max(1, .)`.
5. Top-k with ties to the lower index = sort by `(-score, index)`; kept / seed indices then sorted ascending.
   The TGVC argmax scans seeds in raster order with a strict `>`, so ties go to the lower seed.
6. Normalisation `normalize(x) = x / max(||x||_2, 1e-12)` (F.normalize's epsilon). The guidance rows are the LLM
   input embeddings of the ids (`model.get_input_embeddings()` called on each id), normalised per row.
7. Empty guidance (`guidance_ids[i].numel() == 0`): only matters when K_c > 0. "error" -> ValueError;
   "cls_similarity" -> a single guidance row `normalize(mean of the item's N tokens)` (all N projected rows of the
   crop, or all pooled rows of the frame, not only the leftover ones), computed per item.
8. Merge "add": `S_k <- S_k + mean(Q assigned to k)` on the current seeds; "mean": `S_k <- (S_k^0 + sum(Q assigned
   to k)) / (1 + count)` with `S_k^0` the seed's value before the first iteration and the assignment of the current
   iteration (made with the current seeds). For both updates a seed with no query assigned in an iteration keeps its
   current value (for "mean" this is not `S_k^0` once it was assigned in an earlier iteration). Queries are never
   updated; affinities always use the current seeds.
9. Video frames: the frame's received-attention map `(N,)` and X `(N, C)` are pooled with the stock `apply_pooling`
   (called as `(1, N, 1)` / `(1, N, C)` tensors); the pooled attention is divided by its sum. The frame's tokens are
   `apply_pooling(P)`. Indices of a frame are on the pooled `ceil(g/2) x ceil(g/2)` grid.
10. Number of crops per image follows stock `get_image_features`: `batch_num_images is None` -> every image is
   patched; otherwise an image is patched iff its prompt has exactly one image; a patched image has
   `image_size_to_num_patches(image_size, image_grid_pinpoints, vision_config.image_size)` crops, the first ones
   of its row of the padded 5-D `pixel_values` (a 4-D, already concatenated `pixel_values` is accepted too).
11. Layout. Image: per crop its K tokens then `image_newline` when `crop_newline`. Video: frames' tokens in order,
   then one `image_newline`. Exception: `reduction_ratio == 0` switches compression off, so the image layout is
   the stock one (stock `pack_image_features` applied to the float64 per-crop projected features, with
   `config.vision_aspect_ratio`, default "anyres_max_9"); the items are still reported (all tokens kept). For
   videos the stock layout equals the rule's layout at K_f = N_f, so nothing special is needed.
12. Margins. `dvts_margin` = `(d_(K_d) - d_(K_d+1)) / d_(K_d+1)` of the descending scores (inf when K_d is 0 or N,
   or the denominator is 0). `tgvc_margin` = min of the relevance gap `t_(K_c) - t_(K_c+1)` (when 0 < K_c < M) and,
   for every iteration and every query, best minus second-best seed affinity (when K_c >= 2); inf if none defined.
   Both are per item (a single cut per item); take the min over items for a media-level margin.
13. DVTS fusion with `var(G) + var(Lo) == 0` (both uniform) uses weights 1/2, 1/2 (d is uniform either way).
14. Budgets that need no score (K_d = 0 or K_d = N) still compute it; K_c = 0 never looks at the guidance, so an
   empty question is only an error when K_c > 0.
"""

import copy
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
from transformers import AutoModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    image_size_to_num_patches,
)


def _load_reference():
    """Import tests/reference.py by path (works whatever the rootdir / sys.path setup of the caller)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.py")
    spec = importlib.util.spec_from_file_location("_visiontrim_llava_reference_for_onevision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slow_local_token_affinity = _load_reference().slow_local_token_affinity


@dataclass
class ItemReference:
    dominant: list[int]
    seeds: list[int]
    tokens: torch.Tensor
    dvts_margin: float
    tgvc_margin: float


@dataclass
class MediaReference:
    items: list[ItemReference]
    tokens: torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# small scalar helpers


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def crop_budget(num_tokens: int, reduction_ratio: float, dominant_ratio: float) -> tuple[int, int]:
    total = num_tokens if reduction_ratio == 0 else round_half_up(num_tokens * (1 - reduction_ratio))
    dominant = round_half_up(total * dominant_ratio)
    return dominant, total - dominant


def frame_budget(num_tokens: int, reduction_ratio: float, dominant_ratio: float) -> tuple[int, int]:
    total = max(1, round_half_up(num_tokens * (1 - reduction_ratio)))
    dominant = round_half_up(total * dominant_ratio)
    return dominant, total - dominant


def _normalize(vector: torch.Tensor) -> torch.Tensor:
    return vector / max(float(torch.sqrt((vector * vector).sum())), 1e-12)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def _softmax(values: torch.Tensor) -> torch.Tensor:
    """Softmax of a score vector, element by element (max-shifted)."""
    largest = max(float(v) for v in values)
    shifted = [math.exp(float(v) - largest) for v in values]
    total = sum(shifted)
    return torch.tensor([s / total for s in shifted], dtype=torch.float64)


def _top_indices(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, returned ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def _sorted_desc(scores: list[float]) -> list[float]:
    return sorted(scores, reverse=True)


# --------------------------------------------------------------------------------------------------------------------
# float64 copies of the stock vision modules


def _fresh_stock_copy(module: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Load `source`'s weights into the freshly built stock `module`; every stock parameter must be present."""
    state = {name: value.detach().clone() for name, value in source.state_dict().items()}
    missing, _unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"the caller's module lacks stock weights {missing}")
    return module.double().eval().cpu()


class _Vision64:
    """Float64 copies of the stock tower / projector / newline, plus the per-crop forward with the attention map."""

    def __init__(self, model):
        config = model.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("the reference supports an int vision_feature_layer only")
        if config.vision_feature_select_strategy != "full":
            raise ValueError("the reference supports vision_feature_select_strategy='full' only (SigLIP has no CLS)")
        self.config = config
        self.stock_model = model.model
        # fresh stock modules (not copies of the caller's, possibly patched, classes) with the caller's weights,
        # in float64; the caller's model is never touched
        self.tower = _fresh_stock_copy(
            AutoModel.from_config(copy.deepcopy(config.vision_config), attn_implementation="sdpa"),
            model.model.vision_tower,
        )
        self.projector = _fresh_stock_copy(
            LlavaOnevisionMultiModalProjector(config), model.model.multi_modal_projector
        )
        self.newline = model.model.image_newline.detach().clone().double().cpu()
        encoder = self.tower.encoder if hasattr(self.tower, "encoder") else self.tower.vision_model.encoder
        self.layers = encoder.layers
        num_layers = len(self.layers)
        self.feature_layer = layer
        self.scored_layer = layer % (num_layers + 1) - 1
        if self.scored_layer < 0:
            raise ValueError("vision_feature_layer selects the embeddings: there is no attention layer to score")
        self.grid = config.vision_config.image_size // config.vision_config.patch_size

    @torch.no_grad()
    def encode(self, crop: torch.Tensor):
        """
        One crop `(3, H, W)` -> (X (N, C), P (N, D), A (N, N) head-mean attention of the scored layer).
        """
        layer = self.layers[self.scored_layer]
        recorded = {}

        def layer_hook(module, args, kwargs, output):
            recorded["input"] = args[0] if args else kwargs["hidden_states"]
            recorded["output"] = output[0] if isinstance(output, tuple) else output

        def attention_hook(module, args, output):
            recorded["attention_output"] = output[0] if isinstance(output, tuple) else output

        handles = [
            layer.register_forward_hook(layer_hook, with_kwargs=True),
            layer.self_attn.register_forward_hook(attention_hook),
        ]
        try:
            outputs = self.tower(crop[None].detach().double().cpu(), output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        hidden_states = outputs.hidden_states
        assert len(hidden_states) == len(self.layers) + 1
        features = hidden_states[self.feature_layer][0]
        torch.testing.assert_close(features, recorded["output"][0], rtol=0, atol=0)
        attention = self.recompute_attention(layer, recorded["input"][0], recorded["attention_output"][0])
        projected = self.projector(features)
        return features, projected, attention

    @staticmethod
    def recompute_attention(layer, layer_input: torch.Tensor, recorded_output: torch.Tensor) -> torch.Tensor:
        """Head-mean softmax(q k^T * scale) of `layer` from its input, checked against its recorded output."""
        attention_module = layer.self_attn
        normed = layer.layer_norm1(layer_input)
        queries = attention_module.q_proj(normed)
        keys = attention_module.k_proj(normed)
        values = attention_module.v_proj(normed)
        num_heads = attention_module.num_heads
        head_dim = attention_module.head_dim
        scale = attention_module.scale
        head_maps, head_outputs = [], []
        for head in range(num_heads):
            columns = slice(head * head_dim, (head + 1) * head_dim)
            logits = (queries[:, columns] @ keys[:, columns].T) * scale
            probabilities = torch.softmax(logits, dim=-1)  # float64, one head's (N, N) map
            head_maps.append(probabilities)
            head_outputs.append(probabilities @ values[:, columns])
        recomputed_output = attention_module.out_proj(torch.cat(head_outputs, dim=-1))
        torch.testing.assert_close(
            recomputed_output,
            recorded_output,
            rtol=1e-9,
            atol=1e-9,
            msg=lambda m: f"recomputed attention output differs from the scored layer's: {m}",
        )
        return sum(head_maps) / num_heads

    def pool(self, rows: torch.Tensor) -> torch.Tensor:
        """Stock `apply_pooling` (the stock class's function, not an override) on `(N, C)` rows -> `(N_f, C)`."""
        return LlavaOnevisionModel.apply_pooling(self.stock_model, rows[None].contiguous())[0]

    def pack(self, crops: torch.Tensor, image_size) -> torch.Tensor:
        """Stock `pack_image_features` (the stock class's function) of one image's `(crops, N, D)` features."""
        packed, _ = LlavaOnevisionModel.pack_image_features(
            self.stock_model,
            [crops],
            torch.tensor([image_size]),
            image_newline=self.newline,
            vision_aspect_ratio=getattr(self.config, "vision_aspect_ratio", "anyres_max_9"),
        )
        return packed[0]


# --------------------------------------------------------------------------------------------------------------------
# DVTS and TGVC on one item


def _received_attention(attention: torch.Tensor) -> torch.Tensor:
    num_tokens = attention.shape[0]
    received = []
    for key in range(num_tokens):
        total = 0.0
        for query in range(num_tokens):
            total += float(attention[query, key])
        received.append(total / num_tokens)
    return torch.tensor(received, dtype=torch.float64)


def _dvts_scores(global_raw: torch.Tensor, features: torch.Tensor, grid: int) -> torch.Tensor:
    global_scores = _softmax(global_raw)
    local_scores = _softmax(_softmax(slow_local_token_affinity(features.double(), grid)))
    global_variance, local_variance = float(global_scores.var()), float(local_scores.var())
    total = global_variance + local_variance
    # both uniform (zero variances): the weights are undefined, and d is uniform whatever they are
    weights = [(local_variance / total), (global_variance / total)] if total > 0 else [0.5, 0.5]
    return torch.tensor(
        [weights[0] * float(g) + weights[1] * float(lo) for g, lo in zip(global_scores, local_scores, strict=True)],
        dtype=torch.float64,
    )


def _dvts(scores: torch.Tensor, num_dominant: int) -> tuple[list[int], float]:
    values = [float(s) for s in scores]
    kept = _top_indices(values, num_dominant)
    margin = math.inf
    if 0 < num_dominant < len(values):
        ordered = _sorted_desc(values)
        if ordered[num_dominant] != 0:
            margin = (ordered[num_dominant - 1] - ordered[num_dominant]) / ordered[num_dominant]
    return kept, margin


def _tgvc(tokens, remaining, guidance, num_seeds, iterations, update):
    """
    TGVC on one item. `tokens` (N, D) are the item's tokens, `remaining` the raster indices not kept by DVTS,
    `guidance` a list of normalised rows. Returns (seed raster indices, merged seeds (K_c, D), margin).
    """
    margin = math.inf
    if num_seeds == 0:
        return [], torch.zeros(0, tokens.shape[1], dtype=torch.float64), margin
    normalized = {m: _normalize(tokens[m]) for m in remaining}
    # <T_l, normalize(R_m)> for every remaining token and guidance row (plain floats, reused by the iterations)
    text_dots = {m: [_dot(row, normalized[m]) for row in guidance] for m in remaining}
    relevance = [sum(text_dots[m]) / len(guidance) for m in remaining]
    seed_local = _top_indices(relevance, num_seeds)
    if num_seeds < len(remaining):
        ordered = _sorted_desc(relevance)
        margin = min(margin, ordered[num_seeds - 1] - ordered[num_seeds])
    seed_positions = [remaining[i] for i in seed_local]
    seed_set = set(seed_positions)
    query_positions = [m for m in remaining if m not in seed_set]
    original = [tokens[p].clone() for p in seed_positions]
    seeds = [s.clone() for s in original]
    for _ in range(iterations):
        # <T_l, normalize(S_k)> with the current seeds
        seed_dots = [[_dot(row, _normalize(seed)) for row in guidance] for seed in seeds]
        members = [[] for _ in seeds]
        for q in query_positions:
            affinities = []
            for k in range(len(seeds)):
                affinities.append(sum(a * b for a, b in zip(text_dots[q], seed_dots[k], strict=True)))
            best = 0
            for k in range(1, len(affinities)):
                if affinities[k] > affinities[best]:
                    best = k
            if len(affinities) >= 2:
                ordered = _sorted_desc(affinities)
                margin = min(margin, ordered[0] - ordered[1])
            members[best].append(tokens[q])
        new_seeds = []
        for k in range(len(seeds)):
            if not members[k]:
                new_seeds.append(seeds[k])
                continue
            total = torch.zeros_like(seeds[k])
            for member in members[k]:
                total = total + member
            if update == "add":
                new_seeds.append(seeds[k] + total / len(members[k]))
            elif update == "mean":
                new_seeds.append((original[k] + total) / (1 + len(members[k])))
            else:
                raise ValueError(f"unknown merge_update {update!r}")
        seeds = new_seeds
    return seed_positions, torch.stack(seeds), margin


def _guidance_rows(model, ids: torch.Tensor) -> list[torch.Tensor]:
    embedding = model.get_input_embeddings()
    rows = []
    with torch.no_grad():
        for token in ids.reshape(-1).tolist():
            vector = embedding(torch.tensor([token], dtype=torch.long, device=embedding.weight.device))[0]
            rows.append(_normalize(vector.detach().double().cpu()))
    return rows


def _item(tokens, global_raw, features, grid, budget, guidance, merge_iterations, merge_update, empty_guidance):
    num_dominant, num_seeds = budget
    scores = _dvts_scores(global_raw, features, grid)
    dominant, dvts_margin = _dvts(scores, num_dominant)
    dominant_set = set(dominant)
    remaining = [m for m in range(tokens.shape[0]) if m not in dominant_set]
    if num_seeds > 0 and not guidance:
        if empty_guidance == "error":
            raise ValueError("empty guidance text with K_c > 0 and empty_guidance='error'")
        if empty_guidance != "cls_similarity":
            raise ValueError(f"unknown empty_guidance {empty_guidance!r}")
        mean = torch.zeros(tokens.shape[1], dtype=torch.float64)
        for m in range(tokens.shape[0]):
            mean = mean + tokens[m]
        guidance = [_normalize(mean / tokens.shape[0])]
    seeds, merged, tgvc_margin = _tgvc(tokens, remaining, guidance, num_seeds, merge_iterations, merge_update)
    kept_rows = [tokens[i] for i in dominant]
    kept = torch.stack(kept_rows) if kept_rows else torch.zeros(0, tokens.shape[1], dtype=torch.float64)
    return ItemReference(
        dominant=dominant,
        seeds=seeds,
        tokens=torch.cat([kept, merged], dim=0),
        dvts_margin=dvts_margin,
        tgvc_margin=tgvc_margin,
    )


def _check_options(merge_update, empty_guidance):
    if merge_update not in ("add", "mean"):
        raise ValueError(f"unknown merge_update {merge_update!r}")
    if empty_guidance not in ("error", "cls_similarity"):
        raise ValueError(f"unknown empty_guidance {empty_guidance!r}")


# --------------------------------------------------------------------------------------------------------------------
# public entry points


def slow_onevision_images(
    model,
    pixel_values,
    image_sizes,
    batch_num_images,
    guidance_ids: list[torch.Tensor],
    *,
    reduction_ratio,
    dominant_ratio,
    merge_iterations=3,
    merge_update="add",
    crop_newline=True,
    empty_guidance="cls_similarity",
) -> list[MediaReference]:
    _check_options(merge_update, empty_guidance)
    vision = _Vision64(model)
    config = model.config
    grid = vision.grid
    num_tokens = grid * grid
    budget = crop_budget(num_tokens, reduction_ratio, dominant_ratio)

    sizes = [list(map(int, s)) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
    if batch_num_images is None:
        patching = [True] * len(sizes)
    else:
        counts = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
        patching = [int(n) == 1 for n in counts for _ in range(int(n))]
    if len(patching) != len(sizes) or len(guidance_ids) != len(sizes):
        raise ValueError("image_sizes, batch_num_images and guidance_ids disagree on the number of images")
    crop_counts = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if patch else 1
        for size, patch in zip(sizes, patching, strict=True)
    ]
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(sizes) or pixel_values.shape[1] < max(crop_counts):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} cannot hold crops {crop_counts}")
        crops_per_image = [pixel_values[i, : crop_counts[i]] for i in range(len(sizes))]
    elif pixel_values.dim() == 4:
        starts = [sum(crop_counts[:i]) for i in range(len(sizes))]
        if pixel_values.shape[0] != sum(crop_counts):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} does not hold crops {crop_counts}")
        crops_per_image = [pixel_values[s : s + c] for s, c in zip(starts, crop_counts, strict=True)]
    else:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}")

    media = []
    for image_index, crops in enumerate(crops_per_image):
        guidance = _guidance_rows(model, guidance_ids[image_index])
        items, projected_crops, pieces = [], [], []
        for crop in crops:
            features, projected, attention = vision.encode(crop)
            global_raw = _received_attention(attention)
            item = _item(
                projected,
                global_raw,
                features,
                grid,
                budget,
                guidance,
                merge_iterations,
                merge_update,
                empty_guidance,
            )
            items.append(item)
            projected_crops.append(projected)
            pieces.append(item.tokens)
            if crop_newline:
                pieces.append(vision.newline[None])
        if reduction_ratio == 0:
            with torch.no_grad():
                tokens = vision.pack(torch.stack(projected_crops), sizes[image_index]).double()
        else:
            tokens = torch.cat(pieces, dim=0)
        media.append(MediaReference(items=items, tokens=tokens))
    return media


def slow_onevision_videos(
    model,
    pixel_values_videos,
    guidance_ids: list[torch.Tensor],
    *,
    reduction_ratio,
    dominant_ratio,
    merge_iterations=3,
    merge_update="add",
    empty_guidance="cls_similarity",
) -> list[MediaReference]:
    _check_options(merge_update, empty_guidance)
    vision = _Vision64(model)
    grid = vision.grid
    pooled_grid = math.ceil(grid / 2)
    budget = frame_budget(pooled_grid * pooled_grid, reduction_ratio, dominant_ratio)
    if len(guidance_ids) != pixel_values_videos.shape[0]:
        raise ValueError("one guidance_ids entry per video is needed")

    media = []
    for video_index, frames in enumerate(pixel_values_videos):
        guidance = _guidance_rows(model, guidance_ids[video_index])
        items, pieces = [], []
        for frame in frames:
            features, projected, attention = vision.encode(frame)
            received = _received_attention(attention)
            with torch.no_grad():
                pooled_received = vision.pool(received[:, None])[:, 0]
                pooled_features = vision.pool(features)
                pooled_tokens = vision.pool(projected)
            total = sum(float(v) for v in pooled_received)
            global_raw = torch.tensor([float(v) / total for v in pooled_received], dtype=torch.float64)
            item = _item(
                pooled_tokens,
                global_raw,
                pooled_features,
                pooled_grid,
                budget,
                guidance,
                merge_iterations,
                merge_update,
                empty_guidance,
            )
            items.append(item)
            pieces.append(item.tokens)
        pieces.append(vision.newline[None])
        media.append(MediaReference(items=items, tokens=torch.cat(pieces, dim=0)))
    return media
