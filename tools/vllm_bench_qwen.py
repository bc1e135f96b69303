# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim bench-vllm --arch qwen2.5-vl` (or `qwen3-vl`): the stock Qwen model, VisionTrim (25% and 50%
of each image's and video slice's tokens kept) and vLLM's own EVS video pruning at the same rates, served by vLLM with
the same weights, in one run.

It builds a random model here (Qwen2.5-VL-7B's or Qwen3-VL-8B's vision tower, a small LLM; `--toy`: tiny widths) and
saves it as a stock folder and as two VisionTrim folders. `tools/vllm_bench_qwen_job.py` measures them in the vLLM
environment (`--vllm-python`) on a 448 x 448 image, a page-sized image (1008 x 756; Qwen3-VL's 16 px patches: 1024 x
768) and a 16-frame 448 x 448 video (EVS prunes videos only):
prompt tokens, KV-cache capacity against its ideal ratio ((stock prompt + output) / (prompt + output)), offline
throughput, and through `vllm serve` time to first token (p50, p95) at each `--concurrency`.
"""

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .bench_qwen import QWEN_BENCHES
from .build import uncompressed_processor
from .build_qwen import (
    QwenShapes,
    build_qwen_config,
    build_qwen_model,
    build_qwen_processor,
    stock_qwen_with_same_weights,
)
from .demo import sample_photo
from .vllm_server import run_vllm_job


logger = logging.getLogger(__name__)

PHOTOS = ("chelsea.jpg", "coffee.jpg")
# Each medium: kind, (width, height), frames.
MEDIA = {
    "image-448x448": {"kind": "image", "size": (448, 448), "frames": 1},
    "image-1008x756": {"kind": "image", "size": (1008, 756), "frames": 1},
    "image-1024x768": {"kind": "image", "size": (1024, 768), "frames": 1},
    "video-16x448x448": {"kind": "video", "size": (448, 448), "frames": 16},
}
KEPT_SHARES = (0.25, 0.5)


@dataclass(frozen=True)
class ServingBench:
    """An architecture's serving benchmark: its default media and its largest image (vLLM profiles the tower at it)."""

    media: tuple[str, ...]
    max_pixels: int


# The tower of each architecture is its Transformers benchmark's (`bench_qwen.QWEN_BENCHES`).
SERVING_BENCHES = {
    "qwen2.5-vl": ServingBench(("image-448x448", "image-1008x756", "video-16x448x448"), 1008 * 756),
    "qwen3-vl": ServingBench(("image-448x448", "image-1024x768", "video-16x448x448"), 1024 * 768),
}


def save_folders(root: Path, arch: str, shapes: QwenShapes) -> dict[str, str]:
    """The stock folder and a VisionTrim folder per kept share, all of one random model (the same weights)."""
    config = build_qwen_config(arch, shapes, reduction_ratio=1 - KEPT_SHARES[0])
    bench = SERVING_BENCHES[arch]
    # A Qwen3-VL video's pixels are budgeted over all its frames: room for the 16 frames at 448 x 448.
    video_pixels = max(bench.max_pixels, 16 * 448 * 448)
    processor = build_qwen_processor(config, max_pixels=bench.max_pixels, video_max_pixels=video_pixels)
    model = build_qwen_model(config)
    folders = {}
    for kept in KEPT_SHARES:
        model.config.reduction_ratio = processor.reduction_ratio = 1 - kept
        folders[kept] = root / f"visiontrim-{round(kept * 100)}"
        model.save_pretrained(folders[kept])
        processor.save_pretrained(folders[kept])
    folders["stock"] = root / "stock"
    stock_qwen_with_same_weights(model).save_pretrained(folders["stock"])
    uncompressed_processor(processor).save_pretrained(folders["stock"])
    return {name: str(folder) for name, folder in folders.items()}


