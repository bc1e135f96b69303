"""
The vLLM plugin serving VisionTrim Qwen3-VL folders, dense and MoE (`LLM(model=folder, trust_remote_code=True)`), in
vLLM's own environment: prompt ids (each video slice after its timestamp), the M-RoPE positions the served LLM gets,
greedy tokens and first-step log-probs against the Transformers classes, whose DeepStack rows and positions are
checked against a slow reference in `test_qwen3.py`; `reduction_ratio=0` against vLLM's own Qwen3-VL; the MoE model on
two tensor-parallel ranks against one.
"""

import json
import shutil
from pathlib import Path

import numpy
import pytest
from PIL import Image
from test_vllm_qwen import (
    assert_served_chats_equal_offline,
    chat,
    mp4_bytes,
    openai_messages,
    transformers_reference,
)

from visiontrim.tools.build import uncompressed_processor
from visiontrim.tools.build_qwen import QwenShapes, stock_qwen_with_same_weights
from visiontrim.tools.demo import sample_photo

from helpers import assert_ranks_answer_as_one, load_remote, loaded, run_jobs, save_qwen_checkpoint


SHAPES = QwenShapes(llm_heads=2, llm_kv_heads=2)  # vLLM's CPU attention: head size 32
FOLDER = {"arch": "qwen3-vl", "shapes": SHAPES, "max_pixels": 448 * 448, "sharpness": 30.0}
MAX_TOKENS = 8
LOGPROBS = 5
CLIP_FPS = 2.0
# A wide image, two images in one prompt, a 4-frame clip (2 slices, each after its timestamp), an image with the clip.
BATCH = [
    {"prompt": chat("What animal is this?", 1), "images": ["cat"]},
    {"prompt": chat("Compare the two pictures.", 2), "images": ["square", "cup"]},
    {"prompt": chat("What happens in the video?", videos=1), "videos": ["clip"]},
    {"prompt": chat("Is the cat of the picture in the video?", 1, 1), "images": ["cat"], "videos": ["clip"]},
]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("vllm-qwen3-media")
    cat, cup = (Image.open(sample_photo(name)).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg"))
    paths = {}
    for name, image in {"cat": cat, "cup": cup, "square": cat.resize((256, 256))}.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    frames = numpy.stack([numpy.asarray(cat.crop((left, 60, left + 128, 252))) for left in (100, 130, 160, 190)])
    numpy.save(folder / "clip.npy", frames)
    return {
        "images": paths,
        "videos": {"clip": {"path": str(folder / "clip.npy"), "fps": CLIP_FPS}},
        "frames": frames,
        "mp4": mp4_bytes(frames, CLIP_FPS),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """
    Tiny VisionTrim Qwen3-VL folders (a quarter of each image and slice kept): dense, MoE, MoE whose config says its
    router does not renormalise; and dense uncompressed and stock.
    """
    work = tmp_path_factory.mktemp("vllm-qwen3-folders")
    folders = {
        "qwen3": save_qwen_checkpoint(work / "qwen3", **FOLDER, reduction_ratio=0.75),
        "moe": save_qwen_checkpoint(work / "moe", **FOLDER | {"arch": "qwen3-vl-moe"}, reduction_ratio=0.75),
        "uncompressed": save_qwen_checkpoint(work / "uncompressed", **FOLDER, reduction_ratio=0),
    }
    folders["unnormalised"] = Path(shutil.copytree(folders["moe"], work / "unnormalised"))
    config = json.loads((folders["unnormalised"] / "config.json").read_text())
    config["text_config"]["norm_topk_prob"] = False
    (folders["unnormalised"] / "config.json").write_text(json.dumps(config))
    model, processor = load_remote(folders["uncompressed"])
    stock_qwen_with_same_weights(model).save_pretrained(work / "stock")
    uncompressed_processor(processor).save_pretrained(work / "stock")
    folders["stock"] = work / "stock"
    return folders


@pytest.fixture(scope="module")
def engines(vllm_python, folders, media, tmp_path_factory) -> dict[str, dict]:
    """
    The batch on the VisionTrim folder (tokens, log-probs, prefill positions; and the OpenAI-style chats of the server
    test, offline); the same folder with prefill chunks of 32 tokens and prefix caching (the image-and-clip prompt,
    the clip, the image-and-clip prompt again); the uncompressed and stock folders; the MoE folder (tokens, log-probs,
    positions); the MoE folder that would not renormalise (its load); and, last, the MoE folder on two tensor-parallel
    ranks (the batch, as the MoE folder's).
    """
    work = tmp_path_factory.mktemp("vllm-qwen3-engines")
    _, processor = load_remote(folders["qwen3"])
    common = {
        "images": media["images"],
        "videos": media["videos"],
        "limit_mm_per_prompt": {"image": 2, "video": 1},
        "placeholder_ids": processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]),
        "max_tokens": MAX_TOKENS,
        "rounds": [BATCH],
    }
    jobs = {
        "qwen3": {
            "model": str(folders["qwen3"]),
            **common,
            "logprobs": LOGPROBS,
            "record_positions": True,
            "messages": openai_messages(media),
        },
        "chunked": {
            "model": str(folders["qwen3"]),
            **common,
            "rounds": [[BATCH[3]], [BATCH[2]], [BATCH[3]]],
            "logprobs": LOGPROBS,
            "record_positions": True,
            "engine": {
                "max_num_batched_tokens": 32,
                "enable_chunked_prefill": True,
                "enable_prefix_caching": True,
                "block_size": 32,
            },
        },
        "uncompressed": {"model": str(folders["uncompressed"]), **common},
        "stock": {"model": str(folders["stock"]), **common},
        "moe": {"model": str(folders["moe"]), **common, "logprobs": LOGPROBS, "record_positions": True},
        "unnormalised": {"model": str(folders["unnormalised"])},
        "parallel": {
            "model": str(folders["moe"]),
            **common,
            "logprobs": LOGPROBS,
            "record_positions": True,
            "tensor_parallel_size": 2,
        },
    }
    return run_jobs(vllm_python, work, jobs)


