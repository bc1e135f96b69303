"""Helpers for the tests: tiny checkpoints saved to folders and loaded back with `trust_remote_code=True`."""

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from visiontrim.tools.build import build_config, build_model, build_processor
from visiontrim.tools.build_qwen import QwenShapes, build_qwen_config, build_qwen_model, build_qwen_processor


REPO = Path(__file__).resolve().parents[1]
VLLM_JOBS = Path(__file__).resolve().parent / "vllm" / "jobs.py"
QUESTION_PROMPT = "USER: <image>\nWhat animal is in the picture? ASSISTANT:"
OTHER_PROMPT = "USER: <image>\nIs there a cup of coffee on the table? Answer with one word. ASSISTANT:"
# A value other than the default for every stored VisionTrim setting, to check that each one is saved and reloaded.
NON_DEFAULT_SETTINGS = {
    "dominant_ratio": 0.5,
    "dvts_score": "received_attention",
    "merge_iterations": 2,
    "merge_update": "mean",
    "empty_guidance": "error",
}


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def save_checkpoint(folder: Path, seed: int = 0, **compression) -> Path:
    """Builds a seeded tiny model and its processor with the given compression settings and saves both to `folder`."""
    config = build_config(**compression)
    build_model(config, seed=seed).save_pretrained(folder)
    build_processor(config).save_pretrained(folder)
    return folder


def sharpen_scored_attention(model, sharpness: float) -> None:
    """
    Multiplies the attention logits of a tiny Qwen model's scored vision block by `sharpness` (its q and k rows by
    the square root): a random tower's attention is nearly uniform, so DVTS's ranking would have near-ties that fp32
    rounding differences between two implementations can flip.
    """
    qkv = model.model.visual.blocks[model.config.scored_block].attn.qkv
    width = qkv.in_features
    with torch.no_grad():
        qkv.weight[: 2 * width] *= sharpness**0.5
        qkv.bias[: 2 * width] *= sharpness**0.5


def save_qwen_checkpoint(
    folder: Path,
    arch: str = "qwen2.5-vl",
    max_pixels: int = 1008 * 1008,
    shapes: QwenShapes | None = None,
    sharpness: float | None = None,
    **compression,
) -> Path:
    """
    A seeded tiny Qwen model of `arch` and `shapes` (its scored block sharpened by `sharpness`, see
    `sharpen_scored_attention`) and its processor (images of at most `max_pixels`), saved to `folder`.
    """
    config = build_qwen_config(arch, shapes, **compression)
    model = build_qwen_model(config)
    if sharpness is not None:
        sharpen_scored_attention(model, sharpness)
    model.save_pretrained(folder)
    build_qwen_processor(config, max_pixels=max_pixels).save_pretrained(folder)
    return folder


def load_remote(folder: Path, **overrides):
    """Loads model and processor from `folder` with `trust_remote_code=True`, from another working directory."""
    processor_settings = ("visual_tokens", "reduction_ratio", "crop_newline", "empty_guidance")
    processor_overrides = {key: value for key, value in overrides.items() if key in processor_settings}
    with working_directory(Path(tempfile.mkdtemp(prefix="visiontrim-user-"))):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **overrides)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True, **processor_overrides)
    return model.eval(), processor


def assert_plot(path: Path, size: tuple[int, int]) -> None:
    """`path` is a PNG of `size` (width, height) pixels that holds a drawing: dark and light pixels, many colours."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size)
        darkest, lightest = image.convert("L").getextrema()
        assert lightest - darkest > 100, (darkest, lightest)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 16


@contextlib.contextmanager
def refused(capsys: pytest.CaptureFixture, pattern: str) -> Iterator[None]:
    """The block is a command that stops with exit status 2 and an error line on stderr matching `pattern`."""
    with pytest.raises(SystemExit) as exit_info:
        yield
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(rf"error: .*{pattern}", error), (exit_info.value.code, error)
    assert "Traceback" not in error


def run_jobs(python: Path, work: Path, jobs: dict[str, dict], timeout: int = 900) -> dict[str, dict]:
    """
    Runs `jobs` (name -> job, see tests/vllm/jobs.py) one after the other in one process of the vLLM environment, so
    vLLM is imported once for all of them.
    """
    jobs_path, results_path = work / "jobs.json", work / "results.json"
    jobs_path.write_text(json.dumps(list(jobs.values())))
    completed = subprocess.run(
        [python, VLLM_JOBS, jobs_path, results_path], capture_output=True, text=True, timeout=timeout, cwd=work
    )
    assert completed.returncode == 0 and results_path.exists(), completed.stdout[-3000:] + completed.stderr[-6000:]
    return dict(zip(jobs, json.loads(results_path.read_text()), strict=True))


def loaded(result: dict) -> dict:
    """A job's result, failing the test with the engine's load error if it refused the folder."""
    assert "load_error" not in result, result["load_error"]
    return result


def assert_ranks_answer_as_one(parallel: dict, single: dict) -> None:
    """A round on tensor-parallel ranks gave one rank's prompts, greedy tokens and first-step log-probs (1e-4)."""
    assert parallel["prompt_ids"] == single["prompt_ids"]
    assert parallel["tokens"] == single["tokens"]
    for parallel_logprobs, single_logprobs in zip(parallel["logprobs"], single["logprobs"], strict=True):
        assert parallel_logprobs.keys() == single_logprobs.keys()
        for token, logprob in single_logprobs.items():
            assert abs(parallel_logprobs[token] - logprob) < 1e-4
