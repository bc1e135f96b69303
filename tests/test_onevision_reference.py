"""Sanity tests of the slow LLaVA-OneVision reference (tests/reference_onevision.py) against the stock model."""

import copy
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_onevision_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load("reference_onevision")

IMAGE_SIZE, PATCH = 112, 14
GRID = IMAGE_SIZE // PATCH  # 8 -> N = 64 per crop
POOLED = math.ceil(GRID / 2)  # 4 -> 16 units per frame
N, N_F = GRID * GRID, POOLED * POOLED
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]
# image sizes -> crops (base + grid): (100, 220) -> 3, (220, 220) -> 5, (90, 100) -> 2
SIZES = [[100, 220], [220, 220], [90, 100]]


def _build(attn_implementation="eager", num_layers=2):
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=200,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=198,
        video_token_index=199,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # sharper than the default 0.02 init, so attention maps and scores are far from uniform
    with torch.no_grad():
        for name, parameter in model.model.vision_tower.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, 1.5 / math.sqrt(fan_in) if "position" not in name else 1.0)
        for parameter in model.model.multi_modal_projector.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[1]))
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(scope="module")
def model64(model):
    """The same stock model in float64 with sdpa (stock eager computes its softmax in float32 even in float64)."""
    model64 = copy.deepcopy(model).double()
    model64.set_attn_implementation("sdpa")
    return model64


# Tolerances: the float64 stock model to 1e-6; the fp32 stock model to 2e-5 (fp32 rounding of O(1) activations
# through the tower and projector).
ATOL64, ATOL32 = 1e-6, 2e-5


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(3, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)  # padded to 3 crops
    return pixel_values, torch.tensor(SIZES), torch.tensor([1, 2])  # prompt 0: 1 image (3 crops); prompt 1: 2 images


@pytest.fixture(scope="module")
def videos():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)  # 2 videos x 3 frames


def _guidance(count, length=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 190, (length,), generator=generator) for _ in range(count)]


@torch.no_grad()
def _stock_crop_tokens(model, crop):
    outputs = model.model.vision_tower(crop[None], output_hidden_states=True)
    return model.model.multi_modal_projector(outputs.hidden_states[-1])[0]


CROPS = [3, 1, 1]  # with batch_num_images = [1, 2]


# --------------------------------------------------------------------------------------------------------------------
# 1. identity budgets equal stock


def _stock_images(model, pixel_values, image_sizes, batch_num_images):
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model.get_image_features(
            pixel_values=pixel_values.to(dtype), image_sizes=image_sizes, batch_num_images=batch_num_images
        ).pooler_output


def test_identity_budget_images_equal_stock(model, model64, images):
    pixel_values, image_sizes, batch_num_images = images
    media = ref.slow_onevision_images(
        model, pixel_values, image_sizes, batch_num_images, _guidance(3), reduction_ratio=1e-9, dominant_ratio=1.0
    )
    assert [len(m.items) for m in media] == CROPS
    for image, medium in enumerate(media):
        for crop, item in enumerate(medium.items):
            assert item.dominant == list(range(N)) and item.seeds == []
            assert item.tokens.dtype == torch.float64 and item.tokens.shape == (N, 48)
            crop_pixels = pixel_values[image, crop]
            expected64 = _stock_crop_tokens(model64, crop_pixels.double())
            torch.testing.assert_close(item.tokens, expected64, rtol=0, atol=ATOL64)
            expected32 = _stock_crop_tokens(model, crop_pixels).double()
            torch.testing.assert_close(item.tokens, expected32, rtol=0, atol=ATOL32)
        assert medium.tokens.shape == (CROPS[image] * (N + 1), 48)
    # single-crop images of a multi-image prompt: exactly stock's crop + newline
    for stock_model, atol in ((model64, ATOL64), (model, ATOL32)):
        stock = _stock_images(stock_model, pixel_values, image_sizes, batch_num_images)
        for image in (1, 2):
            torch.testing.assert_close(media[image].tokens, stock[image].double(), rtol=0, atol=atol)


