"""
Video: VisionTrim Video-LLaVA and LLaVA-NeXT-Video (tiny random models built in code, synthetic clips written here):
per-frame compression equal to the image path, placeholder counts, mixed image + video batches, compression off equal
to the stock classes, save/load through `trust_remote_code`, and the video-QA evaluation end to end.
"""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from visiontrim.__main__ import main
from visiontrim.tools.build import build_config, build_model, build_processor, stock_llava_with_same_weights
from visiontrim.tools.build import stock_processor as build_stock_processor
from visiontrim.tools.evaluation.normalize import normalize_vqa_answer
from visiontrim.tools.evaluation.video import exact_match_accuracy, sample_frames

from helpers import NON_DEFAULT_SETTINGS, QUESTION_PROMPT, load_remote, refused


ARCHS = ("video-llava", "llava-next-video")
VIDEO_PROMPT = "USER: <video>\nWhat is the square doing? ASSISTANT:"
OTHER_VIDEO_PROMPT = "USER: <video>\nWhat colour is the background? ASSISTANT:"
# Stock tokens per frame: Video-LLaVA keeps CLS (16 x 16 + 1), LLaVA-NeXT-Video pools 24 x 24 to 12 x 12.
STOCK_TOKENS_PER_FRAME = {"video-llava": 257, "llava-next-video": 144}


def synthetic_clip(frames: int, seed: int = 0, height: int = 90, width: int = 120) -> np.ndarray:
    """`(frames, height, width, 3)` uint8: a square moving right over a seeded random background."""
    rng = np.random.default_rng(seed)
    clip = np.repeat(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), frames, axis=0)
    for index in range(frames):
        left = (index * 9) % (width - 30)
        clip[index, 30:60, left : left + 30] = (255, 40, 40)
    return clip


def write_clip(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Encodes `frames` to an MPEG-4 file with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def built(request):
    """(arch, model, processor) with the default budget, in memory."""
    config = build_config(arch=request.param)
    return request.param, build_model(config), build_processor(config)


def video_features(model, inputs, index: int | None = None):
    """`get_video_features` of the whole batch, or of video `index` alone with its own guidance row."""
    rows = slice(None) if index is None else slice(index, index + 1)
    return model.model.get_video_features(
        inputs["pixel_values_videos"][rows],
        video_guidance_input_ids=inputs["video_guidance_input_ids"][rows],
        video_guidance_attention_mask=inputs["video_guidance_attention_mask"][rows],
    )


def test_each_frame_is_compressed_as_the_image_path_compresses_it_alone():
    config = build_config(arch="video-llava")
    model, processor = build_model(config), build_processor(config)
    inner = model.model  # one tower and one CLIP head for both paths, so the two must agree exactly
    inner.image_tower.load_state_dict(inner.video_tower.state_dict())
    inner.visual_projection.load_state_dict(inner.video_visual_projection.state_dict())
    inner.logit_scale.data.copy_(inner.video_logit_scale.data)
    inputs = processor(text=VIDEO_PROMPT, videos=synthetic_clip(4))
    video = video_features(model, inputs)

    assert video.pooler_output.shape == (4, config.visual_tokens, config.text_config.hidden_size)
    for frame in range(4):
        image = inner.get_image_features(
            inputs["pixel_values_videos"][0, frame : frame + 1],
            guidance_input_ids=inputs["video_guidance_input_ids"],
            guidance_attention_mask=inputs["video_guidance_attention_mask"],
        )
        assert torch.equal(video.dominant_indices[frame], image.dominant_indices[0])
        assert torch.equal(video.complement_seed_indices[frame], image.complement_seed_indices[0])
        torch.testing.assert_close(video.pooler_output[frame], image.pooler_output[0], rtol=0, atol=1e-5)
    assert not torch.equal(video.dominant_indices[0], video.dominant_indices[3])  # the square moved


def test_each_frame_of_a_llava_next_video_is_compressed_on_its_own_unpooled():
    config = build_config(arch="llava-next-video")
    model, processor = build_model(config), build_processor(config)
    inputs = processor(text=VIDEO_PROMPT, videos=synthetic_clip(3))
    video = video_features(model, inputs)
    tokens = config.visual_tokens
    assert video.pooler_output.shape == (1, 3 * tokens, config.text_config.hidden_size)  # 64 of 576, not pooled
    for frame in range(3):
        alone = model.model.get_video_features(
            inputs["pixel_values_videos"][:, frame : frame + 1],
            video_guidance_input_ids=inputs["video_guidance_input_ids"],
            video_guidance_attention_mask=inputs["video_guidance_attention_mask"],
        )
        assert torch.equal(video.dominant_indices[frame], alone.dominant_indices[0])
        torch.testing.assert_close(
            video.pooler_output[0, frame * tokens : (frame + 1) * tokens], alone.pooler_output[0], rtol=0, atol=1e-5
        )
    assert int(video.dominant_indices.max()) >= 144  # indices of the 24 x 24 grid, beyond the pooled 12 x 12


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_processor_and_model_count_the_same_tokens(built, frames):
    arch, model, processor = built
    inputs = processor(text=VIDEO_PROMPT, videos=synthetic_clip(frames))
    placeholders = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert (
        placeholders
        == frames * model.config.visual_tokens
        == frames * {"video-llava": 28, "llava-next-video": 64}[arch]
    )
    features = video_features(model, inputs).pooler_output
    assert features.numel() // features.shape[-1] == placeholders
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]

    stock_inputs = build_stock_processor(processor)(text=VIDEO_PROMPT, videos=synthetic_clip(frames))
    stock_placeholders = int((stock_inputs["input_ids"] == model.config.video_token_id).sum())
    assert stock_placeholders == frames * STOCK_TOKENS_PER_FRAME[arch]


