"""
The vLLM plugin serving VisionTrim LLaVA-OneVision folders, as users run it: `LLM(model=folder,
trust_remote_code=True)` and `vllm serve folder --trust-remote-code` with the `openai` client, in vLLM's own
environment (tests/vllm/make_env.sh). The engines run in one subprocess (tests/vllm/jobs.py); the Transformers
references run here, on the same prompts and media.
"""

import pytest
import torch
from PIL import Image
from test_llava_onevision import sharpen_scored_layer
from test_vllm_qwen import assert_served_chats_equal_offline, openai_messages, vllm_media

from visiontrim.tools.build import build_model
from visiontrim.tools.build_onevision import OnevisionShapes, build_onevision_config, build_onevision_processor

from helpers import assert_ranks_answer_as_one, load_remote, loaded, run_jobs


# vLLM's CPU attention needs a head size of at least 32: 64 wide, 2 heads.
SHAPES = OnevisionShapes(llm_heads=2, llm_kv_heads=2)
MAX_TOKENS = 8
LOGPROBS = 5
# The processor outputs whose image features the served model computes (`embed_multimodal`) for the features test.
FEATURE_INPUTS = ("pixel_values", "image_sizes", "guidance_input_ids", "guidance_attention_mask")
VIDEO_FEATURE_INPUTS = ("pixel_values_videos", "video_guidance_input_ids", "video_guidance_attention_mask")


def chat(question: str, images: int = 0, videos: int = 0) -> str:
    """A OneVision (ChatML) prompt: one user turn, each medium on its own line, then the question."""
    markers = "<image>\n" * images + "<video>\n" * videos
    return f"<|im_start|>user\n{markers}{question}<|im_end|>\n<|im_start|>assistant\n"


# A wide and a tall image (different crop grids), two images in one prompt, a video, and an image with a video.
BATCH = [
    {"prompt": chat("What animal is this?", 1), "images": ["cat"]},
    {"prompt": chat("Is the cup tall?", 1), "images": ["tall"]},
    {"prompt": chat("Compare the two pictures.", 2), "images": ["square", "cup"]},
    {"prompt": chat("What happens in the video?", videos=1), "videos": ["clip"]},
    {"prompt": chat("Is the cat of the picture in the video?", 1, 1), "images": ["cat"], "videos": ["clip"]},
]


