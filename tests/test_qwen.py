"""VisionTrim Qwen2.5-VL and Qwen2-VL: stock equality when off, budgets, M-RoPE positions, batching, remote loading."""

import re

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from visiontrim.configuration_visiontrim import qwen_visual_tokens
from visiontrim.tools.build_qwen import (
    QwenShapes,
    build_qwen_config,
    build_qwen_model,
    build_qwen_processor,
    stock_qwen_with_same_weights,
)

from helpers import load_remote, save_qwen_checkpoint


ARCHITECTURES = ("qwen2.5-vl", "qwen2-vl")
QUESTIONS = ("What animal is in the picture?", "Is there a cup of coffee on the table?")


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    generator = numpy.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=numpy.uint8))


def chat_prompt(processor, question: str, media: str = "image") -> str:
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def two_image_batch(processor):
    """Two images of different sizes with different questions: the shorter prompt is left-padded."""
    images = [random_image(224, 336, seed=1), random_image(140, 112, seed=2)]
    prompts = [chat_prompt(processor, question) for question in QUESTIONS]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


def model_and_processor(arch: str, **compression):
    config = build_qwen_config(arch, **compression)
    return build_qwen_model(config), build_qwen_processor(config)


@torch.no_grad()
def test_compression_off_equals_stock_logits_and_generations(arch):
    model, processor = model_and_processor(arch, reduction_ratio=0.0)
    stock = stock_qwen_with_same_weights(model)
    inputs = two_image_batch(processor)
    assert inputs["attention_mask"][1, 0] == 0  # left padding
    logits = model(**inputs).logits
    stock_inputs = {key: value for key, value in inputs.items() if not key.startswith("guidance")}
    torch.testing.assert_close(logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, stock.generate(**stock_inputs, max_new_tokens=6, do_sample=False))


@torch.no_grad()
def test_kept_tokens_hold_their_stock_positions_and_text_continues(arch):
    model, processor = model_and_processor(arch, reduction_ratio=0.75)
    inputs = two_image_batch(processor)
    encoded = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        inputs["guidance_input_ids"],
        inputs["guidance_attention_mask"],
    )
    positions, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"image": encoded},
    )
    stock = stock_qwen_with_same_weights(build_qwen_model(build_qwen_config(arch, reduction_ratio=0.0)))
    stock_processor = build_qwen_processor(build_qwen_config(arch, reduction_ratio=0.0))
    full = two_image_batch(stock_processor)
    stock_positions, stock_deltas = stock.model.get_rope_index(
        full["input_ids"], full["mm_token_type_ids"], full["image_grid_thw"], attention_mask=full["attention_mask"]
    )
    for row, kept_units in enumerate(encoded.kept_units):
        grid = inputs["image_grid_thw"][row]
        assert len(kept_units) == qwen_visual_tokens(int(grid.prod()) // 4, 0.75)
        image = inputs["input_ids"][row] == model.config.image_token_id
        full_image = full["input_ids"][row] == model.config.image_token_id
        torch.testing.assert_close(positions[:, row, image], stock_positions[:, row, full_image][:, kept_units])
        # The text after the image, and the next generated position, continue as after the whole image.
        after = positions[:, row, -3:]
        torch.testing.assert_close(after, stock_positions[:, row, -3:])
        next_position = inputs["attention_mask"][row].sum() + deltas[row]
        assert next_position == full["attention_mask"][row].sum() + stock_deltas[row]


@torch.no_grad()
def test_batch_equals_one_by_one_and_cache_equals_recompute(arch):
    model, processor = model_and_processor(arch, reduction_ratio=0.8)
    inputs = two_image_batch(processor)
    batched = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = batched[:, inputs["input_ids"].shape[1] :]
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(new_tokens, uncached[:, inputs["input_ids"].shape[1] :])
    images = [random_image(224, 336, seed=1), random_image(140, 112, seed=2)]
    for row, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        single = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], new_tokens[row])


