"""
VisionTrim for LLaVA-NeXT (anyres), loaded from a saved folder with `trust_remote_code=True`: crop counts from the
image size for every pinpoint grid, per-crop compression equal to the LLaVA-1.5 path on each crop, the layout,
batching, parity with stock LLaVA-NeXT when compression is off, pipeline, and the pinpoint and budget checks.
"""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline
from transformers.image_processing_utils import select_best_resolution

from visiontrim import VisionTrimLlavaConfig, VisionTrimLlavaForConditionalGeneration
from visiontrim.tools.build import LLAVA_NEXT_PINPOINTS, stock_llava_with_same_weights, stock_processor

from helpers import OTHER_PROMPT, QUESTION_PROMPT, load_remote, save_checkpoint


# (height, width): every pinpoint grid, a tiny image, very elongated ones and a large one.
IMAGE_SIZES = [
    (300, 600),
    (600, 300),
    (600, 600),
    (200, 1000),
    (1000, 200),
    (20, 30),
    (90, 700),
    (700, 60),
    (336, 336),
]


def grid_of(height: int, width: int) -> tuple[int, int]:
    best_height, best_width = select_best_resolution([height, width], LLAVA_NEXT_PINPOINTS)
    return best_height // 336, best_width // 336


def image_output(model, inputs):
    return model.model.get_image_features(
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
        guidance_input_ids=inputs.get("guidance_input_ids"),
        guidance_attention_mask=inputs.get("guidance_attention_mask"),
    )


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("next"), arch="llava-next")


@pytest.fixture(scope="module")
def next_remote(next_checkpoint):
    return load_remote(next_checkpoint)


def test_the_sizes_cover_every_pinpoint_grid():
    assert {grid_of(*size) for size in IMAGE_SIZES} == {(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)}


