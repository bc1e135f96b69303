"""
VisionTrim LLaVA-OneVision: stock equality when off, the slow reference of `reference_onevision.py` (kept tokens,
merged rows, layout) for anyres images, multi-image prompts and videos, the rows `forward` gives the LLM, batching,
placeholder counts, remote loading and `pipeline`.
"""

import json
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from reference_onevision import slow_onevision_images, slow_onevision_videos

from visiontrim.tools.build import build_model
from visiontrim.tools.build_onevision import (
    build_onevision_config,
    build_onevision_processor,
    stock_onevision_with_same_weights,
)

from helpers import load_remote, working_directory


QUESTION = "What animal is in the picture?"
OTHER_QUESTION = "Is there a cup of coffee on the table? Answer with one word."
# Image sizes whose best pinpoint (of the tiny models' 1x1, 1x2, 2x1, 2x2 grids of 384 px) gives 2, 3, 3 and 5 crops.
SIZES_AND_CROPS = (((384, 384), 2), ((300, 700), 3), ((700, 300), 3), ((800, 800), 5))


def chat(processor, *parts: str, question: str = QUESTION) -> str:
    content = [{"type": part} for part in parts] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(numpy.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=numpy.uint8))


def random_video(frames: int, seed: int) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 256, (frames, 240, 320, 3), dtype=numpy.uint8)