@pytest.mark.parametrize(
    "size", [(28, 28), (56, 56), (28, 1400), (1400, 28), (37, 1001), (224, 336), (480, 640), (1000, 999)]
)
@pytest.mark.parametrize("ratio", [0.5, 0.889, 0.99])
def test_processor_placeholders_equal_the_tokens_the_model_keeps(size, ratio):
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=ratio)
    model, processor = build_qwen_model(config), build_qwen_processor(config, min_pixels=28 * 28)
    inputs = processor(images=[random_image(*size)], text=[chat_prompt(processor, "What is it?")], return_tensors="pt")
    units = int(inputs["image_grid_thw"].prod()) // 4
    expected = max(1, round(units * (1 - ratio)))
    placeholders = int((inputs["input_ids"] == config.image_token_id).sum())
    assert placeholders == expected
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            inputs["guidance_input_ids"],
            inputs["guidance_attention_mask"],
        )
    assert features.pooler_output[0].shape == (expected, config.text_config.hidden_size)
    dominant, complement = config.kept_tokens(units)
    assert (len(features.dominant_units), len(features.complement_seed_units)) == (dominant, complement)
    kept = features.kept_units[0]
    assert len(set(kept.tolist())) == expected and int(kept.max()) < units
    assert processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens == [expected]


@torch.no_grad()
def test_window_order_is_undone_before_scoring():
    """With every block attending fully, Qwen2.5-VL's window reordering changes nothing: nor may it change DVTS."""
    shapes = QwenShapes(vision_layers=2, full_attention_blocks=[0, 1])
    config = build_qwen_config("qwen2.5-vl", shapes=shapes, reduction_ratio=0.75, dominant_ratio=1.0)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    inputs = processor(images=[random_image(448, 336)], text=[chat_prompt(processor, "What?")], return_tensors="pt")
    windowed = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    model.model.visual.window_size = 14 * 2 * 1000  # one window: no reordering
    unwindowed = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(windowed.dominant_units, unwindowed.dominant_units)
    torch.testing.assert_close(windowed.pooler_output[0], unwindowed.pooler_output[0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_video_keeps_the_budget_per_temporal_slice():
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=0.75)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    frames = numpy.stack([numpy.asarray(random_image(112, 168, seed=seed)) for seed in range(5)])
    inputs = processor(videos=[frames], text=[chat_prompt(processor, "What happens?", "video")], return_tensors="pt")
    slices, height, width = inputs["video_grid_thw"][0].tolist()
    assert slices == 3  # 5 frames, the last repeated: 3 pairs
    per_slice = qwen_visual_tokens(height * width // 4, 0.75)
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == slices * per_slice
    features = model.model.get_video_features(
        inputs["pixel_values_videos"],
        inputs["video_grid_thw"],
        inputs["video_guidance_input_ids"],
        inputs["video_guidance_attention_mask"],
    )
    kept = features.kept_units[0]
    slice_of_token = kept // (height * width // 4)
    assert torch.equal(slice_of_token, torch.arange(slices).repeat_interleave(per_slice))
    logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_saved_folder_loads_through_remote_code_and_generates_the_same(tmp_path):
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=0.8, merge_iterations=2)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_remote(tmp_path)
    assert type(loaded).__name__ == "VisionTrimQwen2_5_VLForConditionalGeneration"
    assert type(loaded_processor).__name__ == "VisionTrimQwen2_5_VLProcessor"
    assert (loaded.config.reduction_ratio, loaded_processor.reduction_ratio) == (0.8, 0.8)
    inputs = two_image_batch(processor)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(
            loaded.generate(**two_image_batch(loaded_processor), max_new_tokens=4, do_sample=False), expected
        )


def test_pipeline_answers_a_chat_with_an_image(tmp_path):
    from transformers import pipeline

    save_qwen_checkpoint(tmp_path, "qwen2-vl", reduction_ratio=0.75)
    answer = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)(
        text=[
            {
                "role": "user",
                "content": [{"type": "image", "image": random_image(112, 112)}, {"type": "text", "text": "What?"}],
            }
        ],
        max_new_tokens=3,
        do_sample=False,
    )
    assert isinstance(answer[0]["generated_text"], list)