def test_zero_ratio_images_is_stock_layout(model, model64, images):
    pixel_values, image_sizes, batch_num_images = images
    media = ref.slow_onevision_images(
        model, pixel_values, image_sizes, batch_num_images, _guidance(3), reduction_ratio=0.0, dominant_ratio=0.75
    )
    assert media[0].tokens.shape[0] != 3 * (N + 1)  # unpadded anyres layout with per-row newlines
    for stock_model, atol in ((model64, ATOL64), (model, ATOL32)):
        stock = _stock_images(stock_model, pixel_values, image_sizes, batch_num_images)
        for image in range(3):
            torch.testing.assert_close(media[image].tokens, stock[image].double(), rtol=0, atol=atol)


@pytest.mark.parametrize("ratio", [0.0, 1e-9])
def test_identity_budget_videos_equal_stock(model, model64, videos, ratio):
    media = ref.slow_onevision_videos(model, videos, _guidance(2), reduction_ratio=ratio, dominant_ratio=1.0)
    for medium in media:
        assert len(medium.items) == 3
        assert all(item.dominant == list(range(N_F)) and item.seeds == [] for item in medium.items)
    for stock_model, atol in ((model64, ATOL64), (model, ATOL32)):
        dtype = next(stock_model.parameters()).dtype
        with torch.no_grad():
            stock = stock_model.get_video_features(pixel_values_videos=videos.to(dtype)).pooler_output
        assert stock.shape == (2, 3 * N_F + 1, 48)
        for video, medium in enumerate(media):
            torch.testing.assert_close(medium.tokens, stock[video].double(), rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------------------------------
# 2. layout counts


def test_layout_counts(model, model64, images, videos):
    pixel_values, image_sizes, batch_num_images = images
    newline = model.model.image_newline.detach().double()
    kwargs = dict(reduction_ratio=0.5, dominant_ratio=0.75)  # K = 32 = 24 + 8 per crop; K_f = 8 = 6 + 2 per frame
    media = ref.slow_onevision_images(model, pixel_values, image_sizes, batch_num_images, _guidance(3), **kwargs)
    for image, medium in enumerate(media):
        assert len(medium.items) == CROPS[image]
        assert medium.tokens.shape == (CROPS[image] * 33, 48)
        for crop, item in enumerate(medium.items):
            assert len(item.dominant) == 24 and len(item.seeds) == 8
            assert item.dominant == sorted(item.dominant) and item.seeds == sorted(item.seeds)
            assert not set(item.dominant) & set(item.seeds)
            rows = medium.tokens[crop * 33 : (crop + 1) * 33]
            torch.testing.assert_close(rows[:32], item.tokens)
            torch.testing.assert_close(rows[32], newline)
            expected = _stock_crop_tokens(model64, pixel_values[image, crop].double())
            torch.testing.assert_close(item.tokens[:24], expected[item.dominant], rtol=0, atol=ATOL64)
    flat = ref.slow_onevision_images(
        model, pixel_values, image_sizes, batch_num_images, _guidance(3), crop_newline=False, **kwargs
    )
    assert [m.tokens.shape[0] for m in flat] == [3 * 32, 32, 32]
    # batch_num_images=None: every image is patched (stock backward-compatible rule)
    alone = ref.slow_onevision_images(
        model, pixel_values[:1], image_sizes[:1], None, _guidance(1), reduction_ratio=0.9, dominant_ratio=0.5
    )
    assert alone[0].tokens.shape[0] == 3 * (6 + 1)  # K = round(6.4) = 6
    # 4-D (already concatenated) pixel_values: same crops, same result
    flat_pixels = torch.cat([pixel_values[i, :c] for i, c in enumerate(CROPS)])
    again = ref.slow_onevision_images(model, flat_pixels, image_sizes, batch_num_images, _guidance(3), **kwargs)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(again, media, strict=True))
    with pytest.raises(ValueError, match="crops"):  # (220, 220) alone needs 5 crops, the padded tensor holds 3
        ref.slow_onevision_images(model, pixel_values[1:2], image_sizes[1:2], [1], _guidance(1), **kwargs)

    video_media = ref.slow_onevision_videos(model, videos, _guidance(2), **kwargs)
    for medium in video_media:
        assert medium.tokens.shape == (3 * 8 + 1, 48)
        assert all(len(item.dominant) == 6 and len(item.seeds) == 2 for item in medium.items)
        torch.testing.assert_close(medium.tokens[-1], newline)
    # K_f = max(1, round(16 * 0.03)) = 1 per frame
    tiny = ref.slow_onevision_videos(model, videos, _guidance(2), reduction_ratio=0.97, dominant_ratio=0.5)
    assert [m.tokens.shape[0] for m in tiny] == [3 + 1, 3 + 1]