def sharpen_scored_layer(model, sharpness: float = 16.0) -> None:
    """
    Scales the scored SigLIP layer's attention logits by `sharpness` (its q and k by the square root): a random
    tower's attention is nearly uniform, so DVTS's ranking would have near-ties that fp32 rounding could flip.
    """
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj):
            projection.weight *= sharpness**0.5
            projection.bias *= sharpness**0.5


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny compressed OneVision (81 of 729 tokens per crop, 22 of 196 per frame) loaded as a user would."""
    folder = tmp_path_factory.mktemp("onevision")
    config = build_onevision_config()
    model = build_model(config, seed=5)
    sharpen_scored_layer(model)
    model.save_pretrained(folder)
    build_onevision_processor(config).save_pretrained(folder)
    return load_remote(folder)


@pytest.fixture(scope="module")
def uncompressed():
    config = build_onevision_config(reduction_ratio=0)
    model = build_model(config, seed=6)
    return model, build_onevision_processor(config), stock_onevision_with_same_weights(model)


def guidance_rows(inputs, name: str = "guidance") -> list[torch.Tensor]:
    ids, mask = inputs[f"{name}_input_ids"], inputs[f"{name}_attention_mask"].bool()
    return [row[row_mask] for row, row_mask in zip(ids, mask, strict=True)]


def settings(config) -> dict:
    return {
        "reduction_ratio": config.reduction_ratio,
        "dominant_ratio": config.dominant_ratio,
        "merge_iterations": config.merge_iterations,
        "merge_update": config.merge_update,
    }


def assert_equals_reference(encoded, references, tokens_per_item: int, newline: torch.Tensor) -> None:
    """
    Every crop's (frame's) kept and seed indices and rows, against the reference's, where its near-tie margins leave
    no ranking that fp32 rounding could flip (most items: checked); then the layout (newline rows) and the whole rows.
    """
    items = [item for reference in references for item in reference.items]
    clear = [item.dvts_margin > 2e-6 and item.tgvc_margin > 2e-7 for item in items]
    assert sum(clear) >= 0.75 * len(items), [(item.dvts_margin, item.tgvc_margin) for item in items]
    rows = [
        tokens[index * tokens_per_item : index * tokens_per_item + item_reference.tokens.shape[0]]
        for tokens, reference in zip(encoded.pooler_output, references, strict=True)
        for index, item_reference in enumerate(reference.items)
    ]
    for index, item in enumerate(items):
        if clear[index]:
            assert encoded.dominant_indices[index].tolist() == item.dominant
            assert encoded.complement_seed_indices[index].tolist() == item.seeds
            torch.testing.assert_close(rows[index].double(), item.tokens, rtol=0, atol=1e-5)
    for tokens, reference in zip(encoded.pooler_output, references, strict=True):
        assert tokens.shape == reference.tokens.shape
        is_newline = (reference.tokens == newline.double()).all(dim=-1)
        assert torch.equal(is_newline, (tokens == newline).all(dim=-1))
        if all(clear):
            torch.testing.assert_close(tokens.double(), reference.tokens, rtol=0, atol=1e-5)


def test_uncompressed_equals_stock_for_a_padded_batch_a_multi_image_prompt_and_a_video(uncompressed, photos):
    model, processor, stock = uncompressed
    prompts = [chat(processor, "image"), chat(processor, "image", question=OTHER_QUESTION)]
    batches = [
        processor(images=[photos[0], photos[1]], text=prompts, padding=True, return_tensors="pt"),
        processor(images=[[photos[0], photos[1]]], text=chat(processor, "image", "image"), return_tensors="pt"),
        processor(videos=[random_video(4, 0)], text=chat(processor, "video"), return_tensors="pt"),
    ]
    assert batches[0]["attention_mask"][:, 0].tolist().count(0) == 1  # left padding in play
    for inputs in batches:
        stock_inputs = {key: value for key, value in inputs.items() if "guidance" not in key}
        torch.testing.assert_close(model(**inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, stock.generate(**stock_inputs, max_new_tokens=4, do_sample=False))


def test_anyres_images_equal_the_slow_reference(compressed):
    model, processor = compressed
    images = [random_image(300, 700, 1), random_image(800, 800, 2)]
    inputs = processor(
        images=images,
        text=[chat(processor, "image"), chat(processor, "image", question=OTHER_QUESTION)],
        padding=True,
        return_tensors="pt",
    )
    encoded = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["image_sizes"],
        batch_num_images=inputs["batch_num_images"],
        guidance_input_ids=inputs["guidance_input_ids"],
        guidance_attention_mask=inputs["guidance_attention_mask"],
    )
    references = slow_onevision_images(
        model,
        inputs["pixel_values"],
        inputs["image_sizes"],
        inputs["batch_num_images"],
        guidance_rows(inputs),
        **settings(model.config),
    )
    assert [len(reference.items) for reference in references] == [3, 5]
    assert [tokens.shape[0] for tokens in encoded.pooler_output] == [3 * (81 + 1), 5 * (81 + 1)]
    assert_equals_reference(encoded, references, 81 + 1, model.model.image_newline)


def test_the_llm_sees_the_reference_rows_at_the_placeholders(compressed):
    model, processor = compressed
    inputs = processor(
        images=[[random_image(400, 500, 3), random_image(500, 400, 4)]],
        text=chat(processor, "image", "image"),
        return_tensors="pt",
    )
    references = slow_onevision_images(
        model,
        inputs["pixel_values"],
        inputs["image_sizes"],
        inputs["batch_num_images"],
        guidance_rows(inputs),
        **settings(model.config),
    )
    assert [len(reference.items) for reference in references] == [1, 1]  # a multi-image prompt: one crop each
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    placeholders = inputs["input_ids"] == model.config.image_token_id
    assert int(placeholders.sum()) == 2 * (81 + 1)
    embeds[placeholders] = torch.cat([reference.tokens for reference in references]).float()
    expected = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_videos_equal_the_slow_reference_per_pooled_frame(compressed):
    model, processor = compressed
    inputs = processor(
        videos=[random_video(3, 7), random_video(3, 8)],
        text=[chat(processor, "video"), chat(processor, "video", question=OTHER_QUESTION)],
        padding=True,
        return_tensors="pt",
    )
    encoded = model.model.get_video_features(
        inputs["pixel_values_videos"],
        video_guidance_input_ids=inputs["video_guidance_input_ids"],
        video_guidance_attention_mask=inputs["video_guidance_attention_mask"],
    )
    references = slow_onevision_videos(
        model, inputs["pixel_values_videos"], guidance_rows(inputs, "video_guidance"), **settings(model.config)
    )
    assert encoded.pooler_output.shape[1] == 3 * 22 + 1 == processor.frame_tokens * 3 + 1
    assert_equals_reference(encoded, references, 22, model.model.image_newline)
    model(**inputs)  # the placeholders match the features


@pytest.mark.parametrize(("size", "crops"), SIZES_AND_CROPS)
def test_the_processor_counts_what_the_model_gives(compressed, size, crops):
    model, processor = compressed
    inputs = processor(images=random_image(*size, 9), text=chat(processor, "image"), return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert placeholders == crops * (81 + 1)
    assert processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens == [placeholders]
    assert model(**inputs).image_outputs.pooler_output[0].shape[0] == placeholders


def test_without_crop_newlines_an_image_is_its_crops_tokens(tmp_path):
    config = build_onevision_config(visual_tokens=16, crop_newline=False)
    build_model(config).save_pretrained(tmp_path)
    build_onevision_processor(config).save_pretrained(tmp_path)
    model, processor = load_remote(tmp_path)
    inputs = processor(images=random_image(300, 700, 1), text=chat(processor, "image"), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * 16
    assert model(**inputs).image_outputs.pooler_output[0].shape[0] == 3 * 16


def test_a_batch_equals_its_prompts_one_by_one(compressed):
    model, processor = compressed
    images = [random_image(300, 700, 1), random_image(384, 384, 2)]
    prompts = [chat(processor, "image"), chat(processor, "image", question=OTHER_QUESTION)]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    logits = model(**batch).logits
    for row, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        alone = processor(images=image, text=prompt, return_tensors="pt")
        length = alone["input_ids"].shape[1]
        torch.testing.assert_close(logits[row, -length:], model(**alone).logits[0], rtol=0, atol=1e-4)


def test_stock_prompts_are_refused_with_the_budget(compressed, photos):
    model, processor = compressed
    stock_processor = build_onevision_processor(build_onevision_config(reduction_ratio=0))
    inputs = stock_processor(images=photos[0], text=chat(stock_processor, "image"), return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"keeps 81 per crop \(config.reduction_ratio=0.888+\d*\) plus one image_newline"
    ):
        model(**inputs)


def test_budget_override_at_load_keeps_processor_and_model_in_step(compressed, tmp_path):
    model, processor = compressed
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor_again = load_remote(tmp_path, visual_tokens=36)
    assert (again.config.visual_tokens, again.config.frame_tokens, processor_again.visual_tokens) == (36, 10, 36)
    inputs = processor_again(images=random_image(384, 384, 3), text=chat(processor, "image"), return_tensors="pt")
    assert again(**inputs).image_outputs.pooler_output[0].shape[0] == 2 * 37


def test_settings_that_cannot_compress_are_refused():
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        build_onevision_config(vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="keeps no token of the 729 patches"):
        build_onevision_config(reduction_ratio=0.9999)
    with pytest.raises(ValueError, match="needs `num_image_tokens`"):
        processor = build_onevision_processor(build_onevision_config())
        type(processor)(processor.image_processor, processor.tokenizer, processor.video_processor)


def test_an_image_only_prompt_is_guided_by_its_mean_token_or_refused(compressed):
    model, processor = compressed
    inputs = processor(images=random_image(384, 384, 4), text="<image>", return_tensors="pt")
    assert not inputs["guidance_attention_mask"].any()
    references = slow_onevision_images(
        model,
        inputs["pixel_values"],
        inputs["image_sizes"],
        inputs["batch_num_images"],
        [torch.zeros(0)],
        **settings(model.config),
    )
    encoded = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["image_sizes"],
        batch_num_images=inputs["batch_num_images"],
        guidance_input_ids=inputs["guidance_input_ids"],
        guidance_attention_mask=inputs["guidance_attention_mask"],
    )
    torch.testing.assert_close(encoded.pooler_output[0].double(), references[0].tokens, rtol=0, atol=1e-5)
    processor.empty_guidance = "error"
    try:
        with pytest.raises(ValueError, match="have no question"):
            processor(images=random_image(384, 384, 4), text="<image>", return_tensors="pt")
    finally:
        processor.empty_guidance = "cls_similarity"


def test_remote_classes_pipeline_and_generate(compressed, tmp_path):
    model, processor = compressed
    assert type(model).__name__ == "VisionTrimLlavaOnevisionForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules.")
    from transformers import pipeline

    model.save_pretrained(tmp_path / "folder")
    processor.save_pretrained(tmp_path / "folder")
    with working_directory(tmp_path):
        pipe = pipeline("image-text-to-text", model=str(tmp_path / "folder"), trust_remote_code=True)
    image = random_image(300, 700, 1)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    inputs = processor(images=image, text=chat(processor, "image"), return_tensors="pt")
    assert torch.equal(
        inputs["guidance_input_ids"][0], processor.tokenizer(QUESTION, return_tensors="pt").input_ids[0]
    )
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer["content"] == expected


def llava_hf_onevision_source(folder, seed: int = 0):
    """A llava-hf LLaVA-OneVision folder: the stock model's save_pretrained and the stock processor's files."""
    config = build_onevision_config(reduction_ratio=0)
    torch.manual_seed(seed)
    stock = stock_onevision_with_same_weights(build_model(config, seed=seed))
    stock.save_pretrained(folder)
    processor = build_onevision_processor(config)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    stock_files = {
        "processor_config.json": {"num_image_tokens": 729, "vision_feature_select_strategy": "full"},
        "video_preprocessor_config.json": {"size": {"height": 384, "width": 384}, "do_resize": True},
    }
    for name, content in stock_files.items():
        (folder / name).write_text(json.dumps(content))
    return stock


def test_a_llava_hf_folder_converts_without_a_clip_model(tmp_path):
    from visiontrim.tools.convert.cli import main

    stock = llava_hf_onevision_source(tmp_path / "source")
    main(["--llava", str(tmp_path / "source"), "--output", str(tmp_path / "out"), "--tokens", "64"])
    output = tmp_path / "out"
    assert json.loads((output / "config.json").read_text())["model_type"] == "visiontrim_llava_onevision"
    card = " ".join((output / "README.md").read_text().split())
    assert "with 64 of 729 tokens per crop" in card and "keeps 17 of its 196 pooled tokens" in card
    model, processor = load_remote(output)
    weights = model.state_dict()
    assert set(weights) == set(stock.state_dict())
    for key, tensor in stock.state_dict().items():
        assert torch.equal(weights[key], tensor), key
    inputs = processor(images=random_image(300, 700, 1), text=chat(processor, "image"), return_tensors="pt")
    assert model(**inputs).image_outputs.pooler_output[0].shape[0] == 3 * (64 + 1)
    off, off_processor = load_remote(output, reduction_ratio=0)
    off_inputs = off_processor(images=random_image(300, 700, 1), text=chat(processor, "image"), return_tensors="pt")
    stock_inputs = {key: value for key, value in off_inputs.items() if "guidance" not in key}
    torch.testing.assert_close(off(**off_inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)

    with pytest.raises(SystemExit):
        main(
            ["--llava", str(tmp_path / "source"), "--clip", str(tmp_path / "source"), "--output", str(tmp_path / "x")]
        )
    assert not (tmp_path / "x").exists()


def test_the_evaluation_answers_as_generate_at_the_budget_asked(compressed, tmp_path):
    from visiontrim.__main__ import main

    model, processor = compressed
    model.save_pretrained(tmp_path / "folder")
    processor.save_pretrained(tmp_path / "folder")
    pope = Path(__file__).parent / "data" / "pope"
    line = (pope / "llava_pope_test.jsonl").read_text().splitlines()[0]
    (tmp_path / "questions.jsonl").write_text(line + "\n")
    question = json.loads(line)
    (tmp_path / "images").mkdir()
    random_image(300, 700, 1).save(tmp_path / "images" / question["image"])
    main(["eval", "run", "--task", "pope", "--model", str(tmp_path / "folder"), "--questions",
          str(tmp_path / "questions.jsonl"), "--images", str(tmp_path / "images"), "--annotations",
          str(pope / "coco"), "--answers", str(tmp_path / "answers.jsonl"), "--visual-tokens", "36",
          "--max-new-tokens", "4"])  # fmt: skip
    answer = json.loads((tmp_path / "answers.jsonl").read_text())
    again, processor_again = load_remote(tmp_path / "folder", visual_tokens=36)
    image = Image.open(tmp_path / "images" / question["image"]).convert("RGB")
    inputs = processor_again(
        images=image, text=chat(processor_again, "image", question=question["text"]), return_tensors="pt"
    )
    assert int((inputs["input_ids"] == again.config.image_token_id).sum()) == 3 * (36 + 1)
    generated = again.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor_again.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer["question_id"] == question["question_id"] and answer["text"] == expected.strip()


def test_the_lmms_eval_plugin_answers_a_onevision_folder(compressed, tmp_path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    model, processor = compressed
    model.save_pretrained(tmp_path / "folder")
    processor.save_pretrained(tmp_path / "folder")
    lm = get_model("visiontrim")(
        pretrained=str(tmp_path / "folder"), device="cpu", dtype="float32", visual_tokens="36"
    )
    assert lm.model.config.visual_tokens == lm.processor.visual_tokens == 36
    image = random_image(300, 700, 1)
    lm.task_dict = {"pope": {"test": [{"image": image}]}}
    context = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    arguments = (context, {"max_new_tokens": 4}, lambda doc: [doc["image"]], 0, "pope", "test")
    [answer] = lm.generate_until(
        [Instance("generate_until", arguments, 0, {"task": "pope", "doc_id": 0, "repeats": 1})]
    )
    prompt = lm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"<image>\n{context}"}]}], add_generation_prompt=True
    )
    inputs = lm.processor(images=[image], text=[prompt], return_tensors="pt")
    assert lm.processor.tokenizer.decode(inputs["guidance_input_ids"][0]) == context.replace("\n", " ")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * (36 + 1)
    expected = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer == lm.processor.decode(expected, skip_special_tokens=True).strip()


def test_eager_attention_and_bfloat16_run_the_same_compression(compressed, tmp_path):
    model, processor = compressed
    model.save_pretrained(tmp_path / "folder")
    processor.save_pretrained(tmp_path / "folder")
    eager, _ = load_remote(tmp_path / "folder", attn_implementation="eager")
    inputs = processor(images=random_image(300, 700, 1), text=chat(processor, "image"), return_tensors="pt")
    reference = model(**inputs)
    eager_output = eager(**inputs)
    assert torch.equal(eager_output.image_outputs.dominant_indices, reference.image_outputs.dominant_indices)
    torch.testing.assert_close(eager_output.logits, reference.logits, rtol=0, atol=1e-4)
    half, _ = load_remote(tmp_path / "folder", dtype=torch.bfloat16)
    half_inputs = {
        key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in inputs.items()
    }
    output = half(**half_inputs)
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits.float()).all()
    assert output.image_outputs.pooler_output[0].shape == reference.image_outputs.pooler_output[0].shape
    crops = zip(output.image_outputs.dominant_indices, reference.image_outputs.dominant_indices, strict=True)
    for half_crop, crop in crops:
        shared = set(half_crop.tolist()) & set(crop.tolist())
        assert len(shared) >= 0.9 * len(crop)  # bf16 scores may swap a few near ties at the cut, not the selection