def served_references(folder: Path, media: dict, engine: dict) -> list[dict]:
    """Transformers on the prompt ids vLLM served (see the prompt test), with the processor's media and guidance."""
    remote = load_remote(folder)
    served = loaded(engine)["rounds"][0]["prompt_ids"]
    return [transformers_reference(remote, entry, media, ids) for entry, ids in zip(BATCH, served, strict=True)]


@pytest.fixture(scope="module")
def references(folders, media, engines) -> list[dict]:
    return served_references(folders["qwen3"], media, engines["qwen3"])


def test_prompts_hold_the_kept_tokens_and_each_slice_its_timestamp(engines, folders, media):
    served = loaded(engines["qwen3"])["rounds"][0]
    stock = loaded(engines["stock"])["rounds"][0]
    remote = load_remote(folders["qwen3"])
    _, processor = remote
    start, *pads = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"])
    for index, entry in enumerate(BATCH):
        expected = transformers_reference(remote, entry, media)["prompt_ids"]
        if "videos" in entry:
            # vLLM 0.32 replaces only the video placeholder, so stock Qwen3-VL's per-slice blocks stay inside the
            # prompt's own <|vision_start|> ... <|vision_end|>; Transformers replaces the whole. Each engine keeps
            # its stock layout.
            assert stock["prompt_ids"][index].count(start) == expected.count(start) + 1
        else:
            assert served["prompt_ids"][index] == expected
        # The served ids are stock vLLM's, each image's and slice's placeholders cut to the kept count.
        text = [[token for token in run["prompt_ids"][index] if token not in pads] for run in (served, stock)]
        assert text[0] == text[1]
    video_prompt = processor.tokenizer.decode(served["prompt_ids"][2])
    slices = [block.count("<|video_pad|>") for block in video_prompt.split("seconds>")[1:]]
    assert slices == [6, 6]  # a quarter of each slice's 6 x 4 merged tokens, after each slice's timestamp


