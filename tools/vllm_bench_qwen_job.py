# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The measuring half of `python -m visiontrim bench-vllm --arch qwen2.5-vl`, run inside the vLLM environment:
`python -m visiontrim.tools.vllm_bench_qwen_job JOB.json RESULT.json`.

For each run of the job (a model folder and its engine options: stock, VisionTrim, vLLM's EVS), one after the other:
an offline engine gives, per medium, the prompt's tokens, the KV-cache capacity (requests of that prompt that fit in
the engine's block pool) and the offline throughput of the job's requests submitted at once; then `vllm serve` gives,
per medium and concurrency, time to first token and request throughput with that many streaming clients. Every
request carries its own crop of a photo (a video: its own pan across one), so none is served from another's cache.
"""

import base64
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

from visiontrim.tools.vllm_server import concurrent_clients, media_chat_request, vllm_server


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its block count is read
ENGINE_ARGUMENTS = {"dtype": "float32", "enforce_eager": True, "seed": 0, "enable_prefix_caching": False}
VIDEO_FPS = 2.0


def media_items(photos: list[str], medium: dict, count: int) -> list:
    """
    `count` distinct items of `medium` (`kind` "image" or "video", `size` (width, height), `frames`): photo crops,
    each request's by a different margin, resized; a video pans across its photo, each request starting elsewhere.
    """
    import numpy
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in photos]
    width, height = medium["size"]
    items = []
    for index in range(count):
        image = images[index % len(images)]
        margin = 1 + index // len(images)
        if medium["kind"] == "image":
            crop = image.crop((margin, margin, image.width - margin, image.height - margin))
            items.append(crop.resize((width, height)))
            continue
        crop_width = image.width // 2
        step = (image.width - crop_width - margin) / max(1, medium["frames"] - 1)
        frames = [
            numpy.asarray(image.crop((int(margin + f * step), 0, int(margin + f * step) + crop_width, image.height)))
            for f in range(medium["frames"])
        ]
        items.append(numpy.stack([numpy.asarray(Image.fromarray(frame).resize((width, height))) for frame in frames]))
    return items


def offline_prompt(item, medium: dict, question: str) -> dict:
    pad = "<|image_pad|>" if medium["kind"] == "image" else "<|video_pad|>"
    prompt = f"<|im_start|>user\n<|vision_start|>{pad}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    if medium["kind"] == "image":
        return {"prompt": prompt, "multi_modal_data": {"image": item}}
    metadata = {
        "fps": VIDEO_FPS,
        "total_num_frames": len(item),
        "frames_indices": list(range(len(item))),
        "duration": len(item) / VIDEO_FPS,
        "video_backend": "opencv",
    }
    return {"prompt": prompt, "multi_modal_data": {"video": (item, metadata)}}


def offline(run: dict, job: dict, items: dict[str, list]) -> dict:
    """Per medium of the run: prompt tokens, KV-cache capacity and offline throughput."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=run["folder"],
        trust_remote_code=True,
        max_model_len=job["max_model_len"],
        limit_mm_per_prompt={"image": 1, "video": 1},
        **ENGINE_ARGUMENTS,
        **run.get("engine", {}),
    )
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    num_blocks, block_size = scheduler.kv_cache_config.num_blocks, scheduler.cache_config.block_size
    results = {}
    for name in run["media"]:
        prompts = [
            offline_prompt(item, job["media"][name], job["question"]) for item in items[name][: job["requests"] + 1]
        ]
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = llm.generate(prompts[1:], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        prompt_tokens = len(outputs[0].prompt_token_ids)
        results[name] = {
            "prompt_tokens": prompt_tokens,
            "kv_capacity_requests": num_blocks // math.ceil((prompt_tokens + job["max_tokens"]) / block_size),
            "offline_requests_per_s": len(outputs) / elapsed,
            "offline_output_tokens_per_s": sum(len(output.outputs[0].token_ids) for output in outputs) / elapsed,
        }
    del llm
    gc.collect()
    return results


def content_part(item, medium: dict) -> dict:
    """An OpenAI content part holding `item`: a PNG `image_url`, or an MP4 `video_url` (OpenCV's encoder)."""
    if medium["kind"] == "image":
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
        }
    import cv2

    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        height, width = item.shape[1:3]
        writer = cv2.VideoWriter(file.name, cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (width, height))
        for frame in item:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        data = Path(file.name).read_bytes()
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


def stream_chat(port: int, folder: str, question: str, part: dict, max_tokens: int) -> float:
    """One streaming chat completion: seconds to its first content token."""
    request = media_chat_request(port, folder, part, question, max_tokens, ignore_eos=True, stream=True)
    started = time.perf_counter()
    first = math.nan
    with urllib.request.urlopen(request, timeout=1800) as response:
        for line in response:
            if math.isnan(first) and line.startswith(b"data: {"):  # vLLM streams its first chunk with the first token
                first = time.perf_counter() - started
    return first


def served(run: dict, job: dict, items: dict[str, list], log_path: Path) -> dict:
    """Per medium and concurrency: time to first token (p50, p95) and request throughput through `vllm serve`."""
    options = ["--max-model-len", str(job["max_model_len"]), "--dtype", ENGINE_ARGUMENTS["dtype"], "--enforce-eager"]
    options += ["--no-enable-prefix-caching", "--seed", "0", "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    if "video_pruning_rate" in run.get("engine", {}):
        options += ["--video-pruning-rate", str(run["engine"]["video_pruning_rate"])]
    vllm = Path(sys.executable).parent / "vllm"
    results: dict[str, dict] = {}
    with vllm_server(vllm, run["folder"], log_path, options, job["server_start_timeout_s"]) as port:
        for name in run["media"]:
            parts = [content_part(item, job["media"][name]) for item in items[name]]
            stream_chat(port, run["folder"], job["question"], parts[0], job["max_tokens"])  # warm-up
            for level, concurrency in enumerate(job["concurrency"]):
                # Each level its own items: an item seen before would come from vLLM's encoder cache.
                measured = parts[1 + level * job["requests"] : 1 + (level + 1) * job["requests"]]
                timings = concurrent_clients(
                    lambda part: stream_chat(port, run["folder"], job["question"], part, job["max_tokens"]),
                    measured,
                    concurrency,
                )
                results.setdefault(name, {})[f"concurrency {concurrency}"] = timings
    return results


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    count = 1 + job["requests"] * len(job["concurrency"])  # a warm-up item, then each concurrency level's own
    items = {name: media_items(job["photos"], medium, count) for name, medium in job["media"].items()}
    results: dict[str, dict] = {}
    for run in job["runs"]:
        try:
            measured = offline(run, job, items)
        except Exception as error:  # a run vLLM itself cannot do (its EVS on some models); the others go on
            traceback.print_exc()
            results[run["name"]] = {"error": f"{type(error).__name__}: {error}"}
            Path(result_path).write_text(json.dumps(results, indent=2))
            continue
        for name, timings in served(run, job, items, Path(result_path).with_name(f"serve-{run['name']}.log")).items():
            measured[name]["served"] = timings
        results[run["name"]] = measured
        Path(result_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