def mixed_batch(processor, photo):
    """Two videos (different questions) and one image, in three prompts."""
    return processor(
        text=[VIDEO_PROMPT, QUESTION_PROMPT, OTHER_VIDEO_PROMPT],
        videos=[synthetic_clip(4, seed=1), synthetic_clip(4, seed=2)],
        images=[photo],
        padding=True,
    )


def test_images_and_videos_in_one_batch(built, photos):
    arch, model, processor = built
    inputs = mixed_batch(processor, photos[0])
    assert inputs["video_guidance_input_ids"].shape[0] == 2 and inputs["guidance_input_ids"].shape[0] == 1
    batch = video_features(model, inputs).pooler_output
    for index in range(2):  # each video with its own question, as if alone
        alone = video_features(model, inputs, index).pooler_output
        rows = batch[index * 4 : index * 4 + 4] if arch == "video-llava" else batch[index : index + 1]
        torch.testing.assert_close(rows, alone, rtol=0, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, inputs["input_ids"].shape[1] + 3)


def test_videos_with_different_frame_counts_are_refused_clearly(built):
    _, _, processor = built
    with pytest.raises(ValueError, match=r"\[4, 6\] frames: the videos of one batch need the same number of frames"):
        processor(text=[VIDEO_PROMPT, VIDEO_PROMPT], videos=[synthetic_clip(4), synthetic_clip(6)], padding=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_compression_off_equals_the_stock_class(arch, photos):
    config = build_config(arch=arch, reduction_ratio=0)
    model, processor = build_model(config), build_processor(config)
    stock, stock_processor = stock_llava_with_same_weights(model), build_stock_processor(processor)
    assert type(stock).__name__ == {"video-llava": "VideoLlava", "llava-next-video": "LlavaNextVideo"}[arch] + (
        "ForConditionalGeneration"
    )
    inputs = mixed_batch(processor, photos[0])
    stock_inputs = mixed_batch(stock_processor, photos[0])
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    if arch == "video-llava":  # the stock processor returns the images under their deprecated name
        stock_inputs["pixel_values"] = stock_inputs.pop("pixel_values_images")
    torch.testing.assert_close(model(**inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=4, do_sample=False),
        stock.generate(**stock_inputs, max_new_tokens=4, do_sample=False),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path, photos):
    config = build_config(arch=arch, visual_tokens=12, **NON_DEFAULT_SETTINGS)
    model, processor = build_model(config, seed=3), build_processor(config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_remote(tmp_path)

    assert type(loaded).__name__ == type(model).__name__ and loaded is not model
    assert type(loaded_processor.video_processor).__name__ == "VisionTrimVideoProcessor"
    assert loaded.config.visual_tokens == loaded_processor.visual_tokens == 12
    for name, value in NON_DEFAULT_SETTINGS.items():
        assert getattr(loaded.config, name) == value, name
    saved = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    inputs = mixed_batch(processor, photos[0])
    assert torch.equal(inputs["input_ids"], mixed_batch(loaded_processor, photos[0])["input_ids"])
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_video_inputs_errors_say_what_to_change(built):
    arch, model, processor = built
    inputs = processor(text=VIDEO_PROMPT, videos=synthetic_clip(2))
    without_guidance = {key: value for key, value in inputs.items() if not key.startswith("video_guidance")}
    with pytest.raises(ValueError, match="pass `video_guidance_input_ids` and `video_guidance_attention_mask`"):
        model(**without_guidance)
    one_placeholder_short = inputs["input_ids"].clone()
    last_placeholder = (one_placeholder_short[0] == model.config.video_token_id).nonzero()[-1]
    one_placeholder_short[0, last_placeholder] = 6  # a text token
    with pytest.raises(ValueError, match=f"this model keeps {model.config.visual_tokens} per video frame"):
        model(**dict(inputs, input_ids=one_placeholder_short))
    with pytest.raises(ValueError, match=r"expected \(videos, frames, channels, height, width\)"):
        model(**dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][0]))
    with pytest.raises(ValueError, match=r"not a file path or URL: decode it first.*sample_frames"):
        processor(text=VIDEO_PROMPT, videos="clip.mp4")