def test_kept_tokens_sit_at_their_transformers_positions(engines, references):
    served = loaded(engines["qwen3"])["rounds"][0]
    for positions, reference in zip(served["positions"], references, strict=True):
        assert positions == reference["positions"]


def assert_served_like_transformers(served: dict, references: list[dict], tolerance: float) -> None:
    """Greedy tokens equal, first-step log-probs within `tolerance`."""
    for tokens, logprobs, reference in zip(served["tokens"], served["logprobs"], references, strict=True):
        assert tokens == reference["tokens"]
        for token, logprob in logprobs.items():
            assert abs(logprob - reference["logprobs"][int(token)].item()) < tolerance


def test_greedy_tokens_and_log_probs_equal_transformers(engines, references):
    # The log-probs see the DeepStack rows too: a row kept or merged differently would move them.
    assert_served_like_transformers(loaded(engines["qwen3"])["rounds"][0], references, 1e-3)


def test_moe_folders_are_served_as_transformers_runs_them(engines, folders, media):
    # The released experts' layout (what `save_pretrained` writes) is what vLLM's Qwen3-VL MoE loads.
    served = loaded(engines["moe"])["rounds"][0]
    references = served_references(folders["moe"], media, engines["moe"])
    assert served["positions"] == [reference["positions"] for reference in references]
    # vLLM's CPU fused-MoE kernel: up to 3e-4 from Transformers uncompressed, 1.2e-3 on the wide image compressed.
    assert_served_like_transformers(served, references, 2e-3)


def test_a_moe_folder_whose_router_would_not_renormalise_is_refused_at_load(engines):
    error = engines["unnormalised"]["load_error"]
    assert "Qwen3-VL MoE always does" in error and '`"norm_topk_prob": true`' in error


def test_two_tensor_parallel_ranks_serve_the_moe_model_as_one(engines):
    # Each rank holds half of the tower's heads (DVTS gathers them) and of every expert.
    parallel, single = loaded(engines["parallel"])["rounds"][0], loaded(engines["moe"])["rounds"][0]
    assert parallel["positions"] == single["positions"]
    assert_ranks_answer_as_one(parallel, single)


def test_chunked_prefill_and_a_prefix_cache_hit_keep_positions_and_tokens(engines):
    chunked, whole = loaded(engines["chunked"])["rounds"], loaded(engines["qwen3"])["rounds"][0]
    for round_, index in zip(chunked[:2], (3, 2), strict=True):
        assert len(round_["prompt_ids"][0]) > 2 * 32  # chunks cut inside the items and between a video's slices
        assert round_["positions"][0] == whole["positions"][index]
        assert round_["tokens"][0] == whole["tokens"][index]
    # The image-and-clip prompt again: its media blocks come from the prefix cache; the rest at admission's positions.
    assert len(chunked[2]["positions"][0][0]) < len(chunked[2]["prompt_ids"][0]) - 32
    assert chunked[2]["tokens"] == chunked[0]["tokens"]
    for token, logprob in chunked[2]["logprobs"][0].items():
        assert abs(logprob - chunked[0]["logprobs"][0][token]) < 1e-5


def test_no_compression_equals_stock_vllm_qwen3_vl(engines):
    uncompressed, stock = loaded(engines["uncompressed"])["rounds"][0], loaded(engines["stock"])["rounds"][0]
    assert uncompressed["prompt_ids"] == stock["prompt_ids"]
    assert uncompressed["tokens"] == stock["tokens"]


def test_vllm_serve_answers_openai_image_and_video_chats_like_offline(vllm_python, folders, media, engines, tmp_path):
    # The MP4 arrives whole: vLLM decodes every frame and the folder's processor samples them as stock Qwen3-VL does.
    offline = loaded(engines["qwen3"])
    assert_served_chats_equal_offline(vllm_python, folders["qwen3"], media, offline, tmp_path)
    assert offline["chat_prompt_tokens"][1] > 2 * 6  # the video's two slices, each after its timestamp
