# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim bench-vllm`: stock LLaVA against VisionTrim served by vLLM, with the same weights, in one run
(`--arch qwen2.5-vl` or `qwen3-vl`: the Qwen model, VisionTrim and vLLM's EVS, see `vllm_bench_qwen.py`).

It builds a random LLaVA-1.5-shaped model here (the real CLIP ViT-L/14-336 towers, a small LLM) and saves it twice:
as a VisionTrim folder and as a stock llava-hf folder with the same weights. `tools/vllm_bench_job.py` then measures
both in the vLLM environment (`--vllm-python`, built by tests/vllm/make_env.sh): KV-cache capacity, offline throughput
and, through `vllm serve`, time to first token and request throughput. Results: JSON, a table and a plot.
"""

import argparse
import json
import logging
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..serving.weight_names import vllm_weight_name
from . import plots, vllm_bench_qwen
from .arguments import UsageError, existing_file, non_empty_text, positive_int
from .build import (
    LLAVA_15_SHAPES,
    Shapes,
    build_config,
    build_model,
    build_processor,
    stock_llava_with_same_weights,
    stock_processor,
)
from .demo import DEFAULT_QUESTION, sample_photo
from .vllm_server import run_vllm_job


logger = logging.getLogger(__name__)

PHOTOS = ("chelsea.jpg", "coffee.jpg")
# Printed and plotted: (JSON key, column title, format).
COLUMNS = (
    ("prompt_tokens", "prompt tokens", "{:d}"),
    ("kv_capacity_requests", "KV capacity (requests)", "{:d}"),
    ("offline_requests_per_s", "offline req/s", "{:.3f}"),
    ("offline_output_tokens_per_s", "offline out tok/s", "{:.1f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.2f}"),
    ("served_requests_per_s", "served req/s", "{:.3f}"),
)


def save_folders(root: Path, shapes: Shapes, visual_tokens: int) -> dict[str, str]:
    """The stock llava-hf folder and the VisionTrim folder of one random model (same weights)."""
    config = build_config(shapes, visual_tokens=visual_tokens)
    model, processor = build_model(config, seed=0), build_processor(config)
    visiontrim, stock = root / "visiontrim", root / "stock"
    model.save_pretrained(visiontrim)
    processor.save_pretrained(visiontrim)
    stock_llava_with_same_weights(model).save_pretrained(stock)
    stock_processor(processor).save_pretrained(stock)
    # vLLM's own LLaVA reads llava-hf's weight names only (Transformers 5.24 saves `vision_tower.embeddings.*`).
    for weights_file in stock.glob("*.safetensors"):
        weights = load_file(weights_file)
        save_file({vllm_weight_name(name): weight for name, weight in weights.items()}, weights_file)
    return {"stock": str(stock), f"VisionTrim {visual_tokens}": str(visiontrim)}


def table(results: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, result in results.items():
        cells = [form.format(result[key]) for key, _, form in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> bool:
    """Each measure relative to stock (stock = 1), one bar group per measure."""
    pyplot = plots.pyplot()
    if pyplot is None:
        return False
    stock = results["stock"]
    measures = [(key, title) for key, title, _ in COLUMNS if key != "prompt_tokens"]
    figure, axes = pyplot.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for index, (name, result) in enumerate(results.items()):
        ratios = [result[key] / stock[key] for key, _ in measures]
        positions = [position + index * width for position in range(len(measures))]
        bars = axes.bar(positions, ratios, width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks([position + width * (len(results) - 1) / 2 for position in range(len(measures))])
    axes.set_xticklabels([title for _, title in measures], fontsize=8)
    axes.set_ylabel("relative to stock")
    axes.axhline(1, color="grey", linewidth=0.8)
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def run(args: argparse.Namespace) -> dict:
    if args.arch in vllm_bench_qwen.SERVING_BENCHES:
        return vllm_bench_qwen.run(args)
    if len(args.concurrency) > 1:
        raise UsageError(
            f"argument --concurrency: takes one value for --arch llava, got {len(args.concurrency)}; several "
            "values are for the Qwen archs (one measurement each)."
        )
    if args.media is not None:
        raise UsageError("argument --media: is for the Qwen archs; --arch llava measures one 336 x 336 image.")
    shapes = (
        Shapes(llm_heads=2, llm_kv_heads=2)
        if args.toy
        else Shapes(**{**vars(LLAVA_15_SHAPES), "llm_layers": args.llm_layers, "llm_hidden": args.llm_hidden})
    )
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visiontrim-bench-vllm-") as scratch:
        job = {
            "folders": save_folders(Path(scratch), shapes, args.tokens),
            "photos": [str(sample_photo(name)) for name in PHOTOS],
            "prompt": f"USER: <image>\n{args.question} ASSISTANT:",
            "question": args.question,
            "requests": args.requests,
            "concurrency": args.concurrency[0],
            "max_tokens": args.max_tokens,
            "max_model_len": 2048,
            "server_start_timeout_s": 900,
        }
        logger.warning(
            "Each model gets an offline engine, then `vllm serve`, one after the other, in vLLM's environment: on a "
            "2-core CPU with the real CLIP ViT-L tower this takes 10-20 minutes."
        )
        job_module, result_path = "visiontrim.tools.vllm_bench_job", output / "bench-vllm-raw.json"
        results = run_vllm_job(args.vllm_python, job_module, job, Path(scratch), result_path, args.kv_cache_gib)
    description = (
        f"random LLaVA-1.5-shaped: CLIP tower {shapes.vision_layers} x {shapes.vision_hidden}, LLM "
        f"{shapes.llm_layers} x {shapes.llm_hidden}; vLLM (CPU), fp32, KV cache {args.kv_cache_gib} GiB"
    )
    stock_tokens = results["stock"]["prompt_tokens"]
    kept_tokens = results[f"VisionTrim {args.tokens}"]["prompt_tokens"]
    report = {
        "model": description,
        "question": args.question,
        "requests": args.requests,
        "concurrency": args.concurrency[0],
        "max_tokens": args.max_tokens,
        "kv_capacity_bound": (stock_tokens + args.max_tokens) / (kept_tokens + args.max_tokens),
        "results": results,
    }
    (output / "bench-vllm.json").write_text(json.dumps(report, indent=2))
    plotted = plot(results, output / "bench-vllm.png", description)
    print(description)
    print(table(results))
    print(
        f"KV-capacity bound (stock prompt + output) / (VisionTrim prompt + output): {report['kv_capacity_bound']:.2f}"
    )
    written = [output / "bench-vllm.json"] + ([output / "bench-vllm.png"] if plotted else [])
    print(f"written: {', '.join(map(str, written))}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-python",
        type=existing_file,
        default=".venv-vllm/bin/python",
        help="Python of vLLM's own environment, built by `tests/vllm/make_env.sh .venv-vllm` (the default path)",
    )
    parser.add_argument(
        "--arch",
        choices=("llava", *vllm_bench_qwen.SERVING_BENCHES),
        default="llava",
        help="llava: LLaVA-1.5's CLIP towers, VisionTrim at --tokens per image; qwen2.5-vl / qwen3-vl: the 7B / 8B "
        "model's vision tower, VisionTrim at 25%% and 50%% kept and vLLM's EVS at the same rates, on two images and a "
        "video",
    )
    parser.add_argument("--tokens", type=positive_int, default=64, help="LLaVA: VisionTrim's visual tokens per image")
    parser.add_argument("--llm-layers", type=positive_int, default=LLAVA_15_SHAPES.llm_layers)
    parser.add_argument("--llm-hidden", type=positive_int, default=LLAVA_15_SHAPES.llm_hidden)
    parser.add_argument("--toy", action="store_true", help="tiny widths everywhere (for tests); image grids as given")
    parser.add_argument("--question", type=non_empty_text, default=DEFAULT_QUESTION)
    parser.add_argument("--requests", type=positive_int, default=16, help="requests measured, offline and served")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        nargs="+",
        default=[4],
        help="concurrent clients of vllm serve (Qwen: one measurement per value)",
    )
    parser.add_argument(
        "--media",
        nargs="+",
        choices=list(vllm_bench_qwen.MEDIA),
        default=None,
        help="qwen2.5-vl / qwen3-vl: the media measured (default: the architecture's three); EVS runs only on a video",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per request")
    parser.add_argument("--kv-cache-gib", type=positive_int, default=1, help="VLLM_CPU_KVCACHE_SPACE for both")
    parser.add_argument("--output-dir", default="benchmark-results")
