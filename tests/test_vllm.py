"""
The vLLM plugin (`visiontrim.serving`), run as users run it: `LLM(model=folder, trust_remote_code=True)` and
`vllm serve folder --trust-remote-code`, in vLLM's own environment (tests/vllm/make_env.sh; `.ci/run` builds it at
`.venv-vllm`). Each engine runs in a subprocess (tests/vllm/jobs.py); the Transformers references run here. LLaVA-1.5,
LLaVA-NeXT and LLaVA-NeXT-Video (videos) folders are served; the LLM stage and Video-LLaVA (no vLLM model) are refused
at load. Qwen folders: tests/test_vllm_qwen.py and tests/test_vllm_qwen3.py; LLaVA-OneVision: test_vllm_onevision.py.

Without that environment these tests are skipped, unless VISIONTRIM_REQUIRE_VLLM=1 (CI), which makes them fail.
"""

import base64
import json
import os
import urllib.request
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from visiontrim.serving.weight_names import vllm_weight_name
from visiontrim.tools.build import (
    Shapes,
    build_config,
    build_model,
    build_processor,
    stock_llava_with_same_weights,
    stock_processor,
)
from visiontrim.tools.demo import sample_photo
from visiontrim.tools.vllm_server import image_chat_request, vllm_server

from helpers import load_remote, loaded, run_jobs


# vLLM's CPU attention needs a head size of at least 32: 64 wide, 2 heads.
VLLM_SHAPES = Shapes(llm_heads=2, llm_kv_heads=2)
IMAGE_TOKEN_ID = 4
MAX_TOKENS = 8
CAT_QUESTION = "What animal is in the picture?"
CUP_QUESTION = "Is there a cup of coffee on the table? Answer with one word."
PAIR_QUESTION = "What differs between the two pictures?"
OTHER_QUESTION = "What colour is the background?"
LONG_QUESTION = "Is the cat on the left of the red sofa, next to the window? " * 8
LOGPROBS = 5
# The image processor backend of the Transformers side: vLLM's environment has torchvision, so the folder's
# `CLIPImageProcessor` would preprocess with torchvision there and with Pillow here (no torchvision), whose bicubic
# resizes differ by up to 1.5e-2 (normalised); enough to change a kept token of some images.
PIL_BACKEND = {"backend": "pil"}


def prompt(question: str, num_images: int = 1) -> str:
    return "USER: " + "<image>\n" * num_images + f"{question} ASSISTANT:"


# LLaVA-NeXT-Video: two clips panning across the photos (4 and 6 frames, so vLLM passes them as a list), each asked
# its own question, in one batch.
CLIP_FRAMES = {"cat": 4, "cup": 6}
VIDEO_BATCH = [
    {"prompt": "USER: <video>\nWhat does the animal do? ASSISTANT:", "videos": ["cat"]},
    {"prompt": "USER: <video>\nWhat is on the table? ASSISTANT:", "videos": ["cup"]},
]


def pan(photo: str, frames: int) -> numpy.ndarray:
    """`(frames, height, width, 3)` uint8 frames: a window of half the photo's width moving across it."""
    image = numpy.asarray(Image.open(photo).convert("RGB"))
    width = image.shape[1] // 2
    starts = numpy.linspace(0, image.shape[1] - width, frames).astype(int)
    return numpy.stack([image[:, start : start + width] for start in starts])


# Prompts with different images, questions and image counts, as one batch.
BATCH = [
    {"prompt": prompt(CAT_QUESTION), "images": ["cat"]},
    {"prompt": prompt(CUP_QUESTION), "images": ["cup"]},
    {"prompt": prompt(PAIR_QUESTION, 2), "images": ["cup", "cat"]},
]