def test_frames_are_sampled_uniformly_with_pyav(tmp_path):
    frames = np.stack([np.full((48, 64, 3), 10 * index, dtype=np.uint8) for index in range(20)])
    sampled = sample_frames(write_clip(tmp_path / "ramp.mp4", frames), 8)
    assert sampled.shape == (8, 48, 64, 3) and sampled.dtype == np.uint8
    expected = np.linspace(0, 19, 8, dtype=int) * 10  # frames 0, 2, 5, 8, 10, 13, 16, 19
    np.testing.assert_allclose(sampled.reshape(8, -1).mean(axis=1), expected, atol=4)  # MPEG-4 rounding


def test_video_qa_runs_end_to_end_and_scores_exact_match(tmp_path):
    config = build_config(arch="video-llava")
    build_model(config).save_pretrained(tmp_path / "model")
    build_processor(config).save_pretrained(tmp_path / "model")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "clip_a.mp4", synthetic_clip(12, seed=1))
    write_clip(videos / "clip_b.avi", synthetic_clip(9, seed=2))
    questions = [
        {"video_name": "clip_a", "question": "what is moving?", "question_id": "q1"},
        {"video_name": "clip_b", "question": "what colour is the square?", "question_id": "q2"},
    ]
    answers = [{"answer": "square", "question_id": "q1", "type": 0}, {"answer": "red", "question_id": "q2", "type": 1}]
    (tmp_path / "test_q.json").write_text(json.dumps(questions))
    (tmp_path / "test_a.json").write_text(json.dumps(answers))
    output = tmp_path / "answers.json"

    main(["eval", "video-run", "--task", "msvd_qa", "--model", str(tmp_path / "model"),
          "--questions", str(tmp_path / "test_q.json"), "--gt-answers", str(tmp_path / "test_a.json"),
          "--videos", str(videos), "--frames", "4", "--max-new-tokens", "3", "--answers", str(output)])  # fmt: skip

    written = json.loads(output.read_text())
    assert [entry["video_name"] for entry in written] == ["clip_a", "clip_b"]
    for entry, answer in zip(written, answers, strict=True):
        assert {"video_name", "Q", "A", "pred", "id", "question", "answer"} <= set(entry)
        assert entry["A"] == entry["answer"] == answer["answer"] and isinstance(entry["pred"], str)
    scores = json.loads(output.with_suffix(".scores.json").read_text())
    expected = 100 * sum(normalize_vqa_answer(entry["pred"]) == entry["A"] for entry in written) / 2
    assert scores["metrics"]["all"] == {"exact_match": expected, "answers": 2}

    written[0]["pred"], written[1]["pred"] = "The square.", "blue"  # normalised: "square" matches, "blue" does not
    output.write_text(json.dumps(written))
    main(["eval", "video-score", "--answers", str(output), "--output", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())["metrics"]
    assert scores["all"] == {"exact_match": 50.0, "answers": 2}
    assert scores["type_0"]["exact_match"] == 100.0 and scores["type_1"]["exact_match"] == 0.0
    assert exact_match_accuracy(written) == scores


def test_video_qa_files_that_do_not_match_are_refused(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "q.json").write_text(json.dumps([{"video_name": "a", "question": "q?", "question_id": 1}]))
    (tmp_path / "a.json").write_text(json.dumps([{"answer": "x", "question_id": 2}]))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # never loaded: the files are refused first
    with refused(capsys, "entry 0 answers question_id 2 but .* entry 0 is 1"):
        main(["eval", "video-run", "--model", str(tmp_path / "model"), "--questions", str(tmp_path / "q.json"),
              "--gt-answers", str(tmp_path / "a.json"), "--videos", str(tmp_path / "videos"),
              "--answers", str(tmp_path / "out.json")])  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_llm_stage_keeps_its_tokens_per_video(arch):
    config = build_config(arch=arch, llm_stage_layer=1, llm_stage_tokens=16)
    model, processor = build_model(config), build_processor(config)
    inputs = processor(
        text=[VIDEO_PROMPT, OTHER_VIDEO_PROMPT],
        videos=[synthetic_clip(4, seed=1), synthetic_clip(4, seed=2)],
        padding=True,
    )
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    pruning = generated.cache.visiontrim_pruning
    video_tokens = (inputs["input_ids"] == config.video_token_id).sum(dim=1)
    assert video_tokens.tolist() == [4 * config.visual_tokens] * 2
    # Each row keeps its text (padding included, masked) and 16 of its video's tokens.
    assert pruning.index.shape == (2, inputs["input_ids"].shape[1] - (4 * config.visual_tokens - 16))
    kept_video = (inputs["input_ids"].gather(1, pruning.index) == config.video_token_id) & pruning.valid
    assert kept_video.sum(dim=1).tolist() == [16, 16]
