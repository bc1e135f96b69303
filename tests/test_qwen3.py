"""
VisionTrim Qwen3-VL (dense and MoE): stock equality when off, the slow reference of `reference_qwen3.py` (kept units,
main and DeepStack rows, M-RoPE positions), DeepStack injection, video slices with their timestamps, batching,
remote loading and `pipeline`.

As in `test_qwen_reference.py`, the tiny models' scored block is sharpened (`SHARPNESS`) so that every DVTS / TGVC
decision is far from a tie an fp32 implementation could decide either way; each case checks its margins.
"""

import json

import numpy
import pytest
import torch
from PIL import Image
from reference_qwen3 import slow_compressed_positions, slow_visiontrim_qwen3

from visiontrim.configuration_visiontrim import qwen_visual_tokens
from visiontrim.tools.build import uncompressed_processor
from visiontrim.tools.build_qwen import (
    QwenShapes,
    build_qwen_config,
    build_qwen_model,
    build_qwen_processor,
    stock_qwen_with_same_weights,
)

from helpers import load_remote, sharpen_scored_attention


QUESTIONS = ("What animal is in the picture?", "Is there a cup of coffee on the table? Answer with one word.")
VIDEO_QUESTION = "What happens in the video?"
SHARPNESS = 300.0
MIN_DVTS_MARGIN = 1e-5  # relative gap of d at the K_d cut
MIN_TGVC_MARGIN = 1e-6  # absolute gap of relevance at the K_c cut and of each argmax
DEEPSTACK_LEVELS = 3


def random_image(height: int, width: int, seed: int) -> Image.Image:
    generator = numpy.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=numpy.uint8))


def random_video(frames: int, height: int, width: int, seed: int) -> numpy.ndarray:
    return numpy.stack([numpy.asarray(random_image(height, width, seed + index)) for index in range(frames)])


def chat_prompt(processor, question: str, *media: str) -> str:
    content = [{"type": kind} for kind in media] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def build(ratio: float, arch: str = "qwen3-vl", sharpness: float | None = SHARPNESS):
    """A tiny seeded Qwen3-VL (scored block sharpened) and its processor."""
    config = build_qwen_config(arch, reduction_ratio=ratio)
    model = build_qwen_model(config)
    if sharpness is not None:
        sharpen_scored_attention(model, sharpness)
    return model, build_qwen_processor(config)


def image_batch(processor) -> dict:
    """Two images of different sizes (224 x 320 px: 7 x 10 units; 128 x 96: 4 x 3) with different questions."""
    images = [random_image(224, 320, seed=1), random_image(128, 96, seed=2)]
    prompts = [chat_prompt(processor, question, "image") for question in QUESTIONS]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def image_and_video(processor) -> dict:
    """One prompt with an image (160 x 128 px) and a 4-frame 128 x 160 video (2 slices of 4 x 5 units)."""
    prompt = chat_prompt(processor, "Is the cat of the picture in the video?", "image", "video")
    return processor(
        images=[random_image(160, 128, seed=3)],
        videos=[random_video(4, 128, 160, seed=20)],
        text=[prompt],
        return_tensors="pt",
    )


def without_guidance(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if "guidance" not in key}


def guidance_ids(inputs: dict, prefix: str = "") -> list[torch.Tensor]:
    ids, mask = inputs[f"{prefix}guidance_input_ids"], inputs[f"{prefix}guidance_attention_mask"]
    return [row[row_mask.bool()] for row, row_mask in zip(ids, mask, strict=True)]


def reference_of(model, pixel_values, grid_thw, guidance):
    """The slow reference for these items, refusing cases too close to a tie for fp32."""
    config = model.config
    reference = slow_visiontrim_qwen3(
        model, pixel_values, grid_thw, guidance, config.reduction_ratio, config.dominant_ratio, config.merge_iterations
    )
    assert reference.dvts_margin > MIN_DVTS_MARGIN
    assert reference.tgvc_margin > MIN_TGVC_MARGIN
    return reference


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 rows against the float64 reference's (whose tower runs in float64): within 1e-5 of their scale."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def assert_matches_reference(model, encoded, pixel_values, grid_thw, guidance):
    reference = reference_of(model, pixel_values, grid_thw, guidance)
    assert [units.tolist() for units in encoded.kept_units] == reference.kept_units
    for actual, expected in zip(encoded.pooler_output, reference.features, strict=True):
        assert_rows_close(actual, expected)
    assert len(encoded.deepstack_features) == len(reference.deepstack) == DEEPSTACK_LEVELS
    for level, expected_level in zip(encoded.deepstack_features, reference.deepstack, strict=True):
        for actual, expected in zip(level, expected_level, strict=True):
            assert_rows_close(actual, expected)
    return reference


