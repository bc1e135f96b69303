"""
DVTS and TGVC on hand-built inputs with known answers, and against the slow loop implementations of `reference.py`
(one patch, one window slot, one query at a time, written from `ALGORITHM.md`).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontrim import VisionTrimLlavaConfig
from visiontrim.compression_visiontrim import (
    dominant_token_scores,
    head_mean_attention,
    local_token_affinity,
    select_dominant_tokens,
    text_guided_complement,
)

from reference import (
    slow_global_local_scores,
    slow_local_token_affinity,
    slow_received_attention_scores,
    slow_tgvc,
)


def random_attention(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, tokens, tokens, generator=generator) * 3, dim=-1)


def config_with(**settings) -> VisionTrimLlavaConfig:
    return VisionTrimLlavaConfig(**settings)


@pytest.mark.parametrize("grid_size", [3, 5, 24])
def test_ltam_window_matches_slow_loop_borders_included(grid_size):
    generator = torch.Generator().manual_seed(grid_size)
    features = torch.randn(2, grid_size * grid_size, 8, generator=generator) * torch.tensor([1.0, 3.0]).view(2, 1, 1)
    fast = local_token_affinity(features.view(2, grid_size, grid_size, 8)).flatten(1)
    for crop in range(2):
        torch.testing.assert_close(
            fast[crop].double(), slow_local_token_affinity(features[crop].double(), grid_size), rtol=1e-5, atol=1e-6
        )


def test_ltam_of_rectangular_grids_padded_to_one_shape_matches_slow_loop():
    """Grids of different sizes (Qwen's images) padded into one batch give each grid's own LTAM, 0 on padding."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(2, 7), (5, 3), (1, 1), (4, 4)]
    grid = torch.randn(len(sizes), 5, 7, 6, generator=generator)
    valid = torch.zeros(len(sizes), 5, 7, dtype=torch.bool)
    for index, (height, width) in enumerate(sizes):
        valid[index, :height, :width] = True
    grid = grid.masked_fill(~valid.unsqueeze(-1), 1e4)  # padding holds garbage: it must not count
    affinity = local_token_affinity(grid, valid)
    assert (affinity[~valid] == 0).all()
    for index, (height, width) in enumerate(sizes):
        features = grid[index, :height, :width].reshape(height * width, 6).double()
        if height * width == 1:
            assert affinity[index, 0, 0] == 0  # one token: every distance is 0
            continue
        torch.testing.assert_close(
            affinity[index, :height, :width].flatten().double(),
            slow_local_token_affinity(features, height, width),
            rtol=1e-5,
            atol=1e-6,
        )


def test_ltam_of_uniform_features_ranks_corners_then_edges_then_interior():
    affinity = local_token_affinity(torch.ones(1, 4, 4, 4)).flatten()
    corners, edges, interior = [0, 3, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14], [5, 6, 9, 10]
    # With equal features only the position term counts, and slots outside the grid add nothing.
    assert torch.allclose(affinity[corners], affinity[0]) and torch.allclose(affinity[interior], affinity[5])
    assert torch.allclose(affinity[edges], affinity[1])
    assert affinity[corners].min() > affinity[edges].max()
    assert affinity[edges].min() > affinity[interior].max()


def test_head_mean_attention_is_softmax_of_scaled_query_key_per_head():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    expected = torch.stack(
        [
            torch.softmax(query[:, :, h * 4 : h * 4 + 4] @ key[:, :, h * 4 : h * 4 + 4].transpose(1, 2) * 0.5, -1)
            for h in range(2)
        ]
    ).mean(0)
    torch.testing.assert_close(head_mean_attention(query, key, num_heads=2, scaling=0.5), expected)
    torch.testing.assert_close(head_mean_attention(query[:, :1], key, num_heads=2, scaling=0.5), expected[:, :1])


@pytest.mark.parametrize("score", ["global_local", "received_attention"])
def test_dvts_scores_and_selection_match_slow_reference(score):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 576, 16, generator=generator)
    attention = random_attention(2, 577, generator)
    scores = dominant_token_scores(features, attention, score)
    indices = select_dominant_tokens(features, attention, 48, score)
    assert indices.shape == (2, 48) and indices.dtype == torch.long
    for crop in range(2):
        if score == "global_local":
            expected = slow_global_local_scores(features[crop], attention[crop], 24)
        else:
            expected = slow_received_attention_scores(attention[crop])
        torch.testing.assert_close(scores[crop].double(), expected, rtol=1e-4, atol=1e-9)
        expected_indices = torch.sort(expected, descending=True, stable=True).indices[:48].sort().values
        assert torch.equal(indices[crop], expected_indices)
    assert torch.all(indices[:, 1:] > indices[:, :-1])  # raster order