def save_folder(
    folder: Path, stock: bool = False, arch: str = "llava", shapes: Shapes = VLLM_SHAPES, **compression
) -> Path:
    config = build_config(shapes, arch=arch, **compression)
    model, processor = build_model(config, seed=0), build_processor(config)
    if stock:
        model, processor = stock_llava_with_same_weights(model), stock_processor(processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if stock:  # Transformers 5.24 saves `vision_tower.embeddings.*`; vLLM's own LLaVA reads llava-hf's names only
        weights = load_file(folder / "model.safetensors")
        save_file({vllm_weight_name(name): weight for name, weight in weights.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny VisionTrim LLaVA-1.5 folder, 64 of 576 tokens per image."""
    return save_folder(tmp_path_factory.mktemp("vllm-visiontrim"))


@pytest.fixture(scope="module")
def photos() -> dict[str, str]:
    return {"cat": str(sample_photo("chelsea.jpg")), "cup": str(sample_photo("coffee.jpg"))}


def transformers_greedy(folder: Path, entries: list[dict], photos: dict[str, str]) -> list[list[int]]:
    """Greedy tokens of Transformers `generate` on the folder (remote code), one prompt at a time."""
    model, processor = load_remote(folder)
    tokens = []
    for entry in entries:
        images = [Image.open(photos[name]).convert("RGB") for name in entry["images"]]
        inputs = processor(images=images, text=entry["prompt"], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(output[0, inputs["input_ids"].shape[1] :].tolist())
    return tokens


@pytest.fixture(scope="module")
def engines(vllm_python, folder, photos, tmp_path_factory) -> dict[str, dict]:
    """
    Every offline engine of these tests, in one process:
    - "offline", on `folder`: the mixed batch, then the cache rounds (the cat and the same question; the cat and
      another question; the cat with that other question given as `mm_processor_kwargs`), the image features of
      processor outputs made here, and a chat request;
    - "uncompressed" (reduction_ratio=0) and "stock" (vLLM's own LLaVA, same weights): the mixed batch;
    - "next" (a VisionTrim LLaVA-NeXT folder): the mixed batch;
    - "next-video" (a VisionTrim LLaVA-NeXT-Video folder): two videos asked different questions, with log-probs;
    - "staged" (the LLM stage on), "video" (Video-LLaVA) and "narrow" (LLM heads of 16): folders the plugin refuses;
    - "parallel", last: `folder` on two tensor-parallel ranks (the CLIP tower's heads split between them), the batch.
    """
    work = tmp_path_factory.mktemp("vllm-engines")
    _, processor = load_remote(folder)
    images = [Image.open(photos[name]).convert("RGB") for name in ("cat", "cup")]
    inputs = processor(
        images=images, text=[prompt(CAT_QUESTION), prompt(CUP_QUESTION)], padding=True, return_tensors="pt"
    )
    features_input = {name: inputs[name] for name in ("pixel_values", "guidance_input_ids", "guidance_attention_mask")}
    torch.save(features_input, work / "features_input.pt")
    batch_job = {"images": photos, "rounds": [BATCH]}
    clips = {}
    for name, frames in CLIP_FRAMES.items():
        numpy.save(work / f"{name}.npy", pan(photos[name], frames))
        clips[name] = {"path": str(work / f"{name}.npy"), "fps": 1.0}
    next_video_folder = save_folder(work / "next-video", arch="llava-next-video")
    _, next_video_processor = load_remote(next_video_folder)
    jobs = {
        "offline": {
            "model": str(folder),
            "images": photos,
            "count_encoder": True,
            "logprobs": LOGPROBS,
            "engine": {"mm_processor_kwargs": PIL_BACKEND},
            "rounds": [
                BATCH,
                [{"prompt": prompt(CAT_QUESTION), "images": ["cat"]}],
                [{"prompt": prompt(OTHER_QUESTION), "images": ["cat"]}],
                [
                    {
                        "prompt": prompt(CAT_QUESTION),
                        "images": ["cat"],
                        "mm_processor_kwargs": {"guidance_text": OTHER_QUESTION},
                    }
                ],
            ],
            "chat": [{"images": ["cat"], "text": CAT_QUESTION}],
            "features_input": str(work / "features_input.pt"),
            "features_output": str(work / "features_output.pt"),
        },
        "uncompressed": {"model": str(save_folder(work / "uncompressed", reduction_ratio=0)), **batch_job},
        "stock": {"model": str(save_folder(work / "stock", stock=True, reduction_ratio=0)), **batch_job},
        "next": {"model": str(save_folder(work / "next", arch="llava-next")), **batch_job},
        "staged": {"model": str(save_folder(work / "staged", llm_stage_layer=1, llm_stage_tokens=32))},
        "video": {"model": str(save_folder(work / "video", arch="video-llava"))},
        "next-video": {
            "model": str(next_video_folder),
            "videos": clips,
            "rounds": [VIDEO_BATCH],
            "limit_mm_per_prompt": {"video": 1},
            "logprobs": LOGPROBS,
            "placeholder_ids": [next_video_processor.tokenizer.convert_tokens_to_ids("<video>")],
        },
        "narrow": {"model": str(save_folder(work / "narrow", shapes=Shapes()))},  # LLM head size 16
        "parallel": {"model": str(folder), "tensor_parallel_size": 2, **batch_job},
    }
    defaults = {"image_token_id": IMAGE_TOKEN_ID, "max_tokens": MAX_TOKENS}
    results = run_jobs(vllm_python, work, {name: {**defaults, **job} for name, job in jobs.items()})
    results["offline"]["features_input"] = features_input
    results["offline"]["features"] = torch.load(work / "features_output.pt")
    for name in ("offline", "uncompressed", "stock", "next", "next-video"):
        results[name]["folder"] = Path(jobs[name]["model"])
    return results


@pytest.fixture(scope="module")
def offline(engines) -> dict:
    return loaded(engines["offline"])


def test_placeholders_are_the_kept_tokens(offline):
    # 64 per image, as VisionTrimProcessor emits; the third prompt has two images.
    assert offline["rounds"][0]["placeholders"] == [64, 64, 128]


def test_greedy_tokens_equal_transformers_generate(offline, folder, photos):
    assert offline["rounds"][0]["tokens"] == transformers_greedy(folder, BATCH, photos)


def test_first_step_log_probs_equal_transformers_for_every_prompt(offline, folder, photos):
    # With the same image preprocessing (Pillow on both sides) every prompt agrees to ~1e-6; with torchvision on
    # vLLM's side one of these prompts moved by 1.1e-3 (a different kept token).
    model, processor = load_remote(folder)
    for entry, served in zip(BATCH, offline["rounds"][0]["logprobs"], strict=True):
        images = [Image.open(photos[name]).convert("RGB") for name in entry["images"]]
        inputs = processor(images=images, text=entry["prompt"], return_tensors="pt")
        reference = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
        for token, logprob in served.items():
            assert abs(logprob - reference[int(token)].item()) < 1e-4


def test_features_equal_transformers(offline, folder):
    model, _ = load_remote(folder)
    inputs = offline["features_input"]
    expected = model.model.get_image_features(
        pixel_values=inputs["pixel_values"],
        guidance_input_ids=inputs["guidance_input_ids"],
        guidance_attention_mask=inputs["guidance_attention_mask"],
    ).pooler_output
    assert len(offline["features"]) == 2
    for served, reference in zip(offline["features"], expected, strict=True):
        assert served.shape == reference.shape == (64, VLLM_SHAPES.llm_hidden)
        torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_encoder_cache_is_keyed_by_image_and_question(offline, folder, photos):
    encoded = [round_["encoded_images"] for round_ in offline["rounds"]]
    # The batch encodes 4 images (the cat twice: two questions); the same cat and question again encodes nothing; a
    # new question encodes the cat again; that question given as mm_processor_kwargs is the same cache entry.
    assert encoded == [4, 4, 5, 5]
    other = {"prompt": prompt(OTHER_QUESTION), "images": ["cat"]}
    assert offline["rounds"][2]["tokens"] == transformers_greedy(folder, [other], photos)
    # The override guides TGVC: its answer is the one to the other question's compression of the cat.
    overridden = transformers_greedy_with_guidance(folder, prompt(CAT_QUESTION), OTHER_QUESTION, photos["cat"])
    assert offline["rounds"][3]["tokens"] == [overridden]


def transformers_greedy_with_guidance(folder: Path, text: str, guidance: str, photo: str) -> list[int]:
    model, processor = load_remote(folder)
    inputs = processor(
        images=[Image.open(photo).convert("RGB")], text=text, guidance_text=guidance, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_no_compression_equals_stock_vllm_llava(engines):
    uncompressed, stock = loaded(engines["uncompressed"]), loaded(engines["stock"])
    assert json.loads((stock["folder"] / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    assert uncompressed["rounds"] == stock["rounds"]
    assert uncompressed["rounds"][0]["placeholders"] == [576, 576, 1152]


def test_llm_stage_is_refused_at_load(engines):
    error = engines["staged"]["load_error"]
    assert "LLM stage on (llm_stage_layer=1)" in error
    assert "does not run" in error


def served_tokens(answer: dict) -> list[int]:
    return [int(entry["token"].removeprefix("token_id:")) for entry in answer["choices"][0]["logprobs"]["content"]]


def test_vllm_serve_answers_a_chat_completion_like_offline(vllm_python, folder, photos, offline, tmp_path):
    options = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0"]
    options.append("--trust-request-mm-kwargs")  # without it, vLLM refuses a request's mm_processor_kwargs
    options += ["--mm-processor-kwargs", json.dumps(PIL_BACKEND)]  # as the offline engine
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    vllm = Path(vllm_python).parent / "vllm"
    log = tmp_path / "serve.log"
    image_url = "data:image/jpeg;base64," + base64.b64encode(Path(photos["cat"]).read_bytes()).decode()
    tokens_out = {"logprobs": True, "return_tokens_as_token_ids": True}
    answers = []
    with vllm_server(vllm, str(folder), log, options, 300, cwd=tmp_path, env=environment) as port:
        for question, extra in (
            (CAT_QUESTION, {}),
            (CAT_QUESTION, {"mm_processor_kwargs": {"guidance_text": OTHER_QUESTION}}),
            (LONG_QUESTION, {}),
        ):
            http_request = image_chat_request(
                port, str(folder), image_url, question, MAX_TOKENS, **tokens_out, **extra
            )
            with urllib.request.urlopen(http_request, timeout=120) as response:
                answers.append(json.loads(response.read()))
    assert served_tokens(answers[0]) == offline["chat"][0]
    assert answers[0]["usage"]["prompt_tokens"] == offline["chat_prompt_tokens"][0]
    # A request's own guidance text guides TGVC as the offline override does.
    assert served_tokens(answers[1]) == offline["rounds"][3]["tokens"][0]
    # A question past CLIP's 77 positions is answered, and the log says TGVC saw its start only.
    assert served_tokens(answers[2]) and answers[2]["usage"]["prompt_tokens"] > answers[0]["usage"]["prompt_tokens"]
    assert "longer than the 77 the guidance takes" in log.read_text()
    # Chat requests and vLLM's own profiling prompt are in a format whose question the plugin finds: no warning.
    assert "no user-turn marker" not in log.read_text()


def test_llava_next_placeholders_and_greedy_tokens_equal_transformers(engines, photos):
    # Anyres: the cat (451x300) and the cup (600x400) pick different crop grids; each crop keeps 64 tokens + newline.
    result = loaded(engines["next"])
    _, processor = load_remote(result["folder"])
    expected_placeholders = []
    for entry in BATCH:
        sizes = [Image.open(photos[name]).size[::-1] for name in entry["images"]]
        expected_placeholders.append(sum(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens))
    assert result["rounds"][0]["placeholders"] == expected_placeholders
    assert len(set(expected_placeholders[:2])) == 2 and all(count % 65 == 0 for count in expected_placeholders)
    assert result["rounds"][0]["tokens"] == transformers_greedy(result["folder"], BATCH, photos)


def test_llava_next_video_tokens_and_log_probs_equal_transformers(engines, photos):
    # Each frame keeps 64 tokens on its full patch grid (no pooling), guided by its video's question.
    result = loaded(engines["next-video"])
    model, processor = load_remote(result["folder"])
    assert result["rounds"][0]["placeholders"] == [frames * 64 for frames in CLIP_FRAMES.values()]
    for index, entry in enumerate(VIDEO_BATCH):
        name = entry["videos"][0]
        inputs = processor(videos=[pan(photos[name], CLIP_FRAMES[name])], text=entry["prompt"], return_tensors="pt")
        assert result["rounds"][0]["prompt_ids"][index] == inputs["input_ids"][0].tolist()
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert result["rounds"][0]["tokens"][index] == output[0, inputs["input_ids"].shape[1] :].tolist()
        reference = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
        for token, logprob in result["rounds"][0]["logprobs"][index].items():
            assert abs(logprob - reference[int(token)].item()) < 1e-3


def test_an_unserved_visiontrim_architecture_is_refused_naming_what_is_served(engines):
    error = engines["video"]["load_error"]
    assert "VisionTrimVideoLlavaForConditionalGeneration is not served by the VisionTrim vLLM plugin" in error
    assert (
        "serves VisionTrim LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2.5-VL, Qwen2-VL, "
        "Qwen3-VL, Qwen3-VL-MoE folders" in error
    )


def test_a_head_size_vllm_cpu_attention_lacks_is_refused_at_load(engines):
    error = engines["narrow"]["load_error"]
    assert "LLM attention head size of 16" in error and "vLLM's CPU attention does not support" in error


def test_two_tensor_parallel_ranks_give_the_same_tokens_as_one(engines, offline):
    # Each rank holds half of the scored CLIP layer's heads: DVTS gathers their queries and keys before it scores.
    parallel = loaded(engines["parallel"])
    assert parallel["rounds"][0]["placeholders"] == offline["rounds"][0]["placeholders"]
    assert parallel["rounds"][0]["tokens"] == offline["rounds"][0]["tokens"]
