"""
VisionTrim Qwen2-VL / Qwen2.5-VL against the slow reference of `reference_qwen.py` (stock tower, float64 loops).

The tiny models' scored block has its q/k scaled (`SHARPNESS`): at random init its attention is almost uniform, the
DVTS score `d` then spreads over ~1e-5 of its value (below fp32 resolution at the cut, so any fp32 implementation
may pick either of two units 1e-9 apart), and neither the softmax on the global term nor per-slice video attention
would change which units are kept. Sharpened, as in a trained tower, both do, and every decision is far from a tie.
"""

import numpy
import pytest
import torch
from PIL import Image
from reference_qwen import (
    guidance_embeddings,
    record_stock_tower,
    scored_block_index,
    slow_visiontrim_qwen,
    stock_vision_tower,
)

from visiontrim.tools.build_qwen import build_qwen_config, build_qwen_model, build_qwen_processor

from helpers import sharpen_scored_attention


ARCHITECTURES = ("qwen2.5-vl", "qwen2-vl")
RATIOS = (0.75, 0.5)
QUESTIONS = ("What animal is in the picture?", "Is there a cup of coffee on the table? Answer with one word.")
VIDEO_QUESTION = "What happens in the video?"
SHARPNESS = 300.0  # the scored block's attention logits are multiplied by this
# Smallest decision gaps a case must have for an fp32 implementation to decide as the float64 reference does.
MIN_DVTS_MARGIN = 1e-5  # relative gap of d at the K_d cut
MIN_TGVC_MARGIN = 1e-6  # absolute gap of relevance at the K_c cut and of each argmax


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """A (height, width) RGB noise image, numpy-seeded."""
    generator = numpy.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=numpy.uint8))


def chat_prompt(processor, question: str, media: str = "image") -> str:
    """One user turn holding one image / video and `question`, with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def build(arch: str, ratio: float, window_size: int | None = None):
    """
    A tiny seeded model (scored block sharpened by `SHARPNESS`) and its processor; `window_size` (px) overrides
    Qwen2.5-VL's vision window.
    """
    config = build_qwen_config(arch, reduction_ratio=ratio)
    if window_size is not None:
        config.vision_config.window_size = window_size
    assert (config.merge_update, config.merge_iterations) == ("add", 3)
    model = build_qwen_model(config)
    assert config.scored_block == scored_block_index(model.model.visual)
    sharpen_scored_attention(model, SHARPNESS)
    return model, build_qwen_processor(config)


def image_inputs(processor) -> dict:
    """Two noise images of different sizes (224x336 -> 16x24 patches, 140x112 -> 10x8) with different questions."""
    images = [random_image(224, 336, seed=1), random_image(140, 112, seed=2)]
    prompts = [chat_prompt(processor, question) for question in QUESTIONS]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def video_inputs(processor) -> dict:
    """Four 112x168 noise frames: two temporal slices of 8x12 patches."""
    frames = [random_image(112, 168, seed=10 + index) for index in range(4)]
    return processor(videos=[frames], text=[chat_prompt(processor, VIDEO_QUESTION, "video")], return_tensors="pt")


def large_video_inputs(processor) -> dict:
    """Four 504x448 noise frames: two temporal slices of 36x32 patches (a 4 MiB head-mean attention per slice)."""
    frames = [random_image(504, 448, seed=30 + index) for index in range(4)]
    return processor(videos=[frames], text=[chat_prompt(processor, VIDEO_QUESTION, "video")], return_tensors="pt")


def valid_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Per row, the unpadded ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]


def assert_matches_reference(model, features, pixel_values, grid_thw, guidance_ids, guidance_mask):
    """The library's encoder output equals the slow reference (same units, tokens within 1e-5); returns it."""
    run = record_stock_tower(stock_vision_tower(model), pixel_values, grid_thw)
    config = model.config
    reference = slow_visiontrim_qwen(
        run,
        guidance_embeddings(model, guidance_ids, guidance_mask),
        config.reduction_ratio,
        config.dominant_ratio,
        config.merge_iterations,
    )
    # the case itself must be decidable in fp32
    assert reference.dvts_margin > MIN_DVTS_MARGIN
    assert min(reference.seed_margin, reference.assignment_margin) > MIN_TGVC_MARGIN
    assert features.dominant_units.tolist() == reference.dominant_units
    assert features.complement_seed_units.tolist() == reference.seed_units
    assert len(features.pooler_output) == len(reference.tokens)
    for actual, expected in zip(features.pooler_output, reference.tokens, strict=True):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected.float(), rtol=0, atol=1e-5)
    return reference