def test_received_attention_keeps_the_most_attended_patches_in_raster_order():
    num_patches = 576
    attention = torch.full((1, num_patches + 1, num_patches + 1), 1e-4)
    for patch, weight in ((500, 0.9), (17, 0.8), (3, 0.7)):
        attention[0, :, 1 + patch] = weight  # every query, CLS included, attends to these three
    kept = select_dominant_tokens(torch.zeros(1, num_patches, 8), attention, 3, "received_attention")
    assert kept.tolist() == [[3, 17, 500]]


def test_received_attention_ignores_self_attention():
    attention = torch.full((1, 577, 577), 1e-3)
    attention[0, 1 + 42, 1 + 42] = 1.0  # patch 42 attends to itself only: the diagonal does not count
    attention[0, 1:, 1 + 7] = 0.5  # every patch attends to patch 7
    assert select_dominant_tokens(torch.zeros(1, 576, 8), attention, 1, "received_attention").tolist() == [[7]]


def test_global_local_with_uniform_features_keeps_corners_and_breaks_ties_by_cls_attention():
    # Equal features: LTAM favours the four corners (fewest window slots); among them the CLS attention decides.
    cls_attention = torch.full((577,), 1.0 / 577)
    cls_attention[1 + 575] = 0.02
    attention = cls_attention.view(1, 1, 577)
    features = torch.ones(1, 576, 8)
    assert select_dominant_tokens(features, attention, 4, "global_local").tolist() == [[0, 23, 552, 575]]
    assert select_dominant_tokens(features, attention, 1, "global_local").tolist() == [[575]]


def test_dvts_budget_follows_the_live_config():
    config = config_with(visual_tokens=64)
    features, attention = torch.randn(1, 576, 8), random_attention(1, 577, torch.Generator().manual_seed(0))
    kept = select_dominant_tokens(features, attention, config.dominant_tokens, config.dvts_score)
    config.reduction_ratio = 1 - 128 / 576
    more = select_dominant_tokens(features, attention, config.dominant_tokens, config.dvts_score)
    assert kept.shape == (1, 48) and more.shape == (1, 96)
    assert set(kept[0].tolist()) < set(more[0].tolist())  # the same ranking, cut later


def identity_projection(dim: int) -> nn.Linear:
    projection = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(dim))
    return projection


# Remaining tokens in raster order; text tokens e0 and e1. Relevance (mean over text) = (x0 + x1) / 2 of the unit
# vectors: r0 and r2 score 0.5 (the seeds), r3 and r4 0.3, r1 and r5 0. Query-to-seed affinity through the text is
# (q . e0) for seed r0 and (q . e1) for seed r2: r3 -> r0, r4 -> r2, and r1, r5 tie at 0 -> the first seed, r0.
HAND_TOKENS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.6, 0.0, 0.8, 0.0],
        [0.0, 0.6, 0.0, 0.8],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
HAND_TEXT = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3, -0.2, 0.5, 0.1]])


def run_hand_example(update: str, iterations: int, text_mask=(True, True, False)):
    config = config_with(visual_tokens=8, dominant_ratio=0.75, merge_iterations=iterations, merge_update=update)
    assert config.complement_tokens == 2
    tokens = HAND_TOKENS.unsqueeze(0)
    return text_guided_complement(
        tokens,
        F.normalize(tokens, dim=-1),
        F.normalize(HAND_TEXT, dim=-1).unsqueeze(0),
        torch.tensor([text_mask]),
        torch.tensor(0.0),  # s = exp(0) = 1
        identity_projection(4),
        config.complement_tokens,
        config.merge_iterations,
        config.merge_update,
    )


