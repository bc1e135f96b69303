# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim bench --arch qwen2.5-vl` (or `qwen2-vl`, or `--model` a VisionTrim Qwen folder): stock Qwen vs
VisionTrim with the same weights, in the same process, on a photo at 448 x 448 and at 1008 x 756. The default model has
a real 7B-shaped vision tower (32 blocks x 1280, random weights) and a small random LLM. Per row: visual tokens, the
tower's time (measured once per size: every row runs the same tower), the compression's time and share of it, LLM
prefill time and its speed-up against the FLOPs ratio, time per decoded token and KV-cache bytes, each also as a ratio
to stock. The compression is timed on the recorded tower run, the question's embedding included.
"""

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..architectures import Architecture
from ..mrope_visiontrim import run_qwen_tower
from . import plots
from .arguments import UsageError
from .build_qwen import (
    QWEN2_5_VL_7B_VISION_SHAPES,
    QWEN2_VL_7B_VISION_SHAPES,
    QWEN3_VL_8B_VISION_SHAPES,
    QwenShapes,
    build_qwen_config,
    build_qwen_model,
    build_qwen_processor,
)
from .demo import load_folder, sample_photo, stock_twin
from .measure import (
    NOISE,
    Timing,
    kv_cache_bytes,
    machine_description,
    noise_note,
    prefill_flops,
    ratio,
    time_per_step,
    timings,
)


logger = logging.getLogger(__name__)

# Per row: name, reduction ratio (None: the stock model), DVTS share.
QWEN_ROWS = (
    ("stock", None, None),
    ("VisionTrim 25%", 0.75, 0.75),
    ("VisionTrim 11%", 1 - 64 / 576, 0.75),
    ("DVTS only 11%", 1 - 64 / 576, 1.0),
    ("TGVC only 11%", 1 - 64 / 576, 0.0),
)
# Qwen3-VL's rows add its default, half of each image kept.
QWEN3_ROWS = (QWEN_ROWS[0], ("VisionTrim 50%", 0.5, 0.75), *QWEN_ROWS[1:])
# (width, height) of the photo: a square and a page-sized image (Qwen2.5-VL's 1008 x 756: 72 x 54 patches, 972 merged
# tokens; Qwen3-VL's 16 px patches: 1024 x 768, 64 x 48 patches, 768 merged tokens).
QWEN_IMAGE_SIZES = ((448, 448), (1008, 756))
QWEN3_IMAGE_SIZES = ((448, 448), (1024, 768))
# The text inputs the LLM's prefill takes beside the image features (those a model's processor gives).
TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")


@dataclass(frozen=True)
class QwenBench:
    """What the random-model benchmark of a Qwen architecture runs: its tower, photo sizes and rows."""

    tower: QwenShapes
    sizes: tuple[tuple[int, int], ...] = QWEN_IMAGE_SIZES
    rows: tuple[tuple[str, float | None, float | None], ...] = QWEN_ROWS


# The benchmarked architectures, with the real model's vision tower: the 7B / 8B models'.
QWEN_BENCHES = {
    "qwen2.5-vl": QwenBench(QWEN2_5_VL_7B_VISION_SHAPES),
    "qwen2-vl": QwenBench(QWEN2_VL_7B_VISION_SHAPES),
    "qwen3-vl": QwenBench(QWEN3_VL_8B_VISION_SHAPES, QWEN3_IMAGE_SIZES, QWEN3_ROWS),
    "qwen3-vl-moe": QwenBench(QWEN3_VL_8B_VISION_SHAPES, QWEN3_IMAGE_SIZES, QWEN3_ROWS),
}


@dataclass
class QwenRow:
    name: str
    image_size: tuple[int, int]
    reduction_ratio: float | None
    dominant_ratio: float | None
    visual_tokens: int = 0
    prompt_tokens: int = 0
    compression: Timing | None = None  # DVTS + TGVC on the recorded tower run, question embedding included
    prefill: Timing | None = None
    decode_per_token: float | None = None  # None: below the timer's noise
    prefill_flops: int = 0
    kv_cache_bytes: int = 0
    ratios: dict[str, float | None] = field(default_factory=dict)


def bench_photo(size: tuple[int, int], path: str | None = None) -> Image.Image:
    """The photo at `path` (default: a bundled one), centre-cropped to the aspect ratio of `size` and resized to it."""
    photo = Image.open(path or sample_photo("coffee.jpg")).convert("RGB")
    width, height = size
    scale = min(photo.width / width, photo.height / height)
    crop_width, crop_height = round(width * scale), round(height * scale)
    left, top = (photo.width - crop_width) // 2, (photo.height - crop_height) // 2
    return photo.crop((left, top, left + crop_width, top + crop_height)).resize(size, Image.Resampling.BICUBIC)


def measure(row: QwenRow, model, inputs, encode: Callable[[], Any], args) -> None:
    """
    Fills `row`: tokens, compression time (VisionTrim rows: `encode` compresses a recorded tower run), prefill,
    decode per token, FLOPs and KV bytes, the LLM given `encode()`'s image features.
    """
    row.visual_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    row.prompt_tokens = inputs["input_ids"].shape[1]
    if row.reduction_ratio is not None:
        row.compression = timings(encode, args.warmup, args.repeats)
    encoded = encode()
    text = {name: inputs[name] for name in TEXT_INPUTS if name in inputs}
    features = {"mm_encoder_outputs": {"image": encoded}}
    row.prefill = timings(lambda: model(**text, **features, logits_to_keep=1), args.warmup, args.repeats)
    row.kv_cache_bytes = kv_cache_bytes(model(**text, **features, logits_to_keep=1, use_cache=True).cache)
    row.prefill_flops = prefill_flops(model.config.text_config, row.prompt_tokens)

    def generate(new_tokens: int):
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        return lambda: model.generate(**text, mm_encoder_outputs={"image": encoded}, **settings)

    answer = timings(generate(args.new_tokens), args.warmup, args.repeats)
    first_token = timings(generate(1), args.warmup, args.repeats)
    row.decode_per_token = time_per_step(answer, first_token, args.new_tokens - 1)


def qwen_encoder(row: QwenRow, model, inputs, tower_run) -> Callable[[], Any]:
    """A row's image features from the recorded tower run: stock's merged tokens, or VisionTrim's compression."""
    if row.reduction_ratio is None:  # the tower's own outputs, one image (Qwen3-VL: with its DeepStack sets)
        fields = {"pooler_output": (tower_run.outputs.pooler_output,)}
        if getattr(tower_run.outputs, "deepstack_features", None) is not None:
            fields["deepstack_features"] = [(level,) for level in tower_run.outputs.deepstack_features]
        return lambda: type(tower_run.outputs)(**fields)
    guidance = (inputs["guidance_input_ids"], inputs["guidance_attention_mask"])
    return lambda: model.model.compress_run("image", tower_run, *guidance)


