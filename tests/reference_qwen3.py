"""
Slow reference of VisionTrim for Qwen3-VL, written from the last section of `ALGORITHM.md` (Qwen2-VL / Qwen2.5-VL,
applied to Qwen3-VL), the Qwen3-VL rule of the test brief (DeepStack, per-slice budgets, positions) and the stock
Transformers Qwen3-VL source only, one patch / unit / query / seed at a time, in float64. Nothing here is taken from
the package's vectorised code.

The stock `Qwen3VLVisionModel` is built fresh from `model.config.vision_config`, loaded with a copy of
`model.model.visual`'s weights and run in **float64** (sdpa), with forward hooks on the scored block: the block's
input, its `attn` input (checked to be exactly the block's `norm1` output), `cu_seqlens` and `position_embeddings`
(the vision RoPE cos/sin), the `attn` output and the block's output. q/k/v are recomputed in float64 from the `attn`
input with the block's `qkv` weights and the recorded RoPE (`apply_rotary_pos_emb_vision`'s formula, `q * cos +
rotate_half(q) * sin`); the recomputed attention output (probabilities @ v, then `proj`) is checked against the
recorded `attn` output, so q, k, RoPE and scaling are the stock ones. The main rows are the tower's `pooler_output`
(the main merger) and the DeepStack rows its `deepstack_features`, both from the same float64 run. (The stock tower
computes the RoPE cos/sin in float32 and applies it in float32 even in a float64 tower; everything else is float64.)
LTAM is `reference.slow_local_token_affinity` (3x3 window, out-of-grid slots add 0, mean over 9 slots, w1 = w2 = 1,
w3 = 0.5, unbiased variances), called on the unit grid with `width`.

Interpretations (where the rule or the spec is not explicit):
- Sequence layout: inside one item the tower's sequence is slice-major, then units in raster order over the
  `(h/2) x (w/2)` unit grid, then the 4 patches of a unit in raster order (block-major, as the stock
  `get_vision_position_ids` lays them out). This is checked on every run: the RoPE cos/sin the scored block receives
  must equal, exactly, the stock `rotary_pos_emb` of (row, col) positions built here by plain loops in that layout.
  So sequence patch `i` of a slice belongs to unit `i // 4`, and merged row `j` of the tower is unit `j` in raster
  order (the merger groups 4 consecutive rows).
- Each temporal slice must be exactly one segment of the scored block's `cu_seqlens` (checked); a video slice holds
  `temporal_patch_size` frames, so grid `t` counts slices.
- Received attention `a_p` is the mean over **all** the slice's queries, `p` itself included (no zeroed diagonal),
  of the head-mean softmax(q k^T * scaling) probabilities (`scaling` = the block's `attn.scaling`, head_dim ** -0.5).
- `g_raw_u` = sum of `a_p` over the unit's 4 patches, divided by its sum over the slice (it sums to 1 anyway).
- Unit features for LTAM: mean of the unit's 4 patches of the scored block's output (the residual stream, before any
  merger norm); `var(X_b)` = unbiased variance of all entries of the slice's `(N, C)` unit features; `var(P)` =
  unbiased variance of the 2N unit-grid coordinates (inside `slow_local_token_affinity`).
- "Local term = LTAM" includes the spec's `l = softmax(l)` after the 9-slot mean, and the fusion applies softmax a
  second time (`Lo = softmax(l)`), exactly as `ALGORITHM.md` (and `reference.slow_global_local_scores`,
  `reference_qwen.slow_dvts`) do. `G = softmax(g_raw)`. Variances in the fusion weights are unbiased (torch `.var()`).
- When `K_d = N` every unit is kept and when `K_d = 0` none is, without using `d` (for N = 1 the unbiased variances,
  hence `d`, are undefined); the DVTS margin is then `inf`.
- Ties: every top-k goes to the lower index (Python sort on `(-score, index)`); each argmax goes to the lower seed.
- TGVC: the remaining units in raster order; `v = normalize(row)` (identity projection, s = 1) of the main merger rows
  (float64 from the float64 tower); relevance `t_m = mean_l <T_l, v_m>`; seeds = top K_c of `t` sorted by raster
  order; queries = the other remaining units (original rows, never updated); `merge_iterations` times:
  `m[q, k] = sum_l <vq, T_l> <T_l, vs_k>` with `vs` the normalised *current* seed rows, argmax per query, then
  `S_k <- S_k + mean(rows of the queries assigned to k)` (seeds with none unchanged). The assignment of iteration i is
  computed from the seeds after iteration i - 1 and applied to all of them at once.
- When `K_c = M` (every remaining unit is a seed) there are no queries and the seeds are the unchanged rows. If
  `K_c > 0` and the item's guidance is empty, `ValueError` (the mean over text tokens is undefined), even when the
  result would not depend on it.
- Guidance `T`: the item's valid ids looked up in `model.model.language_model.embed_tokens.weight` (float64), each row
  L2-normalised (`F.normalize`, eps 1e-12). The same guidance serves every slice of a video.
- DeepStack: for each level (in `deepstack_visual_indexes` order) a DVTS token's row is `Y_l[unit]`; a TGVC seed
  starts at `Y_l[seed unit]` and at each iteration adds the mean of `Y_l` over the queries the main features assigned
  to it at that iteration. DeepStack rows never influence any choice.
- Output order per item: slices in order; per slice its DVTS units (raster), then its seeds (raster order of the
  seed units). `kept_units` are item-level units `slice * N + row * (w/2) + col`; a merged token's is its seed's.
- Margins (so a test can refuse near-ties an fp32 implementation could decide differently): `dvts_margin` is the
  smallest relative gap `(d_(K_d) - d_(K_d + 1)) / d_(K_d + 1)` of the sorted scores at any slice's K_d cut;
  `tgvc_margin` the smallest of the absolute relevance gaps at any K_c cut (`seed_margin`) and of the absolute gaps
  between a query's best and second-best seed affinity at any iteration (`assignment_margin`); `inf` when undefined.
- Positions (`slow_compressed_positions`): the stock `Qwen3VLModel.get_rope_index` (the stock function, called on a
  shim holding only the config and the stock `get_vision_position_ids`, so no override of a VisionTrim model can
  interfere) runs once on the uncompressed prompt. Then each row's valid tokens (attention_mask = 1) are walked in
  Python; media blocks are the maximal runs of equal non-zero `mm_token_type_ids` (as stock groups them); an image
  block is one image item, each video block one slice of the current video item (its `t` blocks in order). Text keeps
  its stock position; the kept tokens of a block, in output order, take the stock position of the block's token at
  their unit (unit % N for a video slice). Kept units of a video must come slice by slice (non-decreasing slice).
  Image / video grids are consumed in prompt order across the batch, as stock does. The result is left-padded to the
  longest compressed row with 0 at padding, `(3, batch, length)` long; the deltas are `(batch, 1)` long,
  `max position + 1 - valid compressed tokens` (max over the 3 rows and all the row's tokens, as stock).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLVisionModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from reference import slow_local_token_affinity


# The stock tower of each Qwen3-VL vision config (the MoE models share the dense tower's code).
STOCK_TOWERS = {"Qwen3VLVisionConfig": Qwen3VLVisionModel, "Qwen3VLMoeVisionConfig": Qwen3VLMoeVisionModel}


def round_half_up(value: float) -> int:
    """`floor(value + 0.5)`."""
    return math.floor(value + 0.5)


def budget(num_units: int, reduction_ratio: float, dominant_ratio: float) -> tuple[int, int]:
    """(K_d, K_c) for one image / temporal slice of `num_units` units."""
    kept = max(1, round_half_up(num_units * (1 - reduction_ratio)))
    dominant = round_half_up(kept * dominant_ratio)
    return dominant, kept - dominant


def stock_vision_tower(model, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A fresh stock `Qwen3VLVisionModel` holding a copy of `model.model.visual`'s weights, in `dtype`."""
    tower = STOCK_TOWERS[type(model.config.vision_config).__name__]._from_config(model.config.vision_config)
    result = tower.load_state_dict(model.model.visual.state_dict(), strict=False)
    if result.missing_keys:
        raise AssertionError(f"the model's vision tower lacks stock weights: {result.missing_keys}")
    return tower.to(dtype).eval()


