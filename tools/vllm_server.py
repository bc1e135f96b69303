# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`vllm serve` on 127.0.0.1 as a context manager, an OpenAI-style chat request with one image (or video) and a question
to it, concurrent streaming clients, and the run of a benchmark job in vLLM's environment, for the serving benchmarks
and the tests (standard library only).
"""

import contextlib
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    vllm: Path, folder: str, log_path: Path, options: list[str], start_timeout_s: float, **popen
) -> Iterator[int]:
    """
    Runs `vllm serve folder --trust-remote-code` with `options` on 127.0.0.1 and a free port, its output in
    `log_path`; yields the port once `/health` answers, and stops the server on leaving. Raises a `RuntimeError`
    (naming the log) if the server exits or does not answer within `start_timeout_s`.
    """
    port = free_port()
    command = [str(vllm), "serve", folder, "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port), *options]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with status {server.returncode}: see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not answer within {start_timeout_s} s: see {log_path}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(1)
            yield port
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def image_chat_request(
    port: int, model: str, image_url: str, question: str, max_tokens: int, **options
) -> urllib.request.Request:
    """
    A chat completion request to the server on `port`: one user turn holding the image (`image_url`, e.g. a base64
    `data:` URL) and the question, greedy, with the OpenAI or vLLM request `options` (`stream`, `logprobs`, ...).
    """
    part = {"type": "image_url", "image_url": {"url": image_url}}
    return media_chat_request(port, model, part, question, max_tokens, **options)


def media_chat_request(
    port: int, model: str, part: dict, question: str, max_tokens: int, **options
) -> urllib.request.Request:
    """
    A chat completion request to the server on `port`: one user turn holding a media content `part` (`image_url` or
    `video_url`) and the question, greedy, with the OpenAI or vLLM request `options`.
    """
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **options,
    }
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def concurrent_clients(send: Callable[[object], float], items: list, concurrency: int) -> dict:
    """
    `items` sent by `concurrency` clients at once (threads, each sending the next pending item with `send`, which
    returns its seconds to the first token): time to first token (p50, p95), requests per second, and the totals.
    """
    pending, lock, first_tokens = list(items), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                item = pending.pop(0)
            first = send(item)
            with lock:
                first_tokens.append(first)

    started = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.perf_counter() - started
    first_tokens.sort()
    return {
        "served_requests": len(first_tokens),
        "concurrency": concurrency,
        "ttft_p50_s": statistics.median(first_tokens),
        "ttft_p95_s": first_tokens[min(len(first_tokens) - 1, math.ceil(0.95 * len(first_tokens)) - 1)],
        "served_requests_per_s": len(first_tokens) / elapsed,
        "served_s": elapsed,
    }


def run_vllm_job(vllm_python: str, module: str, job: dict, scratch: Path, result_path: Path, kv_cache_gib: int):
    """
    Runs the benchmark job `job` with `python -m module JOB.json RESULT.json` in vLLM's environment (`vllm_python`,
    `VLLM_CPU_KVCACHE_SPACE=kv_cache_gib`) and returns what it wrote to `result_path`.
    """
    job_path = scratch / "job.json"
    job_path.write_text(json.dumps(job))
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    subprocess.run([vllm_python, "-m", module, job_path, result_path], check=True, env=environment)
    return json.loads(result_path.read_text())