def language_model_inputs(model, inputs: dict) -> dict:
    """The keyword arguments the language model receives in `model(**inputs)`."""
    recorded = {}

    def record(module, args, kwargs):
        recorded.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return recorded


@torch.no_grad()
def test_compression_off_equals_stock_logits_and_generations():
    model, processor = build(0.0, sharpness=None)
    stock = stock_qwen_with_same_weights(model)
    for inputs in (image_batch(processor), image_and_video(processor)):
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, stock(**without_guidance(inputs)).logits, rtol=0, atol=1e-5)
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = stock.generate(**without_guidance(inputs), max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, expected)
    assert image_batch(processor)["attention_mask"][1, 0] == 0  # the batch was left-padded


@torch.no_grad()
def test_two_images_match_the_reference_units_rows_and_positions():
    model, processor = build(0.75)
    inputs = image_batch(processor)
    encoded = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        inputs["guidance_input_ids"],
        inputs["guidance_attention_mask"],
    )
    reference = assert_matches_reference(
        model, encoded, inputs["pixel_values"], inputs["image_grid_thw"], guidance_ids(inputs)
    )
    assert [len(units) for units in reference.kept_units] == [18, 3]  # 70 and 12 units at 0.75
    assert any(count < 18 for count in reference.num_dominant[0])  # TGVC seeds were merged
    positions, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"image": encoded},
    )
    stock_inputs = image_batch(uncompressed_processor(processor))
    rows = [[units] for units in reference.kept_units]  # one image per row
    expected_positions, expected_deltas = slow_compressed_positions(model, stock_inputs, rows)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(deltas, expected_deltas)


@torch.no_grad()
def test_image_and_video_match_the_reference_and_keep_each_slice_after_its_timestamp():
    model, processor = build(0.75)
    inputs = image_and_video(processor)
    stock_inputs = image_and_video(uncompressed_processor(processor))
    slices, height, width = inputs["video_grid_thw"][0].tolist()
    per_slice = qwen_visual_tokens(height * width // 4, 0.75)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    stock_text = processor.tokenizer.decode(stock_inputs["input_ids"][0])
    # Each slice keeps stock's timestamp and its own block, with the kept count of placeholders.
    assert text.count("seconds>") == stock_text.count("seconds>") == slices == 2
    assert text.count("<|video_pad|>") == slices * per_slice == 10
    assert stock_text.replace("<|video_pad|>" * (height * width // 4), "<|video_pad|>" * per_slice).replace(
        "<|image_pad|>", ""
    ) == text.replace("<|image_pad|>", "")
    image = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        inputs["guidance_input_ids"],
        inputs["guidance_attention_mask"],
    )
    video = model.model.get_video_features(
        inputs["pixel_values_videos"],
        inputs["video_grid_thw"],
        inputs["video_guidance_input_ids"],
        inputs["video_guidance_attention_mask"],
    )
    image_reference = assert_matches_reference(
        model, image, inputs["pixel_values"], inputs["image_grid_thw"], guidance_ids(inputs)
    )
    video_reference = assert_matches_reference(
        model, video, inputs["pixel_values_videos"], inputs["video_grid_thw"], guidance_ids(inputs, "video_")
    )
    units_per_slice = height * width // 4
    assert [unit // units_per_slice for unit in video_reference.kept_units[0]] == [0] * per_slice + [1] * per_slice
    positions, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"image": image, "video": video},
    )
    rows = [[image_reference.kept_units[0], video_reference.kept_units[0]]]
    expected_positions, expected_deltas = slow_compressed_positions(model, stock_inputs, rows)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(deltas, expected_deltas)
    # The positions the model's forward computes are these.
    assert torch.equal(language_model_inputs(model, inputs)["position_ids"], positions)


