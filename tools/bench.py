# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim bench`: stock vs VisionTrim with the same weights, in the same process and run, at the
published budgets plus the DVTS-only and TGVC-only ablations (the video architectures: an 8-frame video, per-frame
budgets; the Qwen architectures: `bench_qwen.py`). Every row reports its visual tokens, vision-encoding time
(with the compression's own share), LLM prefill time, time per decoded token, end-to-end time for a fixed answer
length, analytic prefill FLOPs, KV-cache bytes and peak prefill memory, each also as a ratio to stock. Output: a table
on stdout, a JSON file and a PNG plot.
"""

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..architectures import ARCHITECTURES, ONEVISION_FAMILY, Architecture, architecture_named, architecture_of
from ..compression_visiontrim import GuidanceEmbeddingCache, compress_crops, encode_guidance, run_vision_tower
from ..configuration_visiontrim_llava import vision_attention_layer
from . import plots
from .arguments import (
    UsageError,
    existing_file,
    folder_architecture,
    image_file,
    model_folder,
    non_empty_text,
    non_negative_int,
    positive_int,
)
from .bench_onevision import run_onevision
from .bench_qwen import QWEN_BENCHES, run_qwen
from .build import (
    LLAVA_15_SHAPES,
    Shapes,
    describe_shapes,
    stock_llava_with_same_weights,
    stock_processor,
    tower_image_size,
)
from .demo import DEFAULT_QUESTION, encoder, load_or_build, prefiller, sample_photo
from .evaluation.video import sample_frames
from .measure import (
    NOISE,
    Timing,
    kv_cache_bytes,
    machine_description,
    noise_note,
    peak_memory_bytes,
    prefill_flops,
    ratio,
    time_per_step,
    timings,
)


logger = logging.getLogger(__name__)

# Per row: budget per crop, DVTS share and LLM-stage tokens per image (kept from layer LLM_STAGE_LAYER on); None
# budget is the stock model. LLaVA-NeXT rows drop the per-crop newline so that a 5-crop image keeps exactly the
# published 640 / 320 / 160 tokens.
ROWS = {
    "llava": [("stock", None, None, None), ("VisionTrim 192", 192, 0.75, None), ("VisionTrim 128", 128, 0.75, None),
              ("VisionTrim 64", 64, 0.75, None), ("DVTS only 64", 64, 1.0, None), ("TGVC only 64", 64, 0.0, None),
              ("64, LLM 32", 64, 0.75, 32)],
    "llava-next": [("stock", None, None, None), ("VisionTrim 640", 128, 0.75, None),
                   ("VisionTrim 320", 64, 0.75, None), ("VisionTrim 160", 32, 0.75, None),
                   ("DVTS only 320", 64, 1.0, None), ("TGVC only 320", 64, 0.0, None),
                   ("320, LLM 160", 64, 0.75, 160)],
    # 8 frames of 256 patches (stock: 8 x 257 = 2056 tokens); names give the video's total.
    "video-llava": [("stock", None, None, None), ("VisionTrim 256", 32, 0.75, None),
                    ("VisionTrim 128", 16, 0.75, None), ("VisionTrim 64", 8, 0.75, None),
                    ("DVTS only 128", 16, 1.0, None), ("TGVC only 128", 16, 0.0, None)],
    # 8 frames of 576 patches (stock pools each 2 x 2: 8 x 144 = 1152 tokens); names give the video's total.
    "llava-next-video": [("stock", None, None, None), ("VisionTrim 512", 64, 0.75, None),
                         ("VisionTrim 256", 32, 0.75, None), ("VisionTrim 128", 16, 0.75, None),
                         ("DVTS only 256", 32, 1.0, None), ("TGVC only 256", 32, 0.0, None)],
}  # fmt: skip
# The architectures with rows: the LLaVA family's above, the Qwen families' in `bench_qwen.py`, LLaVA-OneVision's in
# `bench_onevision.py`.
BENCHMARKED = tuple(
    architecture
    for architecture in ARCHITECTURES
    if architecture.name in ROWS or architecture.name in QWEN_BENCHES or architecture.family == ONEVISION_FAMILY
)
VIDEO_FRAMES = 8
LLM_STAGE_LAYER = 2  # or the LLM's last layer, when it has no more than 2


@dataclass
class Row:
    name: str
    tokens_per_crop: int | None
    dominant_ratio: float | None
    llm_stage_tokens: int | None = None
    llm_stage_layer: int | None = None
    visual_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_after_llm_stage: int | None = None
    vision_encoding: Timing | None = None
    compression: Timing | None = None  # DVTS + TGVC with a fresh question: the CLIP text tower runs
    compression_repeated_question: Timing | None = None  # the same, the question's embeddings cached
    guidance_encoding: Timing | None = None  # the CLIP text tower, part of `compression` when TGVC runs
    vision_tower: Timing | None = None
    prefill: Timing | None = None
    decode_per_token: float | None = None  # None: below the timer's noise
    end_to_end: Timing | None = None
    prefill_flops: int = 0
    kv_cache_bytes: int = 0
    peak_prefill_memory_bytes: int | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)


def bench_image(architecture: Architecture, image_path: str | None) -> Image.Image:
    """The photo to run: a 2x2-grid (5-crop) square for LLaVA-NeXT, so its budgets are the published ones."""
    photo = "coffee.jpg" if architecture.anyres else "chelsea.jpg"
    image = Image.open(image_path or sample_photo(photo)).convert("RGB")
    if architecture.anyres and image_path is None:
        side = min(image.size)
        image = image.crop(((image.width - side) // 2, 0, (image.width - side) // 2 + side, side))
    return image


def configure(model, processor, row: Row) -> None:
    """Sets the budget of the VisionTrim model and its processor (same weights, another row)."""
    reduction_ratio = 1 - row.tokens_per_crop / model.config.num_patches
    model.config.llm_stage_layer = None
    model.config.reduction_ratio = reduction_ratio
    model.config.dominant_ratio = row.dominant_ratio
    processor.reduction_ratio = reduction_ratio
    if architecture_of(model.config).anyres:
        model.config.crop_newline = False
        processor.crop_newline = False
    if row.llm_stage_tokens is not None:
        model.config.llm_stage_tokens = row.llm_stage_tokens
        model.config.llm_stage_layer = row.llm_stage_layer


def measure_row(row: Row, model, inputs, args, device: torch.device) -> None:
    modality = "video" if "pixel_values_videos" in inputs else "image"
    token_id = model.config.video_token_id if modality == "video" else model.config.image_token_id
    row.visual_tokens = int((inputs["input_ids"] == token_id).sum())
    row.prompt_tokens = inputs["input_ids"].shape[1]
    encode = encoder(model, inputs, modality)
    row.vision_encoding = timings(encode, args.warmup, args.repeats)
    encoded = encode()
    if row.tokens_per_crop is not None:
        inner, config = model.model, model.config
        pixels = inputs["pixel_values_videos" if modality == "video" else "pixel_values"]
        crops, crops_per_unit = inner.media_crops(modality, pixels, inputs.get("image_sizes"))
        tower, (projection, logit_scale) = inner.vision_tower_for(modality), inner.clip_head(modality)
        layer = config.vision_feature_layer
        layer_index = vision_attention_layer(
            layer, config.vision_feature_select_strategy, config.vision_config.num_hidden_layers, "config"
        )
        row.vision_tower = timings(
            lambda: run_vision_tower(tower, crops, layer, layer_index), args.warmup, args.repeats
        )
        run = run_vision_tower(tower, crops, layer, layer_index)
        guidance_prefix = "video_guidance" if modality == "video" else "guidance"
        guidance = (inputs.get(f"{guidance_prefix}_input_ids"), inputs.get(f"{guidance_prefix}_attention_mask"))

        def compress(cache: GuidanceEmbeddingCache | None) -> Callable[[], object]:
            text = (inner.guidance_encoder, *guidance, crops_per_unit, guidance_prefix, cache)
            return lambda: compress_crops(run, config, projection, logit_scale, *text)

        row.compression = timings(compress(None), args.warmup, args.repeats)
        if config.tgvc_enabled:
            warm = GuidanceEmbeddingCache(config)
            compress(warm)()
            row.compression_repeated_question = timings(compress(warm), args.warmup, args.repeats)
            row.guidance_encoding = timings(
                lambda: encode_guidance(inner.guidance_encoder, *guidance, len(crops_per_unit), config.empty_guidance),
                args.warmup,
                args.repeats,
            )
    row.prefill = timings(prefiller(model, inputs, encoded, modality), args.warmup, args.repeats)
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    prefilled = model(**text, mm_encoder_outputs={modality: encoded}, logits_to_keep=1, use_cache=True)
    row.kv_cache_bytes = kv_cache_bytes(prefilled.cache)
    row.peak_prefill_memory_bytes = peak_memory_bytes(prefiller(model, inputs, encoded, modality), device)
    pruning = getattr(prefilled.cache, "visiontrim_pruning", None)
    if pruning is not None:
        row.prompt_tokens_after_llm_stage = pruning.index.shape[1]
        row.prefill_flops = prefill_flops(
            model.config.text_config,
            row.prompt_tokens,
            row.prompt_tokens_after_llm_stage,
            row.llm_stage_layer,
            model.config.merge_iterations,
        )
    else:
        row.prefill_flops = prefill_flops(model.config.text_config, row.prompt_tokens)

    def generate(new_tokens: int, from_features: bool) -> Callable[[], object]:
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        if from_features:  # the images already encoded: what differs between two lengths is decoding alone
            return lambda: model.generate(**text, mm_encoder_outputs={modality: encoded}, **settings)
        return lambda: model.generate(**inputs, **settings)

    row.end_to_end = timings(generate(args.new_tokens, from_features=False), args.warmup, args.repeats)
    answer = timings(generate(args.new_tokens, from_features=True), args.warmup, args.repeats)
    first_token = timings(generate(1, from_features=True), args.warmup, args.repeats)
    row.decode_per_token = time_per_step(answer, first_token, args.new_tokens - 1)


def add_ratios(rows: list[Row]) -> None:
    """Each row's measurements over stock's (same run); speed-ups are stock / row."""
    stock = rows[0]
    for row in rows:
        row.ratios = {
            "visual_tokens": row.visual_tokens / stock.visual_tokens,
            "vision_encoding_time": row.vision_encoding.min / stock.vision_encoding.min,
            "prefill_time": row.prefill.min / stock.prefill.min,
            "prefill_flops": row.prefill_flops / stock.prefill_flops,
            "decode_time_per_token": ratio(row.decode_per_token, stock.decode_per_token),
            "end_to_end_time": row.end_to_end.min / stock.end_to_end.min,
            "kv_cache_bytes": row.kv_cache_bytes / stock.kv_cache_bytes,
            "peak_prefill_memory": (
                row.peak_prefill_memory_bytes / stock.peak_prefill_memory_bytes
                if row.peak_prefill_memory_bytes and stock.peak_prefill_memory_bytes
                else None
            ),
            "compression_share_of_tower": row.compression.min / row.vision_tower.min if row.compression else None,
            "repeated_question_compression_share_of_tower": (
                row.compression_repeated_question.min / row.vision_tower.min
                if row.compression_repeated_question
                else None
            ),
            "guidance_encoding_share_of_tower": (
                row.guidance_encoding.min / row.vision_tower.min if row.guidance_encoding else None
            ),
            "prefill_speedup_over_ideal": (
                (stock.prefill.min / row.prefill.min) / (stock.prefill_flops / row.prefill_flops)
            ),
        }


def table(rows: list[Row]) -> str:
    header = (
        f"{'row':<16}{'tokens':>7}{'vision s':>10}{'compr %':>9}{'text %':>8}{'repeat %':>10}{'prefill s':>11}"
        f"{'speed-up':>9}"
        f"{'FLOPs x':>9}"
        f"{'decode ms':>11}{'e2e s':>8}{'KV MB':>8}{'peak MB':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        compression = f"{100 * row.ratios['compression_share_of_tower']:.1f}" if row.compression else "-"
        text = f"{100 * row.ratios['guidance_encoding_share_of_tower']:.1f}" if row.guidance_encoding else "-"
        repeated = row.ratios["repeated_question_compression_share_of_tower"]
        repeated = f"{100 * repeated:.1f}" if repeated is not None else "-"
        peak = f"{row.peak_prefill_memory_bytes / 2**20:.0f}" if row.peak_prefill_memory_bytes is not None else "n/a"
        decode = f"{1000 * row.decode_per_token:.1f}" if row.decode_per_token is not None else NOISE
        lines.append(
            f"{row.name:<16}{row.visual_tokens:>7}{row.vision_encoding.min:>10.3f}{compression:>9}{text:>8}{repeated:>10}"
            f"{row.prefill.min:>11.3f}{1 / row.ratios['prefill_time']:>9.2f}{1 / row.ratios['prefill_flops']:>9.2f}"
            f"{decode:>11}{row.end_to_end.min:>8.2f}{row.kv_cache_bytes / 2**20:>8.1f}"
            f"{peak:>9}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> bool:
    """
    Prefill speed-up and ideal (FLOPs) speed-up against the visual tokens kept, for the VisionTrim rows; False when
    matplotlib is missing (nothing drawn).
    """
    budget_rows = sorted((row for row in rows[1:] if row.name.startswith("VisionTrim")), key=lambda r: r.visual_tokens)
    tokens = [row.visual_tokens for row in budget_rows]
    lines = [
        (tokens, [1 / row.ratios[ratio] for row in budget_rows], style, label)
        for ratio, style, label in (
            ("prefill_time", "o-", "measured prefill speed-up"),
            ("prefill_flops", "s--", "FLOPs ratio (ideal)"),
            ("end_to_end_time", "^:", "end-to-end speed-up"),
        )
    ]
    return plots.speedup_plot(path, title, lines)


def bench_video(video_path: str | None) -> np.ndarray:
    """`VIDEO_FRAMES` frames `(frames, height, width, 3)`: sampled from `video_path`, or a pan over a bundled photo."""
    if video_path is not None:
        return sample_frames(Path(video_path), VIDEO_FRAMES)
    photo = np.asarray(Image.open(sample_photo("coffee.jpg")).convert("RGB"))
    side = photo.shape[0]
    lefts = np.linspace(0, photo.shape[1] - side, VIDEO_FRAMES, dtype=int)
    return np.stack([photo[:, left : left + side] for left in lefts])


def bench_architecture(args: argparse.Namespace) -> Architecture:
    """The architecture to run: the `--model` folder's (which `--arch` must not contradict), else `--arch`'s."""
    if args.model is None:
        return architecture_named(args.arch or "llava")
    architecture = folder_architecture(args.model, BENCHMARKED, "the benchmark")
    if args.arch is not None and args.arch != architecture.name:
        raise UsageError(
            f"argument --arch: {args.model} is a {architecture.name} folder, not {args.arch}: drop --arch"
        )
    return architecture


def run(args: argparse.Namespace) -> dict:
    if args.new_tokens < 2:
        raise UsageError(
            f"argument --new-tokens: must be at least 2 (the decode time per token is the time of tokens 2 to N), "
            f"got {args.new_tokens}"
        )
    architecture = bench_architecture(args)
    if architecture.qwen:
        return run_qwen(args, architecture)
    if architecture.family == ONEVISION_FAMILY:
        return run_onevision(args, architecture)
    arch = architecture.name
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    image_size = tower_image_size(arch)
    shapes = (
        Shapes(image_size=image_size)
        if args.toy
        else Shapes(
            **{
                **vars(LLAVA_15_SHAPES),
                "image_size": image_size,
                "llm_layers": args.llm_layers,
                "llm_hidden": args.llm_hidden,
            }
        )
    )
    model, processor = load_or_build(args.model, arch, {}, shapes, dtype, args.device)
    stock = stock_llava_with_same_weights(model)
    if architecture.videos:
        media = {"videos": bench_video(args.video)}
        prompt = f"USER: {processor.video_token}\n{args.question} ASSISTANT:"
        pixels_key = "pixel_values_videos"
    else:
        image = bench_image(architecture, args.image)
        media = {"images": image}
        prompt = f"USER: {processor.image_token}\n{args.question} ASSISTANT:"
        pixels_key = "pixel_values"

    logger.warning(
        "Timings on a shared machine are noisy: every row runs in this process with the same weights, so compare the "
        "ratios within this run (min of %d runs after %d warm-up; medians in the JSON).",
        args.repeats,
        args.warmup,
    )
    rows = []
    with torch.inference_mode():
        stage_layer = min(LLM_STAGE_LAYER, model.config.text_config.num_hidden_layers - 1)
        for name, tokens_per_crop, dominant_ratio, llm_tokens in tqdm(ROWS[arch], desc="bench", unit="row"):
            row = Row(name, tokens_per_crop, dominant_ratio, llm_tokens, stage_layer if llm_tokens else None)
            if llm_tokens is not None:
                row.name = f"{name}@{stage_layer}"
            if tokens_per_crop is None:
                net, row_processor = stock, stock_processor(processor)
            else:
                configure(model, processor, row)
                net, row_processor = model, processor
            inputs = row_processor(text=prompt, return_tensors="pt", **media).to(device)
            inputs[pixels_key] = inputs[pixels_key].to(dtype)
            measure_row(row, net, inputs, args, device)
            rows.append(row)
    add_ratios(rows)

    if args.model is not None:
        description = f"{args.model} ({architecture.display_name})"
    else:
        description = f"random {architecture.display_name}-shaped: {describe_shapes(shapes)}"
    report = {
        "model": description,
        "arch": arch,
        "media_size": list(media["images"].size) if "images" in media else list(media["videos"].shape[:3]),
        "question": args.question,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "machine": machine_description(device),
        "rows": [asdict(row) | {"name": row.name} for row in rows],
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{arch}"
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plotted = plot(rows, output / f"{stem}.png", f"{description}\n{report['machine']['cpu']}, {args.dtype}")
    machine = report["machine"]
    print(
        f"{description}; {machine['cpu']}; {args.device}, {args.dtype}, {machine['torch_threads']} threads; "
        f"min of {args.repeats} runs after {args.warmup} warm-up"
    )
    print(table(rows))
    if any(row.decode_per_token is None for row in rows):
        print(noise_note(args.new_tokens))
    written = [output / f"{stem}.json"] + ([output / f"{stem}.png"] if plotted else [])
    print(f"written: {', '.join(map(str, written))}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        choices=[architecture.name for architecture in BENCHMARKED],
        help="shape of the random model (default: llava); with --model, the folder's",
    )
    parser.add_argument(
        "--model", type=model_folder, help="a VisionTrim folder, of any architecture above, instead of a random model"
    )
    parser.add_argument("--llm-layers", type=positive_int, default=LLAVA_15_SHAPES.llm_layers)
    parser.add_argument("--llm-hidden", type=positive_int, default=LLAVA_15_SHAPES.llm_hidden)
    parser.add_argument("--toy", action="store_true", help="tiny widths everywhere (for tests); the grid stays 24x24")
    parser.add_argument("--image", type=image_file, help="photo to run (default: a bundled photo)")
    parser.add_argument(
        "--video",
        type=existing_file,
        help="video architectures: video to sample 8 frames from (default: a pan over a photo)",
    )
    parser.add_argument("--question", type=non_empty_text, default=DEFAULT_QUESTION)
    parser.add_argument(
        "--new-tokens", type=positive_int, default=16, help="fixed answer length for the end-to-end time"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--output-dir", default="benchmark-results")