@dataclass
class TowerRun:
    """
    One float64 stock tower run over a batch of items, in the tower's sequence order (which is the raster unit order,
    4 consecutive patches per unit, checked).

    `received`: (P,) received attention of each patch within its slice; `block_output`: (P, C) the scored block's
    output; `merged`: (U, D) the main merger rows; `deepstack`: per level (U, D) rows. U = P / 4.
    """

    grid_thw: list[tuple[int, int, int]]
    received: torch.Tensor
    block_output: torch.Tensor
    merged: torch.Tensor
    deepstack: list[torch.Tensor]


def block_major_positions(grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
    """(P, 2) (row, col) patch positions, built one patch at a time: slice, unit (raster), patch in the 2x2 unit."""
    positions = []
    for slices, height, width in grid_thw:
        for _ in range(slices):
            for unit_row in range(height // 2):
                for unit_col in range(width // 2):
                    for row_offset in range(2):
                        for col_offset in range(2):
                            positions.append((2 * unit_row + row_offset, 2 * unit_col + col_offset))
    return torch.tensor(positions, dtype=torch.long)


def slow_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One segment, one head and one query row at a time: queries / keys / values `(S, H, D)` float64 (RoPE applied) ->
    received attention `(S,)` (head-mean probabilities averaged over all S queries) and the attention output
    `(S, H, D)`.
    """
    length, heads, _ = queries.shape
    received = torch.zeros(length, dtype=torch.float64)
    output = torch.zeros_like(queries)
    for head in range(heads):
        for query in range(length):
            probabilities = torch.softmax((keys[:, head] @ queries[query, head]) * scaling, dim=0)
            received += probabilities
            output[query, head] = probabilities @ values[:, head]
    return received / (heads * length), output


@torch.no_grad()
def record_stock_tower(
    tower: Qwen3VLVisionModel, pixel_values: torch.Tensor, grid_thw: torch.Tensor, scored_block: int
) -> TowerRun:
    """Run the stock float64 `tower` on `pixel_values` / `grid_thw` and record its scored block."""
    dtype = next(tower.parameters()).dtype
    block = tower.blocks[scored_block]
    record: dict = {}

    def block_input(module, args, kwargs):
        record["block_input"] = args[0] if args else kwargs["hidden_states"]

    def attention_input(module, args, kwargs):
        record["input"] = args[0] if args else kwargs["hidden_states"]
        record["cu_seqlens"] = kwargs["cu_seqlens"]
        record["cos"], record["sin"] = kwargs["position_embeddings"]

    def attention_output(module, args, kwargs, output):
        record["attention_output"] = output

    def block_output(module, args, output):
        record["output"] = output

    handles = [
        block.register_forward_pre_hook(block_input, with_kwargs=True),
        block.attn.register_forward_pre_hook(attention_input, with_kwargs=True),
        block.attn.register_forward_hook(attention_output, with_kwargs=True),
        block.register_forward_hook(block_output),
    ]
    try:
        out = tower(pixel_values.to(dtype), grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()

    grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    num_patches = pixel_values.shape[0]
    # the attention input is the block's norm1 output
    torch.testing.assert_close(record["input"], block.norm1(record["block_input"]), rtol=0, atol=0)
    # the RoPE the block receives is the stock RoPE of the block-major positions built here
    cos, sin = tower.rotary_pos_emb(record["input"], block_major_positions(grids))
    torch.testing.assert_close(record["cos"], cos, rtol=0, atol=0)
    torch.testing.assert_close(record["sin"], sin, rtol=0, atol=0)

    # every temporal slice is exactly one attention segment
    bounds = [0]
    for slices, height, width in grids:
        for _ in range(slices):
            bounds.append(bounds[-1] + height * width)
    if record["cu_seqlens"].tolist() != bounds:
        raise AssertionError(f"scored block segments {record['cu_seqlens'].tolist()} are not the slices {bounds}")

    attention = block.attn
    heads = attention.num_heads
    weight, bias = attention.qkv.weight.double(), attention.qkv.bias.double()
    qkv = (record["input"].double() @ weight.T + bias).reshape(num_patches, 3, heads, -1)
    cos, sin = record["cos"].double()[:, None, :], record["sin"].double()[:, None, :]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    queries = qkv[:, 0] * cos + rotate_half(qkv[:, 0]) * sin
    keys = qkv[:, 1] * cos + rotate_half(qkv[:, 1]) * sin
    values = qkv[:, 2]

    received = torch.zeros(num_patches, dtype=torch.float64)
    attended = torch.zeros_like(values)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        received[start:end], attended[start:end] = slow_attention(
            queries[start:end], keys[start:end], values[start:end], attention.scaling
        )
    # the recomputed attention reproduces the stock attention output (q, k, RoPE and scaling are the stock ones;
    # the stock applies the RoPE in float32, hence the tolerance)
    projected = attended.reshape(num_patches, -1) @ attention.proj.weight.double().T + attention.proj.bias.double()
    torch.testing.assert_close(projected, record["attention_output"].double(), rtol=1e-4, atol=1e-5)

    return TowerRun(
        grid_thw=grids,
        received=received,
        block_output=record["output"].double(),
        merged=out.pooler_output.double(),
        deepstack=[level.double() for level in out.deepstack_features],
    )


def slow_dvts(
    received: torch.Tensor, unit_features: torch.Tensor, rows: int, cols: int, keep: int
) -> tuple[list[int], float]:
    """
    DVTS for one slice: patch received attention `(4N,)` (4 consecutive patches per unit) and unit features `(N, C)`
    on a `rows x cols` unit grid -> the `keep` units of highest `d` in raster order, and the relative gap of `d`
    between the last kept and the first dropped unit (inf when nothing or everything is kept).
    """
    num_units = rows * cols
    if keep >= num_units:
        return list(range(num_units)), math.inf
    if keep <= 0:
        return [], math.inf
    raw_global = torch.stack([received[4 * unit : 4 * unit + 4].sum() for unit in range(num_units)])
    raw_global = raw_global / raw_global.sum()
    global_scores = torch.softmax(raw_global, dim=0)
    local = torch.softmax(slow_local_token_affinity(unit_features, rows, width=cols), dim=0)  # the spec's l
    local_scores = torch.softmax(local, dim=0)  # Lo = softmax(l)
    global_variance, local_variance = global_scores.var(), local_scores.var()
    total = global_variance + local_variance
    scores = [float(v) for v in (local_variance / total) * global_scores + (global_variance / total) * local_scores]
    ranked = sorted(range(num_units), key=lambda unit: (-scores[unit], unit))
    margin = (scores[ranked[keep - 1]] - scores[ranked[keep]]) / scores[ranked[keep]]
    return sorted(ranked[:keep]), margin


def slow_tgvc(
    tokens: torch.Tensor, levels: list[torch.Tensor], text: torch.Tensor, num_seeds: int, iterations: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[int], float, float]:
    """
    TGVC for one slice with the identity projection and s = 1, one token, seed and text token at a time.

    `tokens` (M, D): the remaining main rows in raster order; `levels`: per DeepStack level its (M, D') rows of the
    same units; `text` (L, D): L2-normalised guidance. Returns the merged main seeds `(num_seeds, D)`, the merged
    seeds of every level, the seed positions in `tokens` (raster order), the relevance gap at the K_c cut and the
    smallest best-minus-second-best seed affinity over all queries and iterations (inf when undefined).
    """
    count = tokens.shape[0]
    if num_seeds <= 0:
        return tokens[:0], [level[:0] for level in levels], [], math.inf, math.inf
    if text.shape[0] == 0:
        raise ValueError("TGVC needs guidance text: the mean over text tokens of an empty question is undefined")
    embeds = [F.normalize(tokens[m], dim=0) for m in range(count)]
    relevance = []
    for m in range(count):
        relevance.append(sum(float(text[word] @ embeds[m]) for word in range(text.shape[0])) / text.shape[0])
    ranked = sorted(range(count), key=lambda m: (-relevance[m], m))
    seed_positions = sorted(ranked[:num_seeds])
    seed_margin = relevance[ranked[num_seeds - 1]] - relevance[ranked[num_seeds]] if num_seeds < count else math.inf
    query_positions = [m for m in range(count) if m not in seed_positions]
    seeds = [tokens[m].clone() for m in seed_positions]
    level_seeds = [[level[m].clone() for m in seed_positions] for level in levels]
    assignment_margin = math.inf
    for _ in range(iterations):
        if not query_positions:
            break
        seed_embeds = [F.normalize(seeds[k], dim=0) for k in range(num_seeds)]
        seed_text = [[float(text[word] @ seed_embeds[k]) for word in range(text.shape[0])] for k in range(num_seeds)]
        members: dict[int, list[int]] = {k: [] for k in range(num_seeds)}
        for q in query_positions:
            query_text = [float(text[word] @ embeds[q]) for word in range(text.shape[0])]
            affinity = [sum(a * b for a, b in zip(query_text, seed_text[k], strict=True)) for k in range(num_seeds)]
            best = 0
            for k in range(1, num_seeds):
                if affinity[k] > affinity[best]:  # strict: ties stay with the lower seed
                    best = k
            members[best].append(q)
            if num_seeds > 1:
                second = max(affinity[k] for k in range(num_seeds) if k != best)
                assignment_margin = min(assignment_margin, affinity[best] - second)
        for k in range(num_seeds):
            if members[k]:
                seeds[k] = seeds[k] + torch.stack([tokens[q] for q in members[k]]).mean(0)
                for level, rows in zip(levels, level_seeds, strict=True):
                    rows[k] = rows[k] + torch.stack([level[q] for q in members[k]]).mean(0)
    return (
        torch.stack(seeds),
        [torch.stack(rows) for rows in level_seeds],
        seed_positions,
        seed_margin,
        assignment_margin,
    )


@dataclass
class Qwen3Reference:
    """
    Reference output for a batch of items (images and / or videos, in `grid_thw` order).

    `kept_units[i]`: the item-level unit (`slice * N + row * (w/2) + col`) of each kept token, output order (per
    slice: DVTS units in raster order, then TGVC seed units in raster order); `features[i]`: (kept, llm_hidden)
    float64 main rows; `deepstack[l][i]`: (kept, llm_hidden) float64 rows of DeepStack level l; margins: see the
    module docstring (`tgvc_margin = min(seed_margin, assignment_margin)`); `num_dominant[i]`: per slice, how many of
    its kept tokens are DVTS tokens (the rest of the slice's tokens are TGVC seeds).
    """

    kept_units: list[list[int]]
    features: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]]
    dvts_margin: float
    tgvc_margin: float
    seed_margin: float = math.inf
    assignment_margin: float = math.inf
    num_dominant: list[list[int]] | None = None


def guidance_embeddings(model, guidance: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per item its valid question ids embedded by the LLM's `embed_tokens` (float64), each row L2-normalised."""
    table = model.model.language_model.embed_tokens.weight.detach().double()
    texts = []
    for ids in guidance:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"guidance must be 1-D token ids per item, got shape {tuple(ids.shape)}")
        texts.append(torch.stack([F.normalize(table[int(i)], dim=0) for i in ids]) if len(ids) else table[:0])
    return texts


@torch.no_grad()
def slow_visiontrim_qwen3(
    model,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    guidance: list[torch.Tensor],
    reduction_ratio: float,
    dominant_ratio: float = 0.75,
    merge_iterations: int = 3,
    scored_block: int | None = None,
) -> Qwen3Reference:
    """
    VisionTrim for Qwen3-VL on `pixel_values` (P, 3 * temporal_patch_size * patch_size ** 2) / `grid_thw`
    (items, 3) in patches, `guidance[i]` the 1-D valid question token ids of item i. Uses only the model's vision
    config, its vision weights (in a fresh float64 stock tower) and its LLM input embeddings.
    """
    vision_config = model.config.vision_config
    if vision_config.spatial_merge_size != 2:
        raise ValueError("this reference assumes 2x2 merge units")
    grid_thw = torch.as_tensor(grid_thw, dtype=torch.long)
    if len(guidance) != grid_thw.shape[0]:
        raise ValueError(f"{len(guidance)} guidance entries for {grid_thw.shape[0]} items")
    if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
        raise ValueError("pixel_values rows do not match grid_thw")
    if any(int(h) % 2 or int(w) % 2 for _, h, w in grid_thw.tolist()):
        raise ValueError("grid heights and widths must be even")
    depth = vision_config.depth
    scored_block = depth - 1 if scored_block is None else scored_block
    if not 0 <= scored_block < depth:
        raise ValueError(f"scored_block {scored_block} outside 0..{depth - 1}")

    tower = stock_vision_tower(model)
    run = record_stock_tower(tower, pixel_values, grid_thw, scored_block)
    texts = guidance_embeddings(model, guidance)

    levels = len(run.deepstack)
    result = Qwen3Reference([], [], [[] for _ in range(levels)], math.inf, math.inf, num_dominant=[])
    patch_offset = 0
    for (slices, height, width), text in zip(run.grid_thw, texts, strict=True):
        rows, cols = height // 2, width // 2
        num_units = rows * cols
        dominant_count, seed_count = budget(num_units, reduction_ratio, dominant_ratio)
        item_units, item_rows = [], []
        item_levels = [[] for _ in range(levels)]
        item_dominant = []
        for slice_index in range(slices):
            start = patch_offset + slice_index * height * width
            unit_start = start // 4
            received = run.received[start : start + height * width]
            features = run.block_output[start : start + height * width]
            unit_features = torch.stack([features[4 * unit : 4 * unit + 4].mean(0) for unit in range(num_units)])
            dominant, dvts_margin = slow_dvts(received, unit_features, rows, cols, dominant_count)
            result.dvts_margin = min(result.dvts_margin, dvts_margin)
            item_dominant.append(len(dominant))

            merged = run.merged[unit_start : unit_start + num_units]
            deep = [level[unit_start : unit_start + num_units] for level in run.deepstack]
            for unit in dominant:
                item_units.append(slice_index * num_units + unit)
                item_rows.append(merged[unit])
                for level, rows_of_level in zip(deep, item_levels, strict=True):
                    rows_of_level.append(level[unit])

            if seed_count:
                remaining = [unit for unit in range(num_units) if unit not in dominant]
                seeds, level_seeds, positions, seed_margin, assignment_margin = slow_tgvc(
                    torch.stack([merged[unit] for unit in remaining]),
                    [torch.stack([level[unit] for unit in remaining]) for level in deep],
                    text,
                    seed_count,
                    merge_iterations,
                )
                result.seed_margin = min(result.seed_margin, seed_margin)
                result.assignment_margin = min(result.assignment_margin, assignment_margin)
                for k, position in enumerate(positions):
                    item_units.append(slice_index * num_units + remaining[position])
                    item_rows.append(seeds[k])
                    for level_rows, rows_of_level in zip(level_seeds, item_levels, strict=True):
                        rows_of_level.append(level_rows[k])
        result.kept_units.append(item_units)
        result.features.append(torch.stack(item_rows))
        for level_index in range(levels):
            result.deepstack[level_index].append(torch.stack(item_levels[level_index]))
        result.num_dominant.append(item_dominant)
        patch_offset += slices * height * width
    result.tgvc_margin = min(result.seed_margin, result.assignment_margin)
    return result


class _StockRopeIndex:
    """Only what the stock `Qwen3VLModel.get_rope_index` reads: the config and the stock vision position ids."""

    get_vision_position_ids = Qwen3VLModel.get_vision_position_ids
    get_rope_index = Qwen3VLModel.get_rope_index

    def __init__(self, config):
        self.config = config


def stock_rope_index(model, stock_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock `Qwen3VLModel.get_rope_index` on the uncompressed prompt."""
    return _StockRopeIndex(model.config).get_rope_index(
        stock_inputs["input_ids"],
        mm_token_type_ids=stock_inputs["mm_token_type_ids"],
        image_grid_thw=stock_inputs.get("image_grid_thw"),
        video_grid_thw=stock_inputs.get("video_grid_thw"),
        attention_mask=stock_inputs.get("attention_mask"),
    )


def slow_compressed_positions(
    model, stock_inputs: dict, kept_units_per_row: list[list[list[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    M-RoPE positions `(3, batch, length)` (left-padded, 0 at padding) and rope deltas `(batch, 1)` of the compressed
    prompts. `stock_inputs`: the stock processor's output for the uncompressed prompts; `kept_units_per_row[b]`: per
    media item of row b in prompt order, its kept item-level units in output order (as `Qwen3Reference.kept_units`).
    """
    stock_positions, _ = stock_rope_index(model, stock_inputs)
    input_ids = stock_inputs["input_ids"]
    types = stock_inputs["mm_token_type_ids"]
    mask = stock_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    image_grid_thw, video_grid_thw = stock_inputs.get("image_grid_thw"), stock_inputs.get("video_grid_thw")
    image_grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    video_grids = iter(video_grid_thw.tolist() if video_grid_thw is not None else [])
    merge = model.config.vision_config.spatial_merge_size

    rows_out: list[list[list[int]]] = []
    for b in range(input_ids.shape[0]):
        valid = [i for i in range(input_ids.shape[1]) if int(mask[b, i])]
        row_types = [int(types[b, i]) for i in valid]
        items = kept_units_per_row[b]
        item_index = 0
        video = None  # [units per slice, slices, kept units, next slice]
        out: list[list[int]] = []

        def stock(position: int, b: int = b, valid: list[int] = valid) -> list[int]:
            return [int(stock_positions[axis, b, valid[position]]) for axis in range(3)]

        start = 0
        while start < len(valid):
            kind = row_types[start]
            end = start
            while end < len(valid) and row_types[end] == kind:
                end += 1
            length = end - start
            if kind == 0:
                for position in range(start, end):
                    out.append(stock(position))
            elif kind == 1:
                if video is not None:
                    raise ValueError(f"row {b}: an image block inside a video's slices")
                slices, height, width = next(image_grids)
                if length != slices * height * width // merge**2:
                    raise ValueError(f"row {b}: image block of {length} tokens for grid {(slices, height, width)}")
                kept = items[item_index]
                item_index += 1
                for unit in kept:
                    if not 0 <= unit < length:
                        raise ValueError(f"row {b}: unit {unit} outside the image's {length} units")
                    out.append(stock(start + unit))
            elif kind == 2:
                if video is None:
                    slices, height, width = next(video_grids)
                    kept = items[item_index]
                    item_index += 1
                    per_slice = height * width // merge**2
                    slice_of = [unit // per_slice for unit in kept]
                    if slice_of != sorted(slice_of) or any(not 0 <= s < slices for s in slice_of):
                        raise ValueError(f"row {b}: a video's kept units must come slice by slice")
                    video = [per_slice, slices, kept, 0]
                per_slice, slices, kept, slice_index = video
                if length != per_slice:
                    raise ValueError(f"row {b}: video slice block of {length} tokens, expected {per_slice}")
                for unit in kept:
                    if unit // per_slice == slice_index:
                        out.append(stock(start + unit % per_slice))
                video[3] += 1
                if video[3] == slices:
                    video = None
            else:
                raise ValueError(f"row {b}: unsupported mm_token_type {kind}")
            start = end
        if video is not None:
            raise ValueError(f"row {b}: a video ended after {video[3]} of its {video[1]} slices")
        if item_index != len(items):
            raise ValueError(f"row {b}: {len(items)} kept-unit lists for {item_index} media items")
        rows_out.append(out)

    for leftover in (image_grids, video_grids):
        if next(leftover, None) is not None:
            raise ValueError("more grids than media items in the prompts")

    length = max(len(out) for out in rows_out)
    positions = torch.zeros(3, len(rows_out), length, dtype=input_ids.dtype)
    deltas = []
    for b, out in enumerate(rows_out):
        for offset, triple in enumerate(out):
            for axis in range(3):
                positions[axis, b, length - len(out) + offset] = triple[axis]
        deltas.append(max(max(triple) for triple in out) + 1 - len(out))
    return positions, torch.tensor(deltas, dtype=input_ids.dtype).unsqueeze(1)