@torch.no_grad()
def test_forward_injects_the_reference_deepstack_rows_at_the_kept_tokens():
    model, processor = build(0.75)
    inputs = image_and_video(processor)
    received = language_model_inputs(model, inputs)
    visual = received["visual_pos_masks"]
    is_media = (inputs["input_ids"] == model.config.image_token_id) | (
        inputs["input_ids"] == model.config.video_token_id
    )
    assert torch.equal(visual, is_media)
    image_reference = reference_of(model, inputs["pixel_values"], inputs["image_grid_thw"], guidance_ids(inputs))
    video_reference = reference_of(
        model, inputs["pixel_values_videos"], inputs["video_grid_thw"], guidance_ids(inputs, "video_")
    )
    assert len(received["deepstack_visual_embeds"]) == DEEPSTACK_LEVELS
    # In prompt order: the image's tokens, then the video's.
    for level, rows in enumerate(received["deepstack_visual_embeds"]):
        expected = torch.cat([image_reference.deepstack[level][0], video_reference.deepstack[level][0]])
        assert_rows_close(rows, expected)
    main = received["inputs_embeds"][visual]
    assert_rows_close(main, torch.cat([image_reference.features[0], video_reference.features[0]]))


@torch.no_grad()
def test_zeroed_deepstack_equals_a_run_without_deepstack_injection():
    model, processor = build(0.75)
    for merger in model.model.visual.deepstack_merger_list:
        torch.nn.init.zeros_(merger.linear_fc2.weight)
        torch.nn.init.zeros_(merger.linear_fc2.bias)
    inputs = image_and_video(processor)
    zeroed = model(**inputs).logits

    def drop_deepstack(module, args, kwargs):
        return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}

    handle = model.model.language_model.register_forward_pre_hook(drop_deepstack, with_kwargs=True)
    try:
        without = model(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(zeroed, without, rtol=0, atol=1e-6)
    # And DeepStack matters with its weights on: the injected rows change the logits.
    model_on, _ = build(0.75)
    assert (model_on(**inputs).logits - zeroed).abs().max() > 1e-3


@torch.no_grad()
def test_batch_equals_one_by_one_and_cache_equals_recompute():
    model, processor = build(0.75)
    inputs = image_batch(processor)
    batched = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = batched[:, inputs["input_ids"].shape[1] :]
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(new_tokens, uncached[:, inputs["input_ids"].shape[1] :])
    images = [random_image(224, 320, seed=1), random_image(128, 96, seed=2)]
    batch_logits = model(**inputs).logits
    for row, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        single = processor(images=[image], text=[chat_prompt(processor, question, "image")], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], new_tokens[row])
        length = single["input_ids"].shape[1]
        torch.testing.assert_close(batch_logits[row, -length:], model(**single).logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (64, 1024), (1024, 64), (224, 320), (480, 640)])
@pytest.mark.parametrize("ratio", [0.5, 0.889])
def test_processor_placeholders_equal_the_tokens_the_model_keeps(size, ratio):
    model, processor = build(ratio, sharpness=None)
    prompt = chat_prompt(processor, "What is it?", "image")
    inputs = processor(images=[random_image(*size, seed=0)], text=[prompt], return_tensors="pt")
    units = int(inputs["image_grid_thw"].prod()) // 4
    expected = qwen_visual_tokens(units, ratio)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            inputs["guidance_input_ids"],
            inputs["guidance_attention_mask"],
        )
    assert features.pooler_output[0].shape == (expected, model.config.text_config.hidden_size)
    assert all(level[0].shape == features.pooler_output[0].shape for level in features.deepstack_features)
    assert processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens == [expected]