def test_pipeline_answers_a_chat_with_only_an_image(tmp_path):
    from transformers import pipeline

    save_qwen_checkpoint(tmp_path, "qwen2.5-vl", reduction_ratio=0.75)
    chat = [{"role": "user", "content": [{"type": "image", "image": random_image(112, 140)}]}]
    answer = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)(
        text=chat, max_new_tokens=3, do_sample=False
    )
    assert answer[0]["generated_text"][-1]["role"] == "assistant"


@torch.no_grad()
def test_an_image_without_a_question_is_guided_by_its_mean_token_alone_or_in_a_batch(arch):
    model, processor = model_and_processor(arch, reduction_ratio=0.5)
    images = [random_image(140, 112, seed=3), random_image(224, 336, seed=4)]
    bare = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True
    )
    alone = processor(images=images[:1], text=[bare], return_tensors="pt")
    assert alone["guidance_input_ids"].dtype == torch.long and not alone["guidance_attention_mask"].any()
    batch = processor(
        images=images, text=[bare, chat_prompt(processor, QUESTIONS[0])], return_tensors="pt", padding=True
    )

    def encode(inputs):
        return model.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            inputs["guidance_input_ids"],
            inputs["guidance_attention_mask"],
        )

    one, both = encode(alone), encode(batch)
    assert one.complement_seed_units.numel() > 0  # TGVC ran, guided by the image's mean merged token
    assert torch.equal(one.kept_units[0], both.kept_units[0])
    torch.testing.assert_close(one.pooler_output[0], both.pooler_output[0], rtol=0, atol=1e-5)
    assert model.generate(**alone, max_new_tokens=2, do_sample=False).shape[1] == alone["input_ids"].shape[1] + 2
    video = processor(
        videos=[[random_image(112, 112, seed=s) for s in range(4)]],
        text=[bare.replace("<|image_pad|>", "<|video_pad|>")],
        return_tensors="pt",
    )
    assert video["video_guidance_input_ids"].dtype == torch.long
    assert model.generate(**video, max_new_tokens=2, do_sample=False).shape[1] == video["input_ids"].shape[1] + 2

    strict_processor = build_qwen_processor(build_qwen_config(arch, reduction_ratio=0.5, empty_guidance="error"))
    with pytest.raises(ValueError, match="have no question"):
        strict_processor(images=images[:1], text=[bare], return_tensors="pt")


@pytest.mark.parametrize("video", ["clip.mp4", ["clip.mp4"], ["https://example.com/clip.mp4"]])
def test_a_video_file_path_is_refused_with_what_to_pass_instead(video):
    _, processor = model_and_processor("qwen2.5-vl")
    prompt = chat_prompt(processor, "What happens?", media="video")
    with pytest.raises(ValueError, match=r"not a file path or URL: decode it first.*sample_frames"):
        processor(videos=video, text=[prompt], return_tensors="pt")


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match="window-attention block"):
        build_qwen_config("qwen2.5-vl", dvts_layer=0)
    with pytest.raises(ValueError, match="reduction_ratio"):
        build_qwen_config("qwen2.5-vl", reduction_ratio=1.0)
    with pytest.raises(ValueError, match="set reduction_ratio"):
        build_qwen_config("qwen2.5-vl", visual_tokens=64)
    model, processor = model_and_processor("qwen2.5-vl", reduction_ratio=0.75)
    other = build_qwen_processor(build_qwen_config("qwen2.5-vl", reduction_ratio=0.5))
    inputs = two_image_batch(other)
    with pytest.raises(ValueError, match="reduction_ratio=0.75"), torch.no_grad():
        model(**inputs)
    inputs = two_image_batch(processor)
    del inputs["guidance_input_ids"]
    with pytest.raises(ValueError, match="guidance_input_ids"), torch.no_grad():
        model(**inputs)