def test_tgvc_seeds_are_the_most_text_relevant_tokens_in_raster_order():
    seeds, positions = run_hand_example("add", iterations=0)
    assert positions.tolist() == [[0, 2]]
    torch.testing.assert_close(seeds[0], HAND_TOKENS[[0, 2]])


def test_tgvc_padding_text_tokens_are_excluded():
    # The third text token (masked out) would otherwise make r1 (e2) the most relevant token.
    unmasked_seeds, unmasked_positions = run_hand_example("add", iterations=0, text_mask=(True, True, True))
    assert unmasked_positions.tolist() != [[0, 2]]
    _, positions = run_hand_example("add", iterations=0)
    assert positions.tolist() == [[0, 2]]


def test_tgvc_additive_update_adds_the_mean_of_assigned_tokens_each_iteration():
    seeds, positions = run_hand_example("add", iterations=3)
    assert positions.tolist() == [[0, 2]]
    # r1, r3, r5 -> seed r0 and r4 -> seed r2, in every iteration (the seeds' directions keep that assignment).
    first_mean, second_mean = HAND_TOKENS[[1, 3, 5]].mean(0), HAND_TOKENS[4]
    torch.testing.assert_close(seeds[0, 0], HAND_TOKENS[0] + 3 * first_mean)
    torch.testing.assert_close(seeds[0, 1], HAND_TOKENS[2] + 3 * second_mean)
    one, _ = run_hand_example("add", iterations=1)
    torch.testing.assert_close(one[0], torch.stack([HAND_TOKENS[0] + first_mean, HAND_TOKENS[2] + second_mean]))


def test_tgvc_mean_update_averages_the_seed_with_its_tokens():
    seeds, _ = run_hand_example("mean", iterations=3)
    torch.testing.assert_close(seeds[0, 0], HAND_TOKENS[[0, 1, 3, 5]].mean(0))
    torch.testing.assert_close(seeds[0, 1], HAND_TOKENS[[2, 4]].mean(0))


def test_tgvc_matches_slow_reference_per_crop_with_padded_text():
    generator = torch.Generator().manual_seed(3)
    projection = nn.Linear(32, 16, bias=False)
    nn.init.normal_(projection.weight, generator=generator)
    tokens = torch.randn(2, 528, 32, generator=generator)
    text = F.normalize(torch.randn(2, 7, 16, generator=generator), dim=-1)
    text_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    logit_scale = torch.tensor(math.log(100.0))
    seeds, positions = text_guided_complement(
        tokens, F.normalize(projection(tokens), dim=-1), text, text_mask, logit_scale, projection, 16, 3, "add"
    )
    for crop in range(2):
        valid_text = text[crop][text_mask[crop]]
        expected_seeds, expected_positions = slow_tgvc(tokens[crop], valid_text, projection, 100.0, 16, 3)
        assert positions[crop].tolist() == expected_positions
        torch.testing.assert_close(seeds[crop], expected_seeds, rtol=1e-5, atol=1e-5)


def test_tgvc_breaks_ties_by_position_whatever_the_random_state_and_keeps_the_input_dtype():
    # Every token appears twice (positions m and m + 264): equal relevance and equal affinities everywhere, so only
    # the tie rules (lower position first, first seed on equal affinity) decide; no random state may.
    generator = torch.Generator().manual_seed(4)
    projection = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    half = torch.randn(1, 264, 32, generator=generator)
    tokens = torch.cat([half, half], dim=1).to(torch.bfloat16)
    text = F.normalize(torch.randn(1, 5, 16, generator=generator), dim=-1)
    arguments = (tokens, F.normalize(projection(tokens).float(), dim=-1), text, torch.ones(1, 5, dtype=torch.bool))
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        results.append(text_guided_complement(*arguments, torch.tensor(4.6), projection, 16, 3, "add"))
    (seeds, positions), (other_seeds, other_positions) = results
    assert seeds.dtype == torch.bfloat16 and seeds.shape == (1, 16, 32)
    relevance = (F.normalize(projection(half.to(torch.bfloat16)).float(), dim=-1) @ text.transpose(1, 2)).mean(-1)
    best = torch.sort(relevance[0], descending=True, stable=True).indices[:8]
    assert positions[0].tolist() == sorted(best.tolist() + (best + 264).tolist())
    assert torch.equal(seeds, other_seeds) and torch.equal(positions, other_positions)