def test_saved_folder_loads_through_remote_code_and_pipeline_answers(tmp_path):
    from transformers import pipeline

    model, processor = build(0.75)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_remote(tmp_path)
    assert type(loaded).__name__ == "VisionTrimQwen3VLForConditionalGeneration"
    assert type(loaded_processor).__name__ == "VisionTrimQwen3VLProcessor"
    assert type(loaded_processor.video_processor).__name__ == "VisionTrimQwen3VLVideoProcessor"
    assert type(loaded).__module__.startswith("transformers_modules.")
    inputs = image_and_video(processor)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(**image_and_video(loaded_processor), max_new_tokens=4), expected)
    image = random_image(224, 320, seed=1)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    generator = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    answer = generator(text=messages, max_new_tokens=4, do_sample=False, return_full_text=False)
    direct = processor(images=[image], text=[chat_prompt(processor, "What?", "image")], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**direct, max_new_tokens=4, do_sample=False)[0, direct["input_ids"].shape[1] :]
    assert answer[0]["generated_text"] == processor.decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def test_moe_variant_compresses_the_same_way_and_equals_stock_when_off():
    shapes = QwenShapes(llm_heads=2, llm_kv_heads=2)
    config = build_qwen_config("qwen3-vl-moe", shapes, reduction_ratio=0.0)
    model, processor = build_qwen_model(config), build_qwen_processor(config)
    stock = stock_qwen_with_same_weights(model)
    inputs = image_and_video(processor)
    torch.testing.assert_close(model(**inputs).logits, stock(**without_guidance(inputs)).logits, rtol=0, atol=1e-5)
    model.config.reduction_ratio = processor.reduction_ratio = 0.75
    sharpen_scored_attention(model, SHARPNESS)
    inputs = image_and_video(processor)
    video = model.model.get_video_features(
        inputs["pixel_values_videos"],
        inputs["video_grid_thw"],
        inputs["video_guidance_input_ids"],
        inputs["video_guidance_attention_mask"],
    )
    assert_matches_reference(
        model, video, inputs["pixel_values_videos"], inputs["video_grid_thw"], guidance_ids(inputs, "video_")
    )
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def save_stock_source(model, processor, source) -> None:
    """`model` as a stock Qwen3-VL folder saved by Transformers, with the processor files of a Hub checkpoint."""
    stock_qwen_with_same_weights(model).save_pretrained(source)
    processor.image_processor.save_pretrained(source)
    processor.video_processor.save_pretrained(source)  # the converter reads its `size`
    processor.tokenizer.save_pretrained(source)
    (source / "chat_template.jinja").write_text(processor.chat_template)


def test_converter_turns_a_qwen3_vl_folder_into_a_visiontrim_one_at_the_qwen3_default(tmp_path):
    from visiontrim.convert_checkpoint import main

    model, processor = build(0.0, sharpness=None)
    source = tmp_path / "qwen3"
    save_stock_source(model, processor, source)
    main(["--qwen", str(source), "--output", str(tmp_path / "out")])
    loaded, loaded_processor = load_remote(tmp_path / "out")
    assert type(loaded).__name__ == "VisionTrimQwen3VLForConditionalGeneration"
    assert type(loaded_processor.video_processor).__name__ == "VisionTrimQwen3VLVideoProcessor"
    assert (loaded.config.reduction_ratio, loaded_processor.reduction_ratio) == (0.5, 0.5)
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert "So the default for Qwen3-VL is `reduction_ratio=0.5`" in card and "DeepStack features" in card
    assert "this folder serves images and videos with its compression" in card and "qwen3_vl" in card
    assert "A 1024 x 768 image (768 merged tokens) keeps (288, 96)" in card
    model.config.reduction_ratio = processor.reduction_ratio = 0.5
    with torch.no_grad():
        expected = model.generate(**image_and_video(processor), max_new_tokens=4, do_sample=False)
        converted = loaded.generate(**image_and_video(loaded_processor), max_new_tokens=4, do_sample=False)
    assert torch.equal(converted, expected)


