"""Slow reference implementations of DVTS and TGVC, written from `ALGORITHM.md` one token at a time."""

import torch
import torch.nn.functional as F


def slow_local_token_affinity(features: torch.Tensor, grid_size: int, width: int | None = None) -> torch.Tensor:
    """
    LTAM for one crop `(N, C)` on a `grid_size x grid_size` grid (`grid_size x width` when `width` is given), one
    patch and one 3x3 window slot at a time.
    """
    height, width = grid_size, width or grid_size
    num_patches = height * width
    feature_variance = features.var()
    coordinates = [divmod(index, width) for index in range(num_patches)]
    position_variance = torch.tensor(
        [r for r, _ in coordinates] + [c for _, c in coordinates], dtype=torch.float64
    ).var()
    affinities = []
    for index in range(num_patches):
        row, col = coordinates[index]
        total = 0.0
        for row_offset in (-1, 0, 1):
            for col_offset in (-1, 0, 1):
                other_row, other_col = row + row_offset, col + col_offset
                if not (0 <= other_row < height and 0 <= other_col < width):
                    continue  # outside the grid: the slot adds 0
                other = other_row * width + other_col
                feature_distance = ((features[index] - features[other]) ** 2).sum() / (1.0 * feature_variance)
                position_distance = (row_offset**2 + col_offset**2) / (1.0 * position_variance)
                total += -feature_distance + 0.5 * -position_distance
        affinities.append(total / 9)
    return torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in affinities])


def slow_global_local_scores(features: torch.Tensor, attention: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Paper DVTS score for one crop: variance-weighted softmax(CLS attention) and softmax(softmax(LTAM))."""
    global_scores = torch.softmax(attention[0, 1:].double(), dim=0)
    local_scores = torch.softmax(torch.softmax(slow_local_token_affinity(features.double(), grid_size), dim=0), dim=0)
    global_variance, local_variance = global_scores.var(), local_scores.var()
    total = global_variance + local_variance
    return (local_variance / total) * global_scores + (global_variance / total) * local_scores


def slow_received_attention_scores(attention: torch.Tensor) -> torch.Tensor:
    """Released-code DVTS score for one crop, patch by patch."""
    num_patches = attention.shape[0] - 1
    global_scores = attention[0, 1:].double()
    received = []
    for patch in range(num_patches):
        total = sum(attention[1 + other, 1 + patch].double() for other in range(num_patches) if other != patch)
        received.append(total / (num_patches - 1))
    received = torch.stack(received)
    return 0.5 * global_scores / global_scores.norm() + 0.5 * received / received.norm()


def slow_tgvc(tokens, text, visual_projection, scale, num_seeds, iterations):
    """TGVC for one crop with valid text only, one query token at a time (additive update)."""
    embeds = F.normalize(visual_projection(tokens), dim=-1)
    relevance = torch.stack([(scale * embeds[m] @ text.T).mean() for m in range(tokens.shape[0])])
    seed_positions = sorted(torch.sort(relevance, descending=True, stable=True).indices[:num_seeds].tolist())
    query_positions = [m for m in range(tokens.shape[0]) if m not in seed_positions]
    seeds = tokens[seed_positions].clone()
    for _ in range(iterations):
        seed_embeds = F.normalize(visual_projection(seeds), dim=-1)
        members = {k: [] for k in range(num_seeds)}
        for q in query_positions:
            affinity = (scale * embeds[q] @ text.T) @ (scale * text @ seed_embeds.T)
            members[int(affinity.argmax())].append(tokens[q])
        seeds = torch.stack(
            [seeds[k] + torch.stack(members[k]).mean(0) if members[k] else seeds[k] for k in range(num_seeds)]
        )
    return seeds, seed_positions
