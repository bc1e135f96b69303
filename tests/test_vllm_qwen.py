"""
The vLLM plugin serving VisionTrim Qwen2.5-VL and Qwen2-VL folders, as users run it: `LLM(model=folder,
trust_remote_code=True)` and `vllm serve folder --trust-remote-code` with the `openai` client, in vLLM's own
environment (tests/vllm/make_env.sh). The engines run in one subprocess (tests/vllm/jobs.py); the Transformers
references run here.

Positions are checked directly: the M-RoPE positions the served LLM got for each prompt's prefill (recorded in the
engine) equal those the Transformers classes compute. The log-probs alone would not show a wrong position: the tiny
random LLM's first-step log-probs move by only ~1e-5 when every kept token sits at its image's start.
"""

import base64
import io
import os
import subprocess
from pathlib import Path

import av
import numpy
import pytest
import torch
from PIL import Image

from visiontrim.tools.build import uncompressed_processor
from visiontrim.tools.build_qwen import QwenShapes, stock_qwen_with_same_weights
from visiontrim.tools.demo import sample_photo
from visiontrim.tools.vllm_server import vllm_server

from helpers import load_remote, loaded, run_jobs, save_qwen_checkpoint


# vLLM's CPU attention needs a head size of at least 32: 64 wide, 2 heads (1 per rank at tensor_parallel_size=2).
SHAPES = QwenShapes(llm_heads=2, llm_kv_heads=2)
# The scored block's attention logits x 30: without it DVTS's cut has relative gaps of 1e-6, which vLLM's and
# Transformers' fp32 rounding can flip (see `sharpen_scored_attention`).
SHARPNESS = 30.0
MAX_PIXELS = 448 * 448
FOLDER = {"shapes": SHAPES, "max_pixels": MAX_PIXELS, "sharpness": SHARPNESS}
MAX_TOKENS = 8
LOGPROBS = 5
IMAGE_PAD, VIDEO_PAD = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
# A tall clip: 4 frames of 168 x 112 px at 2 fps, 2 slices of 6 x 4 merged tokens. The text after it is where both
# Transformers (start + max(h, w) / 2) and vLLM (start + the largest extent, time included) put it: time spans 0-4.
CLIP_FPS = 2.0
# Each modality's pixels, grid and guidance inputs, as the VisionTrim Qwen processor names them.
MEDIA_INPUTS = {
    "image": ("pixel_values", "image_grid_thw", "guidance"),
    "video": ("pixel_values_videos", "video_grid_thw", "video_guidance"),
}
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0"]


OTHER_QUESTION = "What colour is the background?"


def chat(question: str, images: int = 0, videos: int = 0) -> str:
    """A Qwen chat prompt: one user turn with the media first, then the question."""
    return f"<|im_start|>user\n{IMAGE_PAD * images}{VIDEO_PAD * videos}{question}<|im_end|>\n<|im_start|>assistant\n"


# Wide, tall and square images, two images in one prompt, a tall video, and an image with a video.
BATCH = [
    {"prompt": chat("What animal is this?", 1), "images": ["cat"]},
    {"prompt": chat("Is the cup tall?", 1), "images": ["tall"]},
    {"prompt": chat("Compare the two pictures.", 2), "images": ["square", "cup"]},
    {"prompt": chat("What happens in the video?", videos=1), "videos": ["clip"]},
    {"prompt": chat("Is the cat of the picture in the video?", 1, 1), "images": ["cat"], "videos": ["clip"]},
]