def save_folder(folder, **compression):
    """A tiny OneVision folder (its scored layer sharpened, see `sharpen_scored_layer`)."""
    config = build_onevision_config(SHAPES, **compression)
    model = build_model(config, seed=3)
    sharpen_scored_layer(model)
    model.save_pretrained(folder)
    build_onevision_processor(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """The Qwen serving tests' media: images of four sizes, a 4-frame clip (frames, .npy and MPEG-4)."""
    return vllm_media(tmp_path_factory.mktemp("vllm-onevision-media"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vllm-onevision")
    return {
        "onevision": save_folder(work / "onevision"),
        "uncompressed": save_folder(work / "uncompressed", reduction_ratio=0),
    }


@pytest.fixture(scope="module")
def engines(vllm_python, folders, media, tmp_path_factory) -> dict[str, dict]:
    """
    The offline engines, in one process: "onevision" (the batch with log-probs, the image features of processor
    outputs made here, and the OpenAI-style chats the server test sends), "uncompressed" (reduction_ratio=0: vLLM's
    own OneVision path) and, last, "parallel" (the "onevision" folder on two tensor-parallel ranks, SigLIP's and the
    LLM's heads split between them): the batch.
    """
    work = tmp_path_factory.mktemp("vllm-onevision-engines")
    _, processor = load_remote(folders["onevision"])
    common = {
        "images": media["images"],
        "videos": media["videos"],
        "limit_mm_per_prompt": {"image": 2, "video": 1},
        "placeholder_ids": processor.tokenizer.convert_tokens_to_ids(["<image>", "<video>"]),
        "max_tokens": MAX_TOKENS,
        "rounds": [BATCH],
        "logprobs": LOGPROBS,
    }
    images = [Image.open(media["images"][name]).convert("RGB") for name in ("cat", "tall")]
    prompts = [BATCH[0]["prompt"], BATCH[1]["prompt"]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    video = processor(videos=[media["frames"]], text=BATCH[3]["prompt"], return_tensors="pt")
    features_input = {name: inputs[name] for name in FEATURE_INPUTS}
    features_input.update({name: video[name] for name in VIDEO_FEATURE_INPUTS})
    torch.save(features_input, work / "features_input.pt")
    jobs = {
        "onevision": {
            "model": str(folders["onevision"]),
            **common,
            "messages": openai_messages(media),
            "features_input": str(work / "features_input.pt"),
            "features_output": str(work / "features_output.pt"),
        },
        # Stock counts: the two-image prompt is over 2,048 tokens.
        "uncompressed": {"model": str(folders["uncompressed"]), **common, "engine": {"max_model_len": 8192}},
        "parallel": {"model": str(folders["onevision"]), **common, "tensor_parallel_size": 2},
    }
    results = run_jobs(vllm_python, work, jobs)
    results["onevision"]["features_input"] = features_input
    results["onevision"]["features"] = torch.load(work / "features_output.pt")
    return results


def transformers_inputs(processor, entry: dict, media: dict):
    """The Transformers processor's inputs of a batch entry (its images listed flat: vLLM crops each one)."""
    images = [Image.open(media["images"][name]).convert("RGB") for name in entry.get("images", [])]
    videos = [media["frames"] for _ in entry.get("videos", [])]
    return processor(images=images or None, videos=videos or None, text=entry["prompt"], return_tensors="pt")


@pytest.mark.parametrize("name", ["onevision", "uncompressed"])
def test_prompts_tokens_and_log_probs_equal_transformers(engines, folders, media, name):
    result = loaded(engines[name])["rounds"][0]
    model, processor = load_remote(folders[name])
    for index, entry in enumerate(BATCH):
        inputs = transformers_inputs(processor, entry, media)
        assert result["prompt_ids"][index] == inputs["input_ids"][0].tolist(), entry["prompt"]
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert result["tokens"][index] == output[0, inputs["input_ids"].shape[1] :].tolist(), entry["prompt"]
        # vLLM's environment resizes with torchvision, this one with Pillow (bicubic, up to 1.5e-2 apart normalised):
        # the features of the same pixels agree to 1e-4 (below), the log-probs of these prompts to 2e-3.
        reference = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
        for token, logprob in result["logprobs"][index].items():
            assert abs(logprob - reference[int(token)].item()) < 5e-3, (entry["prompt"], token)


def test_served_image_and_video_features_of_the_same_pixels_equal_transformers(engines, folders):
    result = loaded(engines["onevision"])
    model, _ = load_remote(folders["onevision"])
    inputs = result["features_input"]
    expected = list(model.model.get_image_features(**{name: inputs[name] for name in FEATURE_INPUTS}).pooler_output)
    expected += list(
        model.model.get_video_features(**{name: inputs[name] for name in VIDEO_FEATURE_INPUTS}).pooler_output
    )
    assert [tokens.shape[0] for tokens in expected] == [3 * 82, 3 * 82, 4 * 22 + 1]
    assert len(result["features"]) == 3
    for served, reference in zip(result["features"], expected, strict=True):
        assert served.shape == reference.shape
        torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_placeholders_are_the_kept_tokens(engines, folders, media):
    result = loaded(engines["onevision"])["rounds"][0]
    _, processor = load_remote(folders["onevision"])
    frames = len(media["frames"])
    crops = [
        processor._get_num_multimodal_tokens(image_sizes=[Image.open(media["images"][name]).size[::-1]])
        for name in ("cat", "tall", "square", "cup")
    ]
    cat, tall, square, cup = (counts.num_image_tokens[0] for counts in crops)
    assert all(count % 82 == 0 for count in (cat, tall, square, cup))
    video = frames * 22 + 1
    assert result["placeholders"] == [cat, tall, square + cup, video, cat + video]


def test_two_tensor_parallel_ranks_answer_as_one(engines):
    # The scored layer's queries and keys are gathered from both ranks: DVTS sees every head, as on one rank.
    assert_ranks_answer_as_one(loaded(engines["parallel"])["rounds"][0], loaded(engines["onevision"])["rounds"][0])


def test_vllm_serve_answers_openai_image_and_video_chats_like_offline(vllm_python, folders, media, engines, tmp_path):
    log = assert_served_chats_equal_offline(
        vllm_python, folders["onevision"], media, loaded(engines["onevision"]), tmp_path
    )
    assert "no user-turn marker" not in log