def add_ratios(rows: list[QwenRow], tower: Timing) -> None:
    """Each row's measurements over the stock row of its image size (speed-ups are stock / row)."""
    stock = rows[0]
    for row in rows:
        row.ratios = {
            "visual_tokens": row.visual_tokens / stock.visual_tokens,
            "prefill_time": row.prefill.min / stock.prefill.min,
            "prefill_flops": row.prefill_flops / stock.prefill_flops,
            "prefill_speedup_over_ideal": (stock.prefill.min / row.prefill.min)
            / (stock.prefill_flops / row.prefill_flops),
            "decode_time_per_token": ratio(row.decode_per_token, stock.decode_per_token),
            "kv_cache_bytes": row.kv_cache_bytes / stock.kv_cache_bytes,
            "compression_share_of_tower": row.compression.min / tower.min if row.compression else None,
        }


def table(rows: list[QwenRow], tower: Timing) -> str:
    header = (
        f"{'row':<16}{'tokens':>7}{'compr s':>9}{'compr %':>9}{'prefill s':>11}{'speed-up':>9}{'FLOPs x':>9}"
        f"{'decode ms':>11}{'KV MB':>8}{'KV x':>7}"
    )
    width, height = rows[0].image_size
    lines = [f"{width} x {height}: vision tower {tower.min:.2f} s (min), the same for every row", header]
    lines.append("-" * len(header))
    for row in rows:
        compression = f"{row.compression.min:.3f}" if row.compression else "-"
        share = f"{100 * row.ratios['compression_share_of_tower']:.2f}" if row.compression else "-"
        decode = f"{1000 * row.decode_per_token:.1f}" if row.decode_per_token is not None else NOISE
        lines.append(
            f"{row.name:<16}{row.visual_tokens:>7}{compression:>9}{share:>9}{row.prefill.min:>11.3f}"
            f"{1 / row.ratios['prefill_time']:>9.2f}{1 / row.ratios['prefill_flops']:>9.2f}"
            f"{decode:>11}{row.kv_cache_bytes / 2**20:>8.2f}"
            f"{1 / row.ratios['kv_cache_bytes']:>7.2f}"
        )
    return "\n".join(lines)