def llm_input_embeddings(model, inputs: dict) -> torch.Tensor:
    """(B, L, D): the `inputs_embeds` the language model receives in `model(**inputs)`."""
    recorded = {}

    def record(module, args, kwargs):
        recorded["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return recorded["embeds"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_guidance_is_the_question_text_tokens(arch):
    _, processor = build(arch, 0.75)
    expected = [processor.tokenizer(question, add_special_tokens=False).input_ids for question in QUESTIONS]
    images = image_inputs(processor)
    assert valid_ids(images["guidance_input_ids"], images["guidance_attention_mask"]) == expected
    video = video_inputs(processor)
    assert valid_ids(video["video_guidance_input_ids"], video["video_guidance_attention_mask"]) == [
        processor.tokenizer(VIDEO_QUESTION, add_special_tokens=False).input_ids
    ]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_two_images_match_the_reference(arch, ratio):
    model, processor = build(arch, ratio)
    inputs = image_inputs(processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 24], [1, 10, 8]]
    args = (inputs["pixel_values"], inputs["image_grid_thw"])
    guidance = (inputs["guidance_input_ids"], inputs["guidance_attention_mask"])
    features = model.model.get_image_features(*args, *guidance)
    assert_matches_reference(model, features, *args, *guidance)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_video_of_two_slices_matches_the_reference(arch, ratio):
    model, processor = build(arch, ratio)
    inputs = video_inputs(processor)
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 12]]
    args = (inputs["pixel_values_videos"], inputs["video_grid_thw"])
    guidance = (inputs["video_guidance_input_ids"], inputs["video_guidance_attention_mask"])
    features = model.model.get_video_features(*args, *guidance)
    assert_matches_reference(model, features, *args, *guidance)


@pytest.mark.parametrize("media", ("image", "video"))
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_forward_feeds_the_reference_tokens_to_the_llm(arch, media):
    """`model(**inputs)` puts exactly the reference's tokens at the image / video placeholders, in order."""
    model, processor = build(arch, 0.75)
    if media == "image":
        inputs = image_inputs(processor)
        keys = ("pixel_values", "image_grid_thw", "guidance_input_ids", "guidance_attention_mask")
        get_features, token_id = model.model.get_image_features, model.config.image_token_id
    else:
        inputs = video_inputs(processor)
        keys = ("pixel_values_videos", "video_grid_thw", "video_guidance_input_ids", "video_guidance_attention_mask")
        get_features, token_id = model.model.get_video_features, model.config.video_token_id
    args = [inputs[key] for key in keys]
    reference = assert_matches_reference(model, get_features(*args), *args)
    placeholders = llm_input_embeddings(model, inputs)[inputs["input_ids"] == token_id]
    torch.testing.assert_close(placeholders, torch.cat(reference.tokens).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_large_video_matches_the_reference(arch):
    """1152 patches per slice, 2304 per video: large enough for any chunking of the attention map to show."""
    model, processor = build(arch, 0.75)
    inputs = large_video_inputs(processor)
    assert inputs["video_grid_thw"].tolist() == [[2, 36, 32]]
    args = (inputs["pixel_values_videos"], inputs["video_grid_thw"])
    guidance = (inputs["video_guidance_input_ids"], inputs["video_guidance_attention_mask"])
    features = model.model.get_video_features(*args, *guidance)
    assert_matches_reference(model, features, *args, *guidance)


@torch.no_grad()
def test_smaller_vision_window_matches_the_reference():
    """Qwen2.5-VL with 56 px windows (2x2 units per window): more reordering to undo before scoring."""
    model, processor = build("qwen2.5-vl", 0.75, window_size=56)
    assert model.model.visual.window_size == 56
    inputs = image_inputs(processor)
    args = (inputs["pixel_values"], inputs["image_grid_thw"])
    guidance = (inputs["guidance_input_ids"], inputs["guidance_attention_mask"])
    features = model.model.get_image_features(*args, *guidance)
    assert_matches_reference(model, features, *args, *guidance)