# --------------------------------------------------------------------------------------------------------------------
# 3. TGVC


def test_tgvc_hand_case():
    """Two guidance-free dimensions, one guidance row e_x: everything follows from the x-coordinates."""
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    guidance = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    # relevance = normalised x: 1, 0, 0.707, -1 -> seeds {0, 2}; queries 1 (affinities 0, 0: tie -> seed 0) and
    # 3 (affinities -1, -0.707 -> seed 2)
    seeds, merged, margin = ref._tgvc(tokens, [0, 1, 2, 3], guidance, 2, 1, "add")
    assert seeds == [0, 2]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    assert margin == 0.0  # query 1's tie
    # second iteration: seed x-coordinates 0.707 and 0 -> query 1 ties again (seed 0), query 3 -> seed 2 (0 > -0.707)
    _, merged, _ = ref._tgvc(tokens, [0, 1, 2, 3], guidance, 2, 2, "add")
    torch.testing.assert_close(merged, torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=torch.float64))
    _, merged, _ = ref._tgvc(tokens, [0, 1, 2, 3], guidance, 2, 1, "mean")
    torch.testing.assert_close(merged, torch.tensor([[0.5, 0.5], [0.0, 0.5]], dtype=torch.float64))
    # query 1 removed: margins are the relevance gap 0.707 - (-1) ... and query 3's 0.293 gap
    _, _, margin = ref._tgvc(tokens, [0, 2, 3], guidance, 2, 1, "add")
    assert margin == pytest.approx(1 - 1 / math.sqrt(2))


def _vectorised_tgvc(tokens, text, num_seeds, iterations, update):
    normalized = F.normalize(tokens, dim=-1)
    relevance = (normalized @ text.T).mean(dim=1)
    seeds = torch.sort(torch.topk(relevance, num_seeds).indices).values
    mask = torch.ones(tokens.shape[0], dtype=torch.bool)
    mask[seeds] = False
    queries, query_normalized = tokens[mask], normalized[mask]
    original = tokens[seeds].clone()
    current = original.clone()
    for _ in range(iterations):
        affinity = (query_normalized @ text.T) @ (text @ F.normalize(current, dim=-1).T)
        assign = affinity.argmax(dim=1)
        one_hot = F.one_hot(assign, num_seeds).double()  # (Q, K)
        counts = one_hot.sum(0)
        sums = one_hot.T @ queries
        if update == "add":
            updated = current + sums / counts.clamp(min=1)[:, None]
        else:
            updated = (original + sums) / (1 + counts[:, None])
        current = torch.where(counts[:, None] > 0, updated, current)  # unassigned seeds unchanged
    return seeds.tolist(), current