def plot(sizes: list[dict], path: Path, title: str) -> bool:
    """
    Measured prefill speed-up and FLOPs ratio against the visual tokens kept, per image size; False without
    matplotlib (nothing drawn).
    """
    lines = []
    for entry in sizes:
        budget_rows = [row for row in entry["rows"] if row.name == "stock" or row.name.startswith("VisionTrim")]
        rows = sorted(budget_rows, key=lambda row: row.visual_tokens)
        size = "{} x {}".format(*entry["image_size"])
        tokens = [row.visual_tokens for row in rows]
        lines.append((tokens, [1 / row.ratios["prefill_time"] for row in rows], "o-", f"{size}: prefill speed-up"))
        lines.append((tokens, [1 / row.ratios["prefill_flops"] for row in rows], "s--", f"{size}: FLOPs ratio"))
    return plots.speedup_plot(path, title, lines, log_tokens=True)


def bench_size(
    size: tuple[int, int],
    rows_spec: tuple,
    model,
    processor,
    stock,
    stock_processor,
    prompt: str,
    args,
    tower: Callable[[Any], Any],
    encoder: Callable[..., Callable[[], Any]],
    media_fields: Callable[[Any], dict],
) -> dict:
    """
    Every row of `rows_spec` (`QWEN_ROWS`) on the photo at `size` (width, height). The tower (`tower(inputs)`, a
    recorded run) is timed once; each row's image features come from `encoder(row, model, inputs, tower_run)`; the
    report names the photo's tower input by `media_fields(inputs)` (Qwen: its grid).
    """
    image = bench_photo(size, args.image)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(args.device)
    tower_time = timings(lambda: tower(inputs), args.warmup, args.repeats)
    tower_run = tower(inputs)
    rows = []
    for name, reduction_ratio, dominant_ratio in rows_spec:
        row = QwenRow(name, size, reduction_ratio, dominant_ratio)
        net, row_processor = (stock, stock_processor) if reduction_ratio is None else (model, processor)
        if reduction_ratio is not None:
            model.config.reduction_ratio = processor.reduction_ratio = reduction_ratio
            model.config.dominant_ratio = dominant_ratio
        row_inputs = row_processor(images=[image], text=[prompt], return_tensors="pt").to(args.device)
        measure(row, net, row_inputs, encoder(row, net, row_inputs, tower_run), args)
        rows.append(row)
    add_ratios(rows, tower_time)
    return {
        "image_size": list(size),
        **media_fields(inputs),
        "tower": tower_time,
        "rows": rows,
    }


def write_report(report: dict, sizes: list[dict], stem: str, title: str, args: argparse.Namespace) -> None:
    """Writes `report` (with each size's rows) as JSON and a plot to `--output-dir`, and prints the tables."""
    report["sizes"] = [
        {**entry, "tower": asdict(entry["tower"]), "rows": [asdict(row) for row in entry["rows"]]} for entry in sizes
    ]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2))
    machine = report["machine"]
    plotted = plot(sizes, output / f"{stem}.png", f"{title}; {machine['cpu']}, {args.dtype}")
    print(
        f"{report['model']}; {machine['cpu']}; {args.device}, {args.dtype}, {machine['torch_threads']} threads; "
        f"min of {args.repeats} runs after {args.warmup} warm-up"
    )
    for entry in sizes:
        print(table(entry["rows"], entry["tower"]))
    if any(row.decode_per_token is None for entry in sizes for row in entry["rows"]):
        print(noise_note(args.new_tokens))
    written = [output / f"{stem}.json"] + ([output / f"{stem}.png"] if plotted else [])
    print(f"written: {', '.join(map(str, written))}")