def bench_runs(folders: dict, media: list[str]) -> list[dict]:
    """Stock and VisionTrim on each of `media`; vLLM's EVS (the stock folder, `video_pruning_rate`) on its videos."""
    runs = [{"name": "stock", "folder": folders["stock"], "media": media}]
    for kept in KEPT_SHARES:
        runs.append({"name": f"VisionTrim {kept:.0%}", "folder": folders[kept], "media": media})
    video_media = [name for name in media if MEDIA[name]["kind"] == "video"]
    for kept in KEPT_SHARES if video_media else ():
        evs = {"video_pruning_rate": 1 - kept}
        runs.append({"name": f"EVS {kept:.0%}", "folder": folders["stock"], "engine": evs, "media": video_media})
    return runs


def table(results: dict[str, dict], medium: str, max_tokens: int, concurrency: list[int]) -> str:
    """One medium's rows: tokens, KV capacity against its ideal, offline throughput, served TTFT per concurrency."""
    stock = results["stock"][medium]
    titles = ["model", "prompt tokens", "KV capacity (requests)", "KV ratio (ideal)", "offline req/s"]
    titles += [f"TTFT p50 / p95 s @{clients}" for clients in concurrency]
    lines = ["| " + " | ".join(titles) + " |", "|---" * len(titles) + "|"]
    for name, measured in results.items():
        if "error" in measured:
            lines.append(f"| {name} | failed in vLLM: {measured['error'][:160]} |")
            continue
        if medium not in measured:
            continue
        row = measured[medium]
        ideal = (stock["prompt_tokens"] + max_tokens) / (row["prompt_tokens"] + max_tokens)
        cells = [
            name,
            f"{row['prompt_tokens']:d}",
            f"{row['kv_capacity_requests']:d}",
            f"{row['kv_capacity_requests'] / stock['kv_capacity_requests']:.2f} ({ideal:.2f})",
            f"{row['offline_requests_per_s']:.3f}",
        ]
        for clients in concurrency:
            served = row["served"][f"concurrency {clients}"]
            cells.append(f"{served['ttft_p50_s']:.2f} / {served['ttft_p95_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    bench = SERVING_BENCHES[args.arch]
    shapes = (
        QwenShapes(llm_heads=2, llm_kv_heads=2)
        if args.toy
        else QwenShapes(
            **{**vars(QWEN_BENCHES[args.arch].tower), "llm_layers": args.llm_layers, "llm_hidden": args.llm_hidden}
        )
    )
    media = args.media or list(bench.media)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visiontrim-bench-vllm-qwen-") as scratch:
        job = {
            "runs": bench_runs(save_folders(Path(scratch), args.arch, shapes), media),
            "media": {name: MEDIA[name] for name in media},
            "photos": [str(sample_photo(name)) for name in PHOTOS],
            "question": args.question,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "max_model_len": 4096,
            "server_start_timeout_s": 1800,
        }
        logger.warning(
            "Up to five runs (stock, VisionTrim at two shares, EVS at two rates on a video), each an offline engine "
            "then `vllm serve`, in vLLM's environment: with a 7B / 8B model's vision tower a 448 x 448 image takes "
            "5-11 s of tower on a 2-core CPU (a page-sized one ~30 s, the video ~70 s), so the default run takes an "
            "hour or more there; use a GPU."
        )
        job_module, result_path = "visiontrim.tools.vllm_bench_qwen_job", output / "bench-vllm-qwen-raw.json"
        results = run_vllm_job(args.vllm_python, job_module, job, Path(scratch), result_path, args.kv_cache_gib)
    description = (
        f"random {args.arch}: vision tower {shapes.vision_layers} x {shapes.vision_hidden}, LLM {shapes.llm_layers} x "
        f"{shapes.llm_hidden}; vLLM, fp32, KV cache {args.kv_cache_gib} GiB; {args.requests} requests, "
        f"{args.max_tokens} output tokens each"
    )
    report = {"model": description, "question": args.question, "max_tokens": args.max_tokens, "results": results}
    (output / "bench-vllm-qwen.json").write_text(json.dumps(report, indent=2))
    print(description)
    for medium in media:
        print(f"\n{medium}\n{table(results, medium, args.max_tokens, args.concurrency)}")
    print(f"written: {output / 'bench-vllm-qwen.json'}")
    return report
