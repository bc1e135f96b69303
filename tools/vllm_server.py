# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`vllm serve` on 127.0.0.1 as a context manager, and an OpenAI-style chat request with one image (or video) and a
question to it, for the serving benchmarks and the tests (standard library only).
"""

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


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