@pytest.mark.parametrize("update,iterations", [("add", 1), ("add", 3), ("mean", 2)])
def test_tgvc_only_matches_vectorised(model, model64, images, update, iterations):
    pixel_values, image_sizes, batch_num_images = images
    guidance = _guidance(3, length=7, seed=11)
    media = ref.slow_onevision_images(
        model,
        pixel_values[1:],
        image_sizes[1:],
        torch.tensor([2]),
        guidance[1:],
        reduction_ratio=0.75,
        dominant_ratio=0.0,
        merge_iterations=iterations,
        merge_update=update,
    )
    embed = model64.get_input_embeddings()
    for image, medium in enumerate(media):
        (item,) = medium.items
        assert item.dominant == [] and len(item.seeds) == 16
        tokens = _stock_crop_tokens(model64, pixel_values[1 + image, 0].double())
        text = F.normalize(embed(guidance[1 + image]), dim=-1)
        seeds, merged = _vectorised_tgvc(tokens, text, 16, iterations, update)
        assert item.tgvc_margin > 1e-9
        assert item.seeds == seeds
        torch.testing.assert_close(item.tokens, merged, rtol=1e-9, atol=1e-9)


def test_empty_guidance(model, model64, images, videos):
    pixel_values, image_sizes, _ = images
    two = dict(pixel_values=pixel_values[1:], image_sizes=image_sizes[1:], batch_num_images=[2])
    empty = torch.zeros(0, dtype=torch.long)
    guidance = [empty, _guidance(1)[0]]  # first image without question
    with pytest.raises(ValueError, match="empty"):
        ref.slow_onevision_images(
            model, guidance_ids=guidance, empty_guidance="error", reduction_ratio=0.75, dominant_ratio=0.5, **two
        )
    with pytest.raises(ValueError, match="empty"):
        ref.slow_onevision_videos(
            model, videos, [empty, empty], empty_guidance="error", reduction_ratio=0.75, dominant_ratio=0.5
        )
    # K_c = 0: no guidance needed, no error
    ref.slow_onevision_images(
        model, guidance_ids=guidance, empty_guidance="error", reduction_ratio=0.75, dominant_ratio=1.0, **two
    )
    # cls_similarity: the single guidance row is normalize(mean of the item's N tokens)
    media = ref.slow_onevision_images(
        model, guidance_ids=guidance, reduction_ratio=0.75, dominant_ratio=0.0, merge_iterations=2, **two
    )
    tokens = _stock_crop_tokens(model64, pixel_values[1, 0].double())
    seeds, merged = _vectorised_tgvc(tokens, F.normalize(tokens.mean(0), dim=0)[None], 16, 2, "add")
    assert media[0].items[0].seeds == seeds
    torch.testing.assert_close(media[0].items[0].tokens, merged, rtol=1e-9, atol=1e-9)
    # video frames: the mean of the frame's pooled tokens
    (medium,) = ref.slow_onevision_videos(
        model, videos[:1], [empty], reduction_ratio=0.5, dominant_ratio=0.0, merge_iterations=2
    )
    with torch.no_grad():
        pooled = model64.model.apply_pooling(_stock_crop_tokens(model64, videos[0, 1].double())[None])[0]
    seeds, merged = _vectorised_tgvc(pooled, F.normalize(pooled.mean(0), dim=0)[None], 8, 2, "add")
    assert medium.items[1].seeds == seeds
    torch.testing.assert_close(medium.items[1].tokens, merged, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# DVTS against stock eager attentions and a vectorised LTAM


def _vectorised_ltam(features, grid):
    x = features.reshape(grid, grid, -1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    position_variance = torch.cat([rows.flatten(), cols.flatten()]).double().var()
    padded = F.pad(x.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)
    valid = F.pad(torch.ones(grid, grid), (1, 1, 1, 1))
    total = torch.zeros(grid, grid, dtype=torch.float64)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            other = padded[1 + dr : 1 + dr + grid, 1 + dc : 1 + dc + grid]
            inside = valid[1 + dr : 1 + dr + grid, 1 + dc : 1 + dc + grid]
            kappa = -((x - other) ** 2).sum(-1) / features.var() - 0.5 * (dr * dr + dc * dc) / position_variance
            total = total + kappa * inside
    return (total / 9).flatten()


def _vectorised_d(received, features, grid):
    global_scores = torch.softmax(received, 0)
    local_scores = torch.softmax(torch.softmax(_vectorised_ltam(features, grid), 0), 0)
    vg, vl = global_scores.var(), local_scores.var()
    return vl / (vg + vl) * global_scores + vg / (vg + vl) * local_scores


def test_dvts_matches_stock_attention(model, images, videos):
    pixel_values, image_sizes, batch_num_images = images
    media = ref.slow_onevision_images(
        model, pixel_values, image_sizes, batch_num_images, _guidance(3), reduction_ratio=0.75, dominant_ratio=1.0
    )
    compared = 0
    for image, medium in enumerate(media):
        for crop, item in enumerate(medium.items):
            with torch.no_grad():
                out = model.model.vision_tower(
                    pixel_values[image, crop][None], output_hidden_states=True, output_attentions=True
                )
            received = out.attentions[-1][0].mean(0).mean(0).double()
            d = _vectorised_d(received, out.hidden_states[-1][0].double(), GRID)
            if item.dvts_margin > 1e-4:
                assert item.dominant == sorted(torch.topk(d, 16).indices.tolist())
                compared += 1
    video_media = ref.slow_onevision_videos(model, videos, _guidance(2), reduction_ratio=0.5, dominant_ratio=1.0)
    for video, medium in enumerate(video_media):
        for frame, item in enumerate(medium.items):
            with torch.no_grad():
                out = model.model.vision_tower(
                    videos[video, frame][None], output_hidden_states=True, output_attentions=True
                )
                received = out.attentions[-1][0].mean(0).mean(0)[None, :, None]
                pooled = model.model.apply_pooling(received)[0, :, 0].double()
                features = model.model.apply_pooling(out.hidden_states[-1])[0].double()
            d = _vectorised_d(pooled / pooled.sum(), features, POOLED)
            if item.dvts_margin > 1e-4:
                assert item.dominant == sorted(torch.topk(d, 8).indices.tolist())
                compared += 1
    assert compared >= 8  # of 11 items (5 crops, 6 frames); the others sit too close to the cut


def test_slow_ltam_matches_vectorised():
    features = torch.randn(N, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(ref.slow_local_token_affinity(features, GRID), _vectorised_ltam(features, GRID))


# --------------------------------------------------------------------------------------------------------------------
# 4. the attention-recompute check


@pytest.mark.parametrize("attn_implementation,num_layers", [("sdpa", 3), ("eager", 2)])
def test_attention_recompute_check_runs(images, attn_implementation, num_layers):
    model = _build(attn_implementation, num_layers)
    pixel_values, image_sizes, _ = images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    media = ref.slow_onevision_images(
        model, pixel_values[1:], image_sizes[1:], [2], _guidance(2), reduction_ratio=0.5, dominant_ratio=0.5
    )
    assert len(media) == 2
    # the caller's model is untouched
    assert model.config._attn_implementation == attn_implementation
    assert model.model.vision_tower.config._attn_implementation == attn_implementation
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


def test_attention_recompute_check_fires(model, images, monkeypatch):
    """An attention whose input is not layer_norm1(x) (patched stock class) must trip the reference's assert."""
    from transformers.models.siglip import modeling_siglip

    pixel_values, image_sizes, _ = images
    stock_forward = modeling_siglip.SiglipAttention.forward

    def patched_forward(self, hidden_states, *args, **kwargs):
        return stock_forward(self, hidden_states * 1.5, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(modeling_siglip.SiglipAttention, "forward", patched_forward)
        with pytest.raises(AssertionError, match="recomputed attention output differs"):
            ref.slow_onevision_images(
                model, pixel_values[1:], image_sizes[1:], [2], _guidance(2), reduction_ratio=0.5, dominant_ratio=0.5
            )
    # scoring a non-last layer (vision_feature_layer=-2) uses that layer's map and still passes the check
    other = copy.deepcopy(model)
    other.config.vision_feature_layer = -2
    ref.slow_onevision_images(
        other, pixel_values[1:], image_sizes[1:], [2], _guidance(2), reduction_ratio=0.5, dominant_ratio=0.5
    )