def vllm_media(folder: Path) -> dict:
    """The images (saved as PNG) and the clip (frames as .npy, and as an MPEG-4 file for OpenAI-style requests)."""
    cat, cup = (Image.open(sample_photo(name)).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg"))
    images = {"cat": cat, "cup": cup, "tall": cup.crop((200, 0, 380, 400)), "square": cat.resize((280, 280))}
    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    # The camera pans across the cat.
    frames = numpy.stack([numpy.asarray(cat.crop((left, 60, left + 112, 228))) for left in (100, 130, 160, 190)])
    numpy.save(folder / "clip.npy", frames)
    return {
        "images": paths,
        "videos": {"clip": {"path": str(folder / "clip.npy"), "fps": CLIP_FPS}},
        "frames": frames,
        "mp4": mp4_bytes(frames, CLIP_FPS),
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    return vllm_media(tmp_path_factory.mktemp("vllm-qwen-media"))


def mp4_bytes(frames: numpy.ndarray, fps: float) -> bytes:
    """`frames` `(frames, height, width, 3)` encoded as an MPEG-4 video (PyAV)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=int(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def openai_messages(media: dict) -> list[list[dict]]:
    """Two OpenAI-style chats: an image (a base64 PNG) with a question, and the clip (a base64 MP4) with one."""
    image_url = "data:image/png;base64," + base64.b64encode(Path(media["images"]["cat"]).read_bytes()).decode()
    video_url = "data:video/mp4;base64," + base64.b64encode(media["mp4"]).decode()
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "What animal is this?"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video_url}},
                    {"type": "text", "text": "What happens in the video?"},
                ],
            }
        ],
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen folders: VisionTrim Qwen2.5-VL and Qwen2-VL (a quarter of each slice kept), uncompressed, stock."""
    work = tmp_path_factory.mktemp("vllm-qwen-folders")
    folders = {
        "qwen2.5": save_qwen_checkpoint(work / "qwen2.5", **FOLDER, reduction_ratio=0.75),
        "qwen2": save_qwen_checkpoint(work / "qwen2", arch="qwen2-vl", **FOLDER, reduction_ratio=0.75),
        "uncompressed": save_qwen_checkpoint(work / "uncompressed", **FOLDER, reduction_ratio=0),
    }
    model, processor = load_remote(folders["uncompressed"])
    stock_qwen_with_same_weights(model).save_pretrained(work / "stock")
    uncompressed_processor(processor).save_pretrained(work / "stock")
    folders["stock"] = work / "stock"
    return folders


@pytest.fixture(scope="module")
def engines(vllm_python, folders, media, tmp_path_factory) -> dict[str, dict]:
    """
    Every offline engine of these tests, in one process:
    - "qwen2.5" and "qwen2": the batch (greedy tokens, first log-probs, prefill positions); "qwen2.5" also answers the
      OpenAI-style chats the server test sends;
    - "chunked": the Qwen2.5-VL folder with prefill chunks of 32 tokens, two prompts of the batch one at a time;
    - "uncompressed" (reduction_ratio=0) and "stock" (vLLM's own Qwen2.5-VL, same weights): the batch;
    - "parallel", last: the Qwen2.5-VL folder on two tensor-parallel ranks (vision and LLM heads split), the batch.
    """
    work = tmp_path_factory.mktemp("vllm-qwen-engines")
    _, processor = load_remote(folders["qwen2.5"])
    tokenizer = processor.tokenizer
    placeholder_ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    common = {
        "images": media["images"],
        "videos": media["videos"],
        "limit_mm_per_prompt": {"image": 2, "video": 1},
        "placeholder_ids": placeholder_ids,
        "max_tokens": MAX_TOKENS,
    }
    batch = {**common, "rounds": [BATCH], "logprobs": LOGPROBS, "record_positions": True}
    cat = BATCH[0]
    jobs = {
        "qwen2.5": {
            "model": str(folders["qwen2.5"]),
            **batch,
            "count_encoder": True,
            "rounds": [
                BATCH,
                [cat],
                [{**cat, "prompt": chat(OTHER_QUESTION, 1)}],
                [{**cat, "mm_processor_kwargs": {"guidance_text": OTHER_QUESTION}}],
            ],
            "messages": openai_messages(media),
        },
        "qwen2": {"model": str(folders["qwen2"]), **batch},
        "chunked": {
            "model": str(folders["qwen2.5"]),
            **common,
            "rounds": [[BATCH[4]], [BATCH[2]], [BATCH[4]]],
            "logprobs": LOGPROBS,
            "record_positions": True,
            "engine": {
                "max_num_batched_tokens": 32,
                "enable_chunked_prefill": True,
                "enable_prefix_caching": True,
                "block_size": 32,  # vLLM CPU's default 128 would cache no block of these prompts
            },
        },
        "uncompressed": {"model": str(folders["uncompressed"]), **common, "rounds": [BATCH]},
        "stock": {"model": str(folders["stock"]), **common, "rounds": [BATCH]},
        "parallel": {"model": str(folders["qwen2.5"]), **batch, "tensor_parallel_size": 2},
    }
    return run_jobs(vllm_python, work, jobs)


def processor_inputs(processor, entry: dict, media: dict, **options) -> dict:
    images = [Image.open(media["images"][name]) for name in entry.get("images", [])] or None
    videos = [media["frames"] for _ in entry.get("videos", [])] or None
    return processor(images=images, videos=videos, text=entry["prompt"], return_tensors="pt", **options)


def transformers_reference(
    remote: tuple, entry: dict, media: dict, prompt_ids: list[int] | None = None, **options
) -> dict:
    """
    Transformers' prompt ids, M-RoPE positions `(3, tokens)`, greedy tokens and first-step log-probs of a prompt
    (`options` for the processor, e.g. `guidance_text`); with `prompt_ids`, of those ids (another engine's layout of
    the same prompt) with the processor's media and guidance.
    """
    model, processor = remote
    inputs = processor_inputs(processor, entry, media, **options)
    if prompt_ids is not None:
        ids = torch.tensor([prompt_ids])
        types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int()
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types)
    encoded = {}
    for modality, (pixels, grid, guidance) in MEDIA_INPUTS.items():
        if pixels in inputs:
            encode = getattr(model.model, f"get_{modality}_features")
            encoded[modality] = encode(
                inputs[pixels],
                inputs[grid],
                inputs[f"{guidance}_input_ids"],
                inputs[f"{guidance}_attention_mask"],
                return_dict=True,
            )
    grids = {
        name: inputs[name] for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if name in inputs
    }
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], mm_encoder_outputs=encoded, **grids
    )
    output = model.generate(
        **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    return {
        "prompt_ids": inputs["input_ids"][0].tolist(),
        "positions": positions[:, 0].tolist(),
        "tokens": output.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
        "logprobs": torch.log_softmax(output.scores[0][0].double(), dim=-1),
    }


@pytest.fixture(scope="module")
def remotes(folders) -> dict[str, tuple]:
    """The compressing folders loaded once each with Transformers (model, processor), as a user loads them."""
    return {arch: load_remote(folders[arch]) for arch in ("qwen2.5", "qwen2")}


@pytest.fixture(scope="module")
def references(remotes, media) -> dict[str, list[dict]]:
    return {
        arch: [transformers_reference(remotes[arch], entry, media) for entry in BATCH] for arch in ("qwen2.5", "qwen2")
    }


@pytest.mark.parametrize("arch", ["qwen2.5", "qwen2"])
def test_prompts_hold_the_kept_tokens_as_the_transformers_processor_does(engines, references, arch):
    served = loaded(engines[arch])["rounds"][0]
    assert served["prompt_ids"] == [reference["prompt_ids"] for reference in references[arch]]
    # A quarter of each slice: the cat (16 x 11 merged tokens) keeps 44; the clip 2 slices of 6 of 24.
    assert served["placeholders"][0] == 44 and served["placeholders"][3] == 12


@pytest.mark.parametrize("arch", ["qwen2.5", "qwen2"])
def test_kept_tokens_sit_at_their_transformers_positions(engines, references, arch):
    served = loaded(engines[arch])["rounds"][0]
    for positions, reference in zip(served["positions"], references[arch], strict=True):
        assert positions == reference["positions"]


@pytest.mark.parametrize("arch", ["qwen2.5", "qwen2"])
def test_greedy_tokens_and_log_probs_equal_transformers(engines, references, arch):
    served = loaded(engines[arch])["rounds"][0]
    for tokens, logprobs, reference in zip(served["tokens"], served["logprobs"], references[arch], strict=True):
        assert tokens == reference["tokens"]
        # 1e-5 to 2e-4 here: the sharpened block (logits x 30) amplifies the two implementations' fp32 rounding.
        for token, logprob in logprobs.items():
            assert abs(logprob - reference["logprobs"][int(token)].item()) < 1e-3


def test_chunked_prefill_gives_the_same_positions_and_tokens(engines):
    chunked, whole = loaded(engines["chunked"])["rounds"], loaded(engines["qwen2.5"])["rounds"][0]
    for round_, index in zip(chunked[:2], (4, 2), strict=True):
        assert len(round_["prompt_ids"][0]) > 2 * 32  # three chunks or more, some of them inside an item
        assert round_["positions"][0] == whole["positions"][index]
        assert round_["tokens"][0] == whole["tokens"][index]


def test_a_prefix_cache_hit_answers_as_the_first_time(engines):
    # The image-and-video prompt again: its media blocks come from the prefix cache (keyed by the items and the
    # question), so only the text after them is computed, at the positions admission gave it.
    chunked = loaded(engines["chunked"])["rounds"]
    assert len(chunked[2]["positions"][0][0]) < len(chunked[2]["prompt_ids"][0]) - 32  # most of it was cached
    assert chunked[2]["tokens"] == chunked[0]["tokens"]
    for token, logprob in chunked[2]["logprobs"][0].items():
        assert abs(logprob - chunked[0]["logprobs"][0][token]) < 1e-5


def test_encoder_cache_is_keyed_by_item_and_question_and_the_override_guides(engines, remotes, media):
    rounds = loaded(engines["qwen2.5"])["rounds"]
    # The batch encodes 7 items (the cat twice: two questions; the clip twice); the cat with its question again
    # encodes nothing; another question encodes it again; that question as mm_processor_kwargs is the same entry.
    assert [round_["encoded_images"] for round_ in rounds] == [7, 7, 8, 8]
    overridden = transformers_reference(remotes["qwen2.5"], BATCH[0], media, guidance_text=OTHER_QUESTION)
    assert rounds[3]["tokens"][0] == overridden["tokens"]
    assert rounds[3]["positions"][0] == overridden["positions"]
    # The other question keeps other TGVC seeds of the cat than its own question does.
    assert rounds[3]["positions"][0] != rounds[1]["positions"][0]


def test_no_compression_equals_stock_vllm_qwen(engines, folders):
    uncompressed, stock = loaded(engines["uncompressed"])["rounds"][0], loaded(engines["stock"])["rounds"][0]
    assert "Qwen2_5_VLForConditionalGeneration" in (folders["stock"] / "config.json").read_text()
    assert uncompressed["tokens"] == stock["tokens"]
    assert uncompressed["prompt_ids"] == stock["prompt_ids"]
    assert uncompressed["placeholders"][0] == 176  # every merged token of the cat


def test_two_tensor_parallel_ranks_keep_the_same_tokens_as_one(engines):
    # The kept units are the positions' (t, h, w): equal positions are equal kept units.
    parallel, single = loaded(engines["parallel"])["rounds"][0], loaded(engines["qwen2.5"])["rounds"][0]
    assert parallel["positions"] == single["positions"]
    assert parallel["tokens"] == single["tokens"]


OFFSETS_ROUND_TRIP = """
import torch
from visiontrim.serving.vllm_qwen import split_offsets, with_offsets

offsets = torch.stack([torch.arange(0, 65536, 7), torch.arange(65535, -1, -7), torch.arange(0, 65536, 7) % 300], -1)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    features = torch.randn(offsets.shape[0], 8, dtype=dtype)
    stripped, decoded = split_offsets(with_offsets(features, offsets))
    assert torch.equal(decoded, offsets) and torch.equal(stripped, features), dtype
"""


def test_unit_offsets_ride_exactly_on_half_precision_embeddings(vllm_python):
    # Offsets up to 65535 (a long video's time positions) survive bf16 and fp16 embeddings: base-256 channels.
    completed = subprocess.run([vllm_python, "-c", OFFSETS_ROUND_TRIP], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def assert_served_chats_equal_offline(vllm_python, folder: Path, media: dict, offline: dict, tmp_path: Path) -> str:
    """
    `vllm serve folder` answers `openai_messages(media)` through the `openai` client (greedy) with the offline
    engine's `LLM.chat` tokens and prompt lengths (`offline`); returns the server's log.
    """
    import openai

    options = [*ENGINE, "--limit-mm-per-prompt", '{"image": 2, "video": 1}']
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "serve.log"
    answers = []
    with vllm_server(
        Path(vllm_python).parent / "vllm", str(folder), log, options, 300, cwd=tmp_path, env=environment
    ) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        for messages in openai_messages(media):
            answers.append(
                client.chat.completions.create(
                    model=str(folder),
                    messages=messages,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    logprobs=True,
                    extra_body={"return_tokens_as_token_ids": True},
                )
            )
    for answer, tokens, prompt_tokens in zip(answers, offline["chat"], offline["chat_prompt_tokens"], strict=True):
        served = [int(entry.token.removeprefix("token_id:")) for entry in answer.choices[0].logprobs.content]
        assert served == tokens
        assert answer.usage.prompt_tokens == prompt_tokens
    return log.read_text()


def test_vllm_serve_answers_openai_image_and_video_chats_like_offline(vllm_python, folders, media, engines, tmp_path):
    log = assert_served_chats_equal_offline(
        vllm_python, folders["qwen2.5"], media, loaded(engines["qwen2.5"]), tmp_path
    )
    assert "no user-turn marker" not in log