@pytest.mark.parametrize("crop_newline", [True, False])
def test_processor_and_model_count_the_same_tokens_for_every_grid(next_checkpoint, crop_newline):
    model, processor = load_remote(next_checkpoint, crop_newline=crop_newline)
    for height, width in IMAGE_SIZES:
        rows, cols = grid_of(height, width)
        crops = rows * cols + 1
        inputs = processor(images=Image.new("RGB", (width, height), "gray"), text=QUESTION_PROMPT, return_tensors="pt")
        expected = crops * (64 + int(crop_newline))
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected, (height, width)
        assert processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens == [expected]
        output = image_output(model, inputs)
        assert output.pooler_output[0].shape[0] == expected
        assert output.dominant_indices.shape == (crops, 48)
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize(("tokens", "total"), [(128, 640), (64, 320), (32, 160)])
def test_published_budgets_for_a_five_crop_image(next_checkpoint, tokens, total):
    model, processor = load_remote(next_checkpoint, visual_tokens=tokens, crop_newline=False)
    image = Image.new("RGB", (600, 600), "gray")  # 2x2 grid + base view = 5 crops, 2880 patch tokens
    inputs = processor(images=image, text=QUESTION_PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == total
    assert image_output(model, inputs).pooler_output[0].shape[0] == total
    stock_inputs = stock_processor(processor)(images=image, text=QUESTION_PROMPT)
    # Stock: 576 base tokens + the 48x48 grid (square image: nothing unpadded) + one newline per row.
    assert stock_inputs["input_ids"][0].count(model.config.image_token_id) == 576 + 48 * 48 + 48


def test_each_crop_is_compressed_like_an_image_of_the_llava_path(next_remote, photos):
    model, processor = next_remote
    config = model.config
    llava_config = VisionTrimLlavaConfig(
        vision_config=config.vision_config,
        text_config=config.text_config,
        guidance_config=config.guidance_config,
        projection_dim=config.projection_dim,
        image_token_index=config.image_token_index,
        reduction_ratio=config.reduction_ratio,
    )
    llava = VisionTrimLlavaForConditionalGeneration(llava_config).eval()
    report = llava.load_state_dict(model.state_dict(), strict=False)
    assert report.missing_keys == [] and report.unexpected_keys == ["model.image_newline"]

    inputs = processor(images=photos[1], text=OTHER_PROMPT, return_tensors="pt")
    output = image_output(model, inputs)
    crops = output.dominant_indices.shape[0]
    assert crops == inputs["pixel_values"].shape[1] > 1
    tokens = output.pooler_output[0].view(crops, 65, -1)
    for crop in range(crops):  # base view first, then the high-res crops in raster order
        alone = llava.model.get_image_features(
            inputs["pixel_values"][0, crop : crop + 1],
            guidance_input_ids=inputs["guidance_input_ids"],
            guidance_attention_mask=inputs["guidance_attention_mask"],
        )
        assert torch.equal(output.dominant_indices[crop], alone.dominant_indices[0])
        assert torch.equal(output.complement_seed_indices[crop], alone.complement_seed_indices[0])
        torch.testing.assert_close(tokens[crop, :64], alone.pooler_output[0])
        torch.testing.assert_close(tokens[crop, 64], model.model.image_newline)


def test_batch_of_two_sizes_equals_single_runs(next_remote, photos):
    model, processor = next_remote
    prompts = [QUESTION_PROMPT, OTHER_PROMPT]
    batch = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    crops = [grid_of(*reversed(photo.size))[0] * grid_of(*reversed(photo.size))[1] + 1 for photo in photos]
    assert crops[0] != crops[1]  # two crop grids in one batch
    batch_output = model(**batch)
    batch_generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for sample in range(2):
        single = processor(images=photos[sample], text=prompts[sample], return_tensors="pt")
        single_output = model(**single)
        torch.testing.assert_close(
            batch_output.image_outputs.pooler_output[sample], single_output.image_outputs.pooler_output[0]
        )
        torch.testing.assert_close(batch_output.logits[sample, -1], single_output.logits[0, -1], rtol=1e-4, atol=1e-4)
        single_generated = model.generate(**single, max_new_tokens=4, do_sample=False)
        assert torch.equal(batch_generated[sample, -4:], single_generated[0, -4:])


def test_compression_off_gives_stock_llava_next_logits(tmp_path, photos):
    model, processor = load_remote(save_checkpoint(tmp_path, arch="llava-next", reduction_ratio=0))
    stock = stock_llava_with_same_weights(model)
    prompts = [QUESTION_PROMPT, OTHER_PROMPT]
    inputs = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    stock_inputs = stock_processor(processor)(images=photos, text=prompts, padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    torch.testing.assert_close(model(**inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, stock.generate(**stock_inputs, max_new_tokens=4, do_sample=False))


def test_pipeline_with_chat_input(next_checkpoint, photos):
    pipe = pipeline("image-text-to-text", model=str(next_checkpoint), trust_remote_code=True)
    assert type(pipe.model).__name__ == "VisionTrimLlavaNextForConditionalGeneration"
    assert type(pipe.processor).__name__ == "VisionTrimLlavaNextProcessor"
    messages = [
        {"role": "user", "content": [{"type": "image", "image": photos[1]}, {"type": "text", "text": "What is this?"}]}
    ]
    result = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"


def test_mismatched_pinpoints_are_refused_when_the_processor_loads(next_checkpoint, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(next_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_grid_pinpoints"] = [[336, 672], [672, 336]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"image_grid_pinpoints .* differ from the model config's \[\[336, 672\]"):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_newline_setting_mismatch_names_the_setting(next_checkpoint, photos):
    model, _ = load_remote(next_checkpoint)
    processor = AutoProcessor.from_pretrained(next_checkpoint, trust_remote_code=True, crop_newline=False)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"hold 192 image placeholder tokens but the images give 195.*crop_newline=True"
    ):
        model(**inputs)


def test_save_and_reload_keep_every_setting(tmp_path, photos):
    settings = dict(arch="llava-next", visual_tokens=32, dvts_score="received_attention", crop_newline=False)
    model, processor = load_remote(save_checkpoint(tmp_path / "first", **settings))
    model.save_pretrained(tmp_path / "second")
    processor.save_pretrained(tmp_path / "second")
    again, processor_again = load_remote(tmp_path / "second")
    assert type(again).__name__ == "VisionTrimLlavaNextForConditionalGeneration"
    assert (again.config.visual_tokens, again.config.dvts_score, again.config.crop_newline) == (
        32,
        "received_attention",
        False,
    )
    assert again.config.image_grid_pinpoints == LLAVA_NEXT_PINPOINTS
    assert (processor_again.visual_tokens, processor_again.crop_newline) == (32, False)
    inputs = processor_again(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