def test_converter_turns_a_qwen_folder_into_a_visiontrim_one(tmp_path, arch):
    from visiontrim.convert_checkpoint import main

    model, processor = model_and_processor(arch, reduction_ratio=0.0)
    source = tmp_path / "qwen"
    stock_qwen_with_same_weights(model).save_pretrained(source)
    # The Hub's Qwen checkpoints keep the pre-v5 names: `model.layers.*`, `model.embed_tokens`, `visual.*`.
    weights = load_file(source / "model.safetensors")
    renamed = {
        re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", name)): tensor
        for name, tensor in weights.items()
    }
    assert "visual.blocks.0.attn.qkv.weight" in renamed and "model.layers.0.mlp.up_proj.weight" in renamed
    save_file(renamed, source / "model.safetensors", metadata={"format": "pt"})
    processor.image_processor.save_pretrained(source)
    processor.tokenizer.save_pretrained(source)
    (source / "chat_template.jinja").write_text(processor.chat_template)
    main(["--qwen", str(source), "--output", str(tmp_path / "out"), "--reduction-ratio", "0.75"])
    loaded, loaded_processor = load_remote(tmp_path / "out")
    assert loaded.config.model_type == model.config.model_type
    assert (loaded.config.reduction_ratio, loaded_processor.reduction_ratio) == (0.75, 0.75)
    assert "not published in a form we could verify" in " ".join((tmp_path / "out" / "README.md").read_text().split())
    model.config.reduction_ratio = 0.75
    processor.reduction_ratio = 0.75
    with torch.no_grad():
        expected = model.generate(**two_image_batch(processor), max_new_tokens=4, do_sample=False)
        converted = loaded.generate(**two_image_batch(loaded_processor), max_new_tokens=4, do_sample=False)
    assert torch.equal(converted, expected)
    with pytest.raises(SystemExit):
        main(["--qwen", str(source), "--output", str(tmp_path / "again"), "--clip", str(source)])
    other = "qwen2-vl" if arch == "qwen2.5-vl" else "qwen2.5-vl"
    with pytest.raises(SystemExit):
        main(["--qwen", str(source), "--output", str(tmp_path / "again"), "--arch", other])


@torch.no_grad()
def test_image_and_video_in_one_prompt_keep_their_stock_positions():
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=0.75)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    frames = numpy.stack([numpy.asarray(random_image(112, 168, seed=seed)) for seed in range(4)])
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What changes?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    media = {"images": [random_image(140, 196)], "videos": [frames], "text": [prompt], "return_tensors": "pt"}
    inputs = processor(**media)
    encoded = {
        "image": model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], inputs["guidance_input_ids"]
        ),
        "video": model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], inputs["video_guidance_input_ids"]
        ),
    }
    rope = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], **rope, mm_encoder_outputs=encoded
    )
    processor.reduction_ratio = 0
    full = processor(**media)
    stock_positions, _ = stock_qwen_with_same_weights(model).model.get_rope_index(
        full["input_ids"], full["mm_token_type_ids"], **rope
    )
    for modality, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
        kept = encoded[modality].kept_units[0]
        torch.testing.assert_close(
            positions[:, 0, inputs["input_ids"][0] == token_id],
            stock_positions[:, 0, full["input_ids"][0] == token_id][:, kept],
        )
    torch.testing.assert_close(positions[:, 0, -5:], stock_positions[:, 0, -5:])


@torch.no_grad()
def test_eager_attention_and_bfloat16_keep_the_same_tokens():
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=0.75)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    inputs = two_image_batch(processor)
    arguments = (inputs["pixel_values"], inputs["image_grid_thw"], inputs["guidance_input_ids"])
    sdpa = model.model.get_image_features(*arguments)
    model.set_attn_implementation("eager")
    eager = model.model.get_image_features(*arguments)
    assert torch.equal(eager.dominant_units, sdpa.dominant_units)
    assert torch.equal(torch.cat(eager.kept_units), torch.cat(sdpa.kept_units))
    torch.testing.assert_close(torch.cat(eager.pooler_output), torch.cat(sdpa.pooler_output), rtol=1e-4, atol=1e-5)
    half = model.to(torch.bfloat16).model.get_image_features(*arguments)
    assert half.pooler_output[0].dtype == torch.bfloat16
    assert [len(kept) for kept in half.kept_units] == [len(kept) for kept in sdpa.kept_units]
    overlap = len(set(half.dominant_units.tolist()) & set(sdpa.dominant_units.tolist()))
    assert overlap >= 0.8 * len(sdpa.dominant_units)  # bf16 tower outputs differ a little; the choice barely moves
