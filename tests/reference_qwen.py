"""
Slow reference of VisionTrim for Qwen2-VL / Qwen2.5-VL, written from the last section of `ALGORITHM.md` and the stock
Transformers Qwen vision towers only, one patch / unit / query token at a time, in float64.

The stock tower is run on a fresh copy of the model's vision weights with forward hooks on the scored block: its
`attn` input (the block's own `norm1` output), `cu_seqlens` and `position_embeddings` (the vision RoPE cos/sin), and
the block's output. q/k are recomputed in float64 from that input with the block's `qkv` weights and the recorded RoPE.
LTAM is `reference.slow_local_token_affinity` (checked against the spec: 3x3 window, out-of-grid slots add 0, mean over
9 slots, w1 = w2 = 1, w3 = 0.5, unbiased variances), called on the unit grid with `width`.

Interpretations of the spec (last section of `ALGORITHM.md`):
- Received attention `a_p` is the mean over **all** queries of the slice, the query `p` itself included (the spec
  writes `mean_over_queries_q A_s[q, p]` and does not zero the diagonal, unlike the released-code LLaVA score).
- The tower's sequence order inside one `cu_seqlens` segment does not change `a_p`; Qwen2.5-VL's window order is
  undone by mapping each window-ordered position back through the stock `window_index` (unit-wise, the 4 patches of
  a 2x2 unit are consecutive in both orders). Raster patch `p` of a slice belongs to unit `p // 4` (the stock
  `get_vision_position_ids` lays patches out block-major over the 2x2 merge units, units in raster order).
- Unit features for LTAM are the mean of the unit's 4 patches of the scored block's output (the residual stream,
  before the merger's norm); `var(X_b)` is the unbiased variance of all entries of the slice's `(N, C)` unit features.
- Ties in every top-k go to the lower index (stable descending sort); `argmax` ties to the lower seed.
- `var(P)` is the unbiased variance of the 2N unit-grid coordinates (as torch `.var()`, like `var(X_b)`).
- The decision margins returned with the result say how far each discrete choice (top-K_d of `d`, top-K_c of
  relevance, each argmax) is from a tie, so a test can refuse inputs an fp32 implementation cannot decide.
- TGVC relevance and affinity use `v = normalize(R)` (the spec's `normalize(visual_projection(R))` with the identity),
  `s = 1`, text = L2-normalised LLM input embeddings of the valid (unpadded) guidance ids.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from reference import slow_local_token_affinity


STOCK_TOWERS = {
    "Qwen2_5_VLVisionConfig": Qwen2_5_VisionTransformerPretrainedModel,
    "Qwen2VLVisionConfig": Qwen2VisionTransformerPretrainedModel,
}


@dataclass
class TowerRun:
    """
    One stock tower run over a batch of items, everything in raster order (patches block-major in 2x2 units).

    `received`: (P,) float64, received attention of each patch within its `cu_seqlens` segment.
    `segments`: per segment of the scored block's `cu_seqlens`, the sorted raster patch indices it holds.
    `block_output`: (P, C) float64, the scored block's output.
    `merged`: (U, D) float32, the stock tower's merged output tokens (LLM-input vectors), U = P / 4.
    """

    grid_thw: list[tuple[int, int, int]]
    received: torch.Tensor
    segments: list[list[int]]
    block_output: torch.Tensor
    merged: torch.Tensor


def round_half_up(value: float) -> int:
    """`floor(value + 0.5)`."""
    return math.floor(value + 0.5)


def budget(num_units: int, reduction_ratio: float, dominant_ratio: float) -> tuple[int, int]:
    """(K_d, K_c) for one image / temporal slice of `num_units` units."""
    kept = max(1, round_half_up(num_units * (1 - reduction_ratio)))
    dominant = round_half_up(kept * dominant_ratio)
    return dominant, kept - dominant


def stock_vision_tower(model) -> torch.nn.Module:
    """A fresh stock Qwen vision tower of the model's class holding a copy of `model.model.visual`'s weights, fp32."""
    vision_config = model.config.vision_config
    tower = STOCK_TOWERS[type(vision_config).__name__]._from_config(vision_config).float()
    tower.load_state_dict(model.model.visual.state_dict())
    return tower.eval()


def scored_block_index(tower: torch.nn.Module) -> int:
    """Last full-attention block for Qwen2.5-VL (`fullatt_block_indexes[-1]`), the last block for Qwen2-VL."""
    if isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):
        return tower.fullatt_block_indexes[-1]
    return len(tower.blocks) - 1


def slow_received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """
    Received attention of one segment: queries / keys `(S, H, D)` float64 (RoPE applied) -> `(S,)`, the head-mean
    attention probabilities averaged over the S queries, one head and one query row at a time.
    """
    length, heads, _ = queries.shape
    total = torch.zeros(length, dtype=torch.float64)
    for head in range(heads):
        for query in range(length):
            logits = (keys[:, head] @ queries[query, head]) * scaling
            total += torch.softmax(logits, dim=0)
    return total / (heads * length)


def record_stock_tower(tower: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> TowerRun:
    """Run the stock `tower` on `pixel_values` (P, 1176) / `grid_thw` (items, 3) and record its scored block."""
    block = tower.blocks[scored_block_index(tower)]
    record: dict = {}

    def attention_inputs(module, args, kwargs):
        record["input"] = args[0] if args else kwargs["hidden_states"]
        record["cu_seqlens"] = kwargs["cu_seqlens"]
        record["cos"], record["sin"] = kwargs["position_embeddings"]

    def block_output(module, args, output):
        record["output"] = output

    handles = [
        block.attn.register_forward_pre_hook(attention_inputs, with_kwargs=True),
        block.register_forward_hook(block_output),
    ]
    try:
        merged = tower(pixel_values.float(), grid_thw=grid_thw).pooler_output
    finally:
        for handle in handles:
            handle.remove()

    num_patches = pixel_values.shape[0]
    if isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):
        window_index, _ = get_vision_window_index(
            grid_thw, tower.spatial_merge_size, tower.window_size, tower.patch_size
        )
        unit = tower.spatial_merge_unit
        # sequence position i*unit + j holds raster patch window_index[i]*unit + j
        raster_of_position = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
    else:
        raster_of_position = torch.arange(num_patches)
    order = torch.argsort(raster_of_position)  # raster patch -> sequence position

    # the recorded RoPE, back in raster order, must be the stock RoPE of the raster positions
    raster_cos, _ = tower.rotary_pos_emb(record["input"], get_vision_position_ids(grid_thw, tower.spatial_merge_size))
    torch.testing.assert_close(record["cos"][order], raster_cos, rtol=0, atol=0)

    attention = block.attn
    weight, bias = attention.qkv.weight.double(), attention.qkv.bias.double()
    qkv = (record["input"].double() @ weight.T + bias).reshape(num_patches, 3, attention.num_heads, -1)
    cos, sin = record["cos"].double()[:, None, :], record["sin"].double()[:, None, :]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    queries = qkv[:, 0] * cos + rotate_half(qkv[:, 0]) * sin
    keys = qkv[:, 1] * cos + rotate_half(qkv[:, 1]) * sin

    received = torch.zeros(num_patches, dtype=torch.float64)
    segments = []
    bounds = record["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        scores = slow_received_attention(queries[start:end], keys[start:end], attention.scaling)
        received[raster_of_position[start:end]] = scores
        segments.append(sorted(raster_of_position[start:end].tolist()))
    return TowerRun(
        grid_thw=[tuple(row) for row in grid_thw.tolist()],
        received=received,
        segments=segments,
        block_output=record["output"].double()[order],
        merged=merged.detach(),
    )


def slow_dvts(
    received: torch.Tensor, unit_features: torch.Tensor, rows: int, cols: int, keep: int
) -> tuple[list[int], float]:
    """
    DVTS for one slice: patch received attention `(4N,)` (4 consecutive patches per unit) and unit features `(N, C)`
    on a `rows x cols` unit grid -> the `keep` units of highest `d`, in raster order, and the relative gap of `d`
    between the last kept and the first dropped unit (inf when nothing or everything is kept).
    """
    num_units = rows * cols
    raw_global = torch.stack([received[4 * unit : 4 * unit + 4].sum() for unit in range(num_units)])
    raw_global = raw_global / raw_global.sum()
    global_scores = torch.softmax(raw_global, dim=0)
    local = torch.softmax(slow_local_token_affinity(unit_features, rows, width=cols), dim=0)
    local_scores = torch.softmax(local, dim=0)
    global_variance, local_variance = global_scores.var(), local_scores.var()
    total = global_variance + local_variance
    scores = (local_variance / total) * global_scores + (global_variance / total) * local_scores
    ranked = torch.sort(scores, descending=True, stable=True)
    margin = math.inf
    if 0 < keep < num_units:
        margin = float((ranked.values[keep - 1] - ranked.values[keep]) / ranked.values[keep])
    return sorted(ranked.indices[:keep].tolist()), margin


def slow_tgvc(
    tokens: torch.Tensor, text: torch.Tensor, num_seeds: int, iterations: int
) -> tuple[torch.Tensor, list[int], float, float]:
    """
    TGVC for one slice with the identity projection and s = 1, one token and one seed at a time: `tokens` (M, D)
    remaining merger outputs in raster order, `text` (L, D) L2-normalised guidance. Returns the merged seeds
    `(num_seeds, D)`, their positions in `tokens` (raster order), the relevance gap between the last seed and the
    first non-seed, and the smallest gap between a query's best and second-best seed affinity (inf when undefined).
    """
    count = tokens.shape[0]
    embeds = [F.normalize(tokens[m], dim=0) for m in range(count)]
    relevance = torch.stack([torch.stack([token @ embeds[m] for token in text]).mean() for m in range(count)])
    ranked = torch.sort(relevance, descending=True, stable=True)
    seed_positions = sorted(ranked.indices[:num_seeds].tolist())
    seed_margin = float(ranked.values[num_seeds - 1] - ranked.values[num_seeds]) if 0 < num_seeds < count else math.inf
    query_positions = [m for m in range(count) if m not in seed_positions]
    seeds = tokens[seed_positions].clone()
    assignment_margin = math.inf
    for _ in range(iterations):
        seed_embeds = [F.normalize(seeds[k], dim=0) for k in range(num_seeds)]
        members: dict[int, list[torch.Tensor]] = {k: [] for k in range(num_seeds)}
        for q in query_positions:
            query_text = text @ embeds[q]  # (L,): s <v_q, T_l>
            affinity = torch.stack([query_text @ (text @ seed_embeds[k]) for k in range(num_seeds)])
            best = max(range(num_seeds), key=lambda k: (float(affinity[k]), -k))  # ties to the lower seed
            members[best].append(tokens[q])
            if num_seeds > 1:
                second = max(float(affinity[k]) for k in range(num_seeds) if k != best)
                assignment_margin = min(assignment_margin, float(affinity[best]) - second)
        seeds = torch.stack(
            [seeds[k] + torch.stack(members[k]).mean(0) if members[k] else seeds[k] for k in range(num_seeds)]
        )
    return seeds, seed_positions, seed_margin, assignment_margin


@dataclass
class QwenReference:
    """
    Reference output for a batch of items. `tokens[i]`: (K_total_i, D) float64, per slice its DVTS tokens then its
    merged TGVC seeds; `dominant_units` / `seed_units`: all items concatenated (slice s: s * N + unit); the margins
    are the smallest decision gaps over all slices (see `slow_dvts` and `slow_tgvc`).
    """

    tokens: list[torch.Tensor]
    dominant_units: list[int]
    seed_units: list[int]
    dvts_margin: float
    seed_margin: float
    assignment_margin: float


def slow_visiontrim_qwen(
    run: TowerRun,
    guidance: list[torch.Tensor],
    reduction_ratio: float,
    dominant_ratio: float,
    merge_iterations: int,
) -> QwenReference:
    """VisionTrim on a recorded tower run; `guidance[i]` (L_i, D) is item i's text (L2-normalised LLM embeddings)."""
    result = QwenReference([], [], [], math.inf, math.inf, math.inf)
    patch_offset = 0
    for (slices, height, width), text in zip(run.grid_thw, guidance, strict=True):
        rows, cols = height // 2, width // 2
        num_units = rows * cols
        dominant_count, seed_count = budget(num_units, reduction_ratio, dominant_ratio)
        item_tokens = []
        for slice_index in range(slices):
            start = patch_offset + slice_index * height * width
            if list(range(start, start + height * width)) not in run.segments:
                raise AssertionError(f"slice {slice_index} is not exactly one attention segment of the scored block")
            received = run.received[start : start + height * width]
            features = run.block_output[start : start + height * width]
            unit_features = torch.stack([features[4 * unit : 4 * unit + 4].mean(0) for unit in range(num_units)])
            dominant, dvts_margin = slow_dvts(received, unit_features, rows, cols, dominant_count)
            merged = run.merged[start // 4 : start // 4 + num_units].double()
            remaining = [unit for unit in range(num_units) if unit not in dominant]
            parts = [merged[dominant]]
            result.dominant_units += [slice_index * num_units + unit for unit in dominant]
            result.dvts_margin = min(result.dvts_margin, dvts_margin)
            if seed_count:
                seeds, positions, seed_margin, assignment_margin = slow_tgvc(
                    merged[remaining], text, seed_count, merge_iterations
                )
                parts.append(seeds)
                result.seed_units += [slice_index * num_units + remaining[position] for position in positions]
                result.seed_margin = min(result.seed_margin, seed_margin)
                result.assignment_margin = min(result.assignment_margin, assignment_margin)
            item_tokens.append(torch.cat(parts))
        result.tokens.append(torch.cat(item_tokens))
        patch_offset += slices * height * width
    return result


def guidance_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row of `input_ids` (B, L): its valid ids embedded by `model.get_input_embeddings()`, L2-normalised (f64)."""
    table = model.get_input_embeddings().weight.detach().double()
    return [F.normalize(table[ids[mask.bool()]], dim=-1) for ids, mask in zip(input_ids, attention_mask, strict=True)]