@dataclass(frozen=True)
class FamilyBench:
    """
    What a family's benchmark measures (see `bench_size`): the photo sizes, the rows, and the family's tower run,
    encoder and media fields.
    """

    sizes: tuple[tuple[int, int], ...]
    rows: tuple[tuple[str, float | None, float | None], ...]
    tower: Callable[[Any], Any]
    encoder: Callable[..., Callable[[], Any]]
    media_fields: Callable[[Any], dict]


def bench_against_stock(
    args: argparse.Namespace,
    architecture: Architecture,
    model,
    processor,
    description: str,
    bench: FamilyBench,
) -> dict:
    """
    Every size and row of `bench` on `model` and its stock twin (same weights, this process), asked `--question` about
    the photo; the report, written as JSON and a plot to `--output-dir`.
    """
    stock, stock_processor = stock_twin(architecture, model, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    logger.warning(
        "Timings on a shared machine are noisy: every row runs in this process with the same weights, so compare the "
        "ratios within this run (min of %d runs after %d warm-up).",
        args.repeats,
        args.warmup,
    )
    family = (bench.tower, bench.encoder, bench.media_fields)
    with torch.inference_mode():
        sizes = [
            bench_size(size, bench.rows, model, processor, stock, stock_processor, prompt, args, *family)
            for size in bench.sizes
        ]
    report = {
        "model": description,
        "arch": architecture.name,
        "question": args.question,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "machine": machine_description(torch.device(args.device)),
    }
    write_report(report, sizes, f"bench-{architecture.name}", description.replace(", LLM", ",\nLLM"), args)
    return report


def run_qwen(args: argparse.Namespace, architecture: Architecture) -> dict:
    """
    The benchmark of a Qwen architecture: the `--model` folder, or a random model with the 7B model's tower
    (`--toy`: tiny), on `--image` or a bundled photo.
    """
    bench = QWEN_BENCHES[architecture.name]
    if args.video is not None:
        sizes = " and ".join(f"{width} x {height}" for width, height in bench.sizes)
        raise UsageError(
            f"argument --video: the {architecture.display_name} benchmark runs a photo at {sizes} (--image), not a "
            "video"
        )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model is not None:
        model, processor = load_folder(args.model, {}, dtype, args.device)
        description = f"{args.model} ({architecture.display_name})"
    else:
        tower = bench.tower
        shapes = (
            QwenShapes()
            if args.toy
            else QwenShapes(**{**vars(tower), "llm_layers": args.llm_layers, "llm_hidden": args.llm_hidden})
        )
        config = build_qwen_config(architecture.name, shapes=shapes, reduction_ratio=0.75)
        model = build_qwen_model(config).to(device=device, dtype=dtype)
        processor = build_qwen_processor(config)
        attention = {
            "qwen2.5-vl": f" (full attention at {shapes.full_attention_blocks})",
            "qwen3-vl": f" (DeepStack at {shapes.deepstack_blocks})",
            "qwen3-vl-moe": f" (DeepStack at {shapes.deepstack_blocks})",
        }.get(architecture.name, "")
        description = (
            f"random {architecture.display_name}-shaped: vision tower {shapes.vision_layers} x "
            f"{shapes.vision_hidden}{attention}, LLM {shapes.llm_layers} x {shapes.llm_hidden}"
        )

    def tower(inputs):
        pixels, grid = inputs["pixel_values"].to(dtype), inputs["image_grid_thw"]
        return run_qwen_tower(model.model.visual, pixels, grid, model.config.scored_block)

    def grid(inputs) -> dict:
        return {"grid_thw": inputs["image_grid_thw"][0].tolist()}

    bench_family = FamilyBench(bench.sizes, bench.rows, tower, qwen_encoder, grid)
    return bench_against_stock(args, architecture, model, processor, description, bench_family)
