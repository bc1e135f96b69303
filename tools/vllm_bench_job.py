# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The measuring half of `python -m visiontrim bench-vllm`, run inside the vLLM environment (it imports vLLM, not the
Transformers model classes): `python -m visiontrim.tools.vllm_bench_job JOB.json RESULT.json`.

For each model folder of the job, one after the other (so they never share the CPU): an offline engine gives the
KV-cache capacity (requests of the benchmark prompt that fit in the KV-cache space, from the engine's block count) and
the offline throughput of the job's requests submitted at once; then `vllm serve` on 127.0.0.1 gives time to first
token and request throughput with a bounded number of concurrent streaming clients. Every request carries its own
crop of a photo, so no request is served from another's encoder cache.
"""

import base64
import gc
import io
import json
import math
import os
import sys
import time
import urllib.request
from pathlib import Path

from visiontrim.tools.vllm_server import concurrent_clients, image_chat_request, vllm_server


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its block count is read
ENGINE_ARGUMENTS = {"dtype": "float32", "enforce_eager": True, "seed": 0, "enable_prefix_caching": False}


def request_images(photos: list[str], count: int) -> list:
    """`count` distinct RGB images: the photos in turn, each request's cropped by a different margin."""
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in photos]
    crops = []
    for index in range(count):
        image = images[index % len(images)]
        margin = 1 + index // len(images)
        crops.append(image.crop((margin, margin, image.width - margin, image.height - margin)))
    return crops


def offline(folder: str, job: dict, images: list) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=folder, trust_remote_code=True, max_model_len=job["max_model_len"], **ENGINE_ARGUMENTS)
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    prompts = [{"prompt": job["prompt"], "multi_modal_data": {"image": image}} for image in images]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts[1:], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    prompt_tokens = len(outputs[0].prompt_token_ids)
    # The scheduler's KV-cache block pool, what admits requests (the engine runs in this process).
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    num_blocks, block_size = scheduler.kv_cache_config.num_blocks, scheduler.cache_config.block_size
    blocks_per_request = math.ceil((prompt_tokens + job["max_tokens"]) / block_size)
    output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    del llm
    gc.collect()
    return {
        "startup_s": startup,
        "prompt_tokens": prompt_tokens,
        "kv_blocks": num_blocks,
        "block_size": block_size,
        "kv_capacity_requests": num_blocks // blocks_per_request,
        "offline_requests": len(outputs),
        "offline_s": elapsed,
        "offline_requests_per_s": len(outputs) / elapsed,
        "offline_output_tokens_per_s": output_tokens / elapsed,
    }


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream_chat(port: int, folder: str, question: str, image, max_tokens: int) -> float:
    """One streaming chat completion: seconds to its first content token."""
    request = image_chat_request(port, folder, data_url(image), question, max_tokens, ignore_eos=True, stream=True)
    started = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if first is None and line.startswith(b"data: {"):  # vLLM streams its first chunk with the first token
                first = time.perf_counter() - started
    return first if first is not None else math.nan


def served(folder: str, job: dict, images: list, log_path: Path) -> dict:
    options = ["--max-model-len", str(job["max_model_len"]), "--dtype", ENGINE_ARGUMENTS["dtype"], "--enforce-eager"]
    options += ["--no-enable-prefix-caching", "--seed", "0"]
    vllm = Path(sys.executable).parent / "vllm"
    with vllm_server(vllm, folder, log_path, options, job["server_start_timeout_s"]) as port:
        stream_chat(port, folder, job["question"], images[0], job["max_tokens"])  # warm-up
        return concurrent_clients(
            lambda image: stream_chat(port, folder, job["question"], image, job["max_tokens"]),
            images[1:],
            job["concurrency"],
        )


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    images = request_images(job["photos"], job["requests"] + 1)
    results = {}
    for name, folder in job["folders"].items():
        results[name] = offline(folder, job, images)
        results[name].update(served(folder, job, images, Path(result_path).with_name(f"serve-{name}.log")))
        Path(result_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