def test_moe_folders_hold_the_released_expert_layout_whichever_layout_they_were_converted_from(tmp_path):
    # The released checkpoints hold each expert (experts, in, out) and say `norm_topk_prob`; Transformers saves its
    # own (experts, out, in) and leaves the field out. vLLM's Qwen3-VL MoE loads the released form only.
    from safetensors.torch import load_file, save_file

    from visiontrim.convert_checkpoint import main

    model, processor = build(0.0, arch="qwen3-vl-moe", sharpness=None)
    text = model.config.text_config
    experts, hidden, width = text.num_experts, text.hidden_size, text.moe_intermediate_size
    released = {"gate_up_proj": (experts, hidden, 2 * width), "down_proj": (experts, width, hidden)}
    sources = {"transformers": tmp_path / "transformers", "released": tmp_path / "released"}
    for source in sources.values():
        save_stock_source(model, processor, source)
        config = json.loads((source / "config.json").read_text())
        config["text_config"].pop("norm_topk_prob", None)
        if source == sources["released"]:
            config["text_config"]["norm_topk_prob"] = True
            weights = load_file(source / "model.safetensors")
            weights = {name: (w.mT.contiguous() if ".experts." in name else w) for name, w in weights.items()}
            save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
        (source / "config.json").write_text(json.dumps(config))
    for name, source in sources.items():
        stored = load_file(source / "model.safetensors")["model.language_model.layers.0.mlp.experts.gate_up_proj"]
        assert (tuple(stored.shape) == released["gate_up_proj"]) == (name == "released")
        output = tmp_path / f"from-{name}"
        main(["--qwen", str(source), "--output", str(output)])
        weights = load_file(output / "model.safetensors")
        for layer in range(text.num_hidden_layers):
            for projection, shape in released.items():
                assert tuple(weights[f"model.language_model.layers.{layer}.mlp.experts.{projection}"].shape) == shape
        assert json.loads((output / "config.json").read_text())["text_config"]["norm_topk_prob"] is True
        assert "this folder serves images and videos" in " ".join((output / "README.md").read_text().split())
        loaded, _ = load_remote(output)
        weights = loaded.state_dict()
        for key, expected in model.state_dict().items():
            assert torch.equal(weights.pop(key), expected), key
        assert not weights


@torch.no_grad()
def test_eager_attention_and_bfloat16_keep_the_same_tokens_and_deepstack_dtype():
    model, processor = build(0.75)
    inputs = image_batch(processor)
    arguments = (inputs["pixel_values"], inputs["image_grid_thw"], inputs["guidance_input_ids"])
    sdpa = model.model.get_image_features(*arguments)
    model.set_attn_implementation("eager")
    eager = model.model.get_image_features(*arguments)
    assert torch.equal(torch.cat(eager.kept_units), torch.cat(sdpa.kept_units))
    torch.testing.assert_close(torch.cat(eager.pooler_output), torch.cat(sdpa.pooler_output), rtol=1e-4, atol=1e-5)
    half = model.to(torch.bfloat16).model.get_image_features(*arguments)
    assert half.pooler_output[0].dtype == torch.bfloat16
    assert all(level[0].dtype == torch.bfloat16 for level in half.deepstack_features)
    assert [len(kept) for kept in half.kept_units] == [len(kept) for kept in sdpa.kept_units]
    overlap = len(set(half.dominant_units.tolist()) & set(sdpa.dominant_units.tolist()))
    assert overlap >= 0.8 * len(sdpa.dominant_units)  # bf16 tower outputs differ a little; the choice barely moves
    logits = model(
        **{key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in inputs.items()}
    ).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(("total", "source_fps"), [(40, 10.0), (7, 2.0), (3, 30.0), (300, 24.0)])
def test_video_processor_samples_frames_as_stock_qwen3_vl_when_asked(total, source_fps):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    _, processor = build(0.75, sharpness=None)
    video_processor = processor.video_processor
    video = random_video(total, 32, 32, seed=0)
    metadata = VideoMetadata(total_num_frames=total, fps=source_fps, frames_indices=list(range(total)))
    out = video_processor(videos=[video], video_metadata=[metadata], do_sample_frames=True, return_tensors="pt")
    # Stock Qwen3-VL's own sampling rule (its processor needs torchvision; the rule does not).
    expected = Qwen3VLVideoProcessor.sample_frames(video_processor, metadata).tolist()
    assert out["video_metadata"][0].frames_indices == expected
    assert int(out["video_grid_thw"][0, 0]) == -(-len(expected) // 2)
