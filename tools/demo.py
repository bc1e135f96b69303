# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The main job: one real photo and a question through stock LLaVA and VisionTrim with the same weights, reporting the
tokens given to the LLM, which cells of the patch grid DVTS kept and which TGVC seeds were chosen, and prefill times.
"""

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    ProcessorMixin,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..modeling_visiontrim_llava import VisionTrimEncoderOutput
from .arguments import (
    UsageError,
    image_file,
    model_folder,
    non_empty_text,
    non_negative_int,
    positive_int,
    writable_file,
)
from .build import (
    LLAVA_15_SHAPES,
    Shapes,
    build_config,
    build_model,
    build_processor,
    stock_llava_with_same_weights,
    stock_processor,
)


logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "What animal is in the picture, and what is it lying on?"
DOMINANT_MARK, SEED_MARK, MERGED_MARK = "D", "S", "."
DOMINANT_COLOUR, SEED_COLOUR = (230, 30, 30, 255), (40, 90, 255, 255)
LEGEND_HEIGHT = 24
STOCK, VISIONTRIM = "stock", "VisionTrim"
ARCH_NAMES = {"llava": "LLaVA-1.5", "llava-next": "LLaVA-NeXT", "video-llava": "Video-LLaVA"}
IMAGE_ARCHS = ("llava", "llava-next")


def sample_photo(name: str = "chelsea.jpg") -> Path:
    """Path of a photo shipped with the package (see `tools/assets/LICENSE.md`)."""
    return Path(str(resources.files(__package__) / "assets" / name))


def grid_map(output: VisionTrimEncoderOutput, grid_size: int) -> list[str]:
    """Rows of the patch grid: `D` kept by DVTS, `S` a TGVC seed, `.` merged into a seed (first image)."""
    cells = [MERGED_MARK] * grid_size**2
    for index in output.dominant_indices[0].tolist():
        cells[index] = DOMINANT_MARK
    for index in output.complement_seed_indices[0].tolist():
        cells[index] = SEED_MARK
    return [" ".join(cells[row * grid_size : (row + 1) * grid_size]) for row in range(grid_size)]


def first_crop_image(pixel_values: torch.Tensor, image_mean: list[float], image_std: list[float]) -> Image.Image:
    """The first crop the tower sees (LLaVA's image, LLaVA-NeXT's base view), un-normalised, as an RGB image."""
    crop = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0].float().cpu()
    crop = crop * torch.tensor(image_std).view(3, 1, 1) + torch.tensor(image_mean).view(3, 1, 1)
    return Image.fromarray((crop.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def save_overlay(crop: Image.Image, output: VisionTrimEncoderOutput, grid_size: int, path: Path) -> None:
    """
    Writes `crop` with its DVTS cells boxed in red and its TGVC seeds filled in blue, as PNG, with a legend strip of
    `LEGEND_HEIGHT` pixels below the image.
    """
    canvas = crop.convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cell_height, cell_width = canvas.height / grid_size, canvas.width / grid_size

    def box(index: int) -> tuple[float, float, float, float]:
        row, col = divmod(index, grid_size)
        return col * cell_width, row * cell_height, (col + 1) * cell_width - 1, (row + 1) * cell_height - 1

    for index in output.dominant_indices[0].tolist():
        draw.rectangle(box(index), outline=DOMINANT_COLOUR, width=2)
    for index in output.complement_seed_indices[0].tolist():
        draw.rectangle(box(index), fill=SEED_COLOUR[:3] + (140,), outline=SEED_COLOUR, width=2)
    overlay = Image.alpha_composite(canvas, layer).convert("RGB")
    figure = Image.new("RGB", (overlay.width, overlay.height + LEGEND_HEIGHT), "white")
    figure.paste(overlay)
    legend = ImageDraw.Draw(figure)
    top = overlay.height + 6
    legend.rectangle((6, top, 18, top + 12), outline=DOMINANT_COLOUR, width=2)
    legend.text((24, top), f"kept by DVTS ({len(output.dominant_indices[0])})", fill="black")
    left = figure.width // 2
    legend.rectangle((left, top, left + 12, top + 12), fill=SEED_COLOUR[:3], outline=SEED_COLOUR, width=2)
    legend.text((left + 18, top), f"TGVC seed ({len(output.complement_seed_indices[0])}); rest merged", fill="black")
    figure.save(path, format="PNG")


def timings(function: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `function` after one warm-up call."""
    function()
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        results.append(time.perf_counter() - start)
    return results


def describe(seconds: list[float]) -> str:
    return f"min {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s"


def load_or_build(
    model_path: str | None, arch: str, tokens: int | None, shapes: Shapes, dtype: torch.dtype, device: str
) -> tuple[LlavaForConditionalGeneration | LlavaNextForConditionalGeneration, ProcessorMixin]:
    if model_path is None:
        if tokens is not None and not tokens <= shapes.num_patches:
            raise UsageError(f"argument --tokens: {tokens} is more than the {shapes.num_patches} patches of a crop")
        logger.info(
            "Building a random %s-shaped VisionTrim model (CLIP ViT-L/14 towers at %d px, small LLM)",
            ARCH_NAMES[arch],
            shapes.image_size,
        )
        config = build_config(shapes, arch=arch, visual_tokens=tokens or 64)
        return build_model(config).to(device=device, dtype=dtype), build_processor(config)
    overrides = {} if tokens is None else {"visual_tokens": tokens}
    try:
        AutoConfig.from_pretrained(model_path, trust_remote_code=True, **overrides)
    except ValueError as error:
        raise UsageError(f"argument --tokens: {error}") from None
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=dtype, **overrides)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True, **overrides)
    return model.to(device).eval(), processor


def encoder(
    model: LlavaForConditionalGeneration, inputs: BatchFeature, modality: str = "image"
) -> Callable[[], BaseModelOutputWithPooling]:
    """
    Image (or, `modality="video"`, video) encoding of `inputs` by `model`, with the image sizes and guidance tensors
    the inputs hold.
    """
    if modality == "video":
        video_inputs = {key: value for key, value in inputs.items() if key.startswith("video_guidance_")}
        return lambda: model.model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], **video_inputs
        )
    image_inputs = {key: value for key, value in inputs.items() if key.startswith("guidance_") or key == "image_sizes"}
    return lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], **image_inputs)


def prefiller(
    model: LlavaForConditionalGeneration,
    inputs: BatchFeature,
    encoded: BaseModelOutputWithPooling,
    modality: str = "image",
) -> Callable[[], object]:
    """LLM prefill of `inputs` with the images (or videos) already encoded, keeping the last logits, as generate()."""
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    return lambda: model(**text, mm_encoder_outputs={modality: encoded}, logits_to_keep=1)


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    shapes = Shapes(**{**vars(LLAVA_15_SHAPES), "llm_layers": args.llm_layers, "llm_hidden": args.llm_hidden})
    model, processor = load_or_build(args.model, args.arch, args.tokens, shapes, dtype, args.device)
    models = {STOCK: stock_llava_with_same_weights(model), VISIONTRIM: model}
    image = Image.open(args.image or sample_photo()).convert("RGB")
    prompt = f"USER: {processor.image_token}\n{args.question} ASSISTANT:"
    inputs = {
        STOCK: stock_processor(processor)(images=image, text=prompt, return_tensors="pt"),
        VISIONTRIM: processor(images=image, text=prompt, return_tensors="pt"),
    }
    for batch in inputs.values():
        batch.to(args.device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    config = model.config
    grid_size = config.vision_config.image_size // config.vision_config.patch_size

    with torch.inference_mode():
        encoded = {name: encoder(models[name], inputs[name])() for name in models}
        vision_seconds = {name: timings(encoder(models[name], inputs[name]), args.repeats) for name in models}
        prefill_seconds = {
            name: timings(prefiller(models[name], inputs[name], encoded[name]), args.repeats) for name in models
        }
        answers = {}
        for name in models if args.max_new_tokens else ():
            generated = models[name].generate(**inputs[name], max_new_tokens=args.max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs[name]["input_ids"].shape[1] :]
            answers[name] = processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    visual = {name: int((inputs[name]["input_ids"] == config.image_token_id).sum()) for name in models}
    guidance = processor.guidance_tokenizer.decode(
        inputs[VISIONTRIM]["guidance_input_ids"][0], skip_special_tokens=True
    )
    if args.model is None:
        description = (
            f"random {ARCH_NAMES[args.arch]}-shaped (CLIP ViT-L/14-336, LLM {shapes.llm_layers} x {shapes.llm_hidden})"
        )
    else:
        description = args.model
    crops = encoded[VISIONTRIM].dominant_indices.shape[0]
    newline = " + 1 image_newline" if getattr(config, "crop_newline", False) else ""
    end_to_end = {name: min(vision_seconds[name]) + min(prefill_seconds[name]) for name in models}
    lines = [
        f"model: {description}",
        f"image: {args.image or sample_photo()}  question: {args.question!r}",
        f"guidance text (CLIP tokens): {guidance!r}",
        f"visual tokens fed to the LLM: stock {visual[STOCK]}, VisionTrim {visual[VISIONTRIM]} "
        f"({crops} crop{'s' * (crops > 1)} x ({config.dominant_tokens} DVTS + {config.complement_tokens} TGVC"
        f"{newline}), "
        f"{1 - visual[VISIONTRIM] / visual[STOCK]:.1%} fewer)",
        f"prompt length: stock {inputs[STOCK]['input_ids'].shape[1]}, "
        f"VisionTrim {inputs[VISIONTRIM]['input_ids'].shape[1]} tokens",
        f"{grid_size}x{grid_size} patch grid of the {'base crop' if crops > 1 else 'image'} ({DOMINANT_MARK} = kept "
        f"by DVTS, {SEED_MARK} = TGVC seed, {MERGED_MARK} = merged into a seed):",
        *("  " + row for row in grid_map(encoded[VISIONTRIM], grid_size)),
        f"timings on {args.device}, {args.dtype}, {torch.get_num_threads()} threads, 1 warm-up + {args.repeats} runs:",
        f"  vision encoding, stock: {describe(vision_seconds[STOCK])}",
        f"  vision encoding, VisionTrim (tower + DVTS + TGVC): {describe(vision_seconds[VISIONTRIM])}",
        f"  LLM prefill, stock: {describe(prefill_seconds[STOCK])}",
        f"  LLM prefill, VisionTrim: {describe(prefill_seconds[VISIONTRIM])}",
        f"  prefill speed-up: LLM {min(prefill_seconds[STOCK]) / min(prefill_seconds[VISIONTRIM]):.2f}x, "
        f"end to end {end_to_end[STOCK] / end_to_end[VISIONTRIM]:.2f}x (minimums)",
        *(f"answer, {name}: {answer!r}" for name, answer in answers.items()),
    ]
    if args.save:
        image_processor = processor.image_processor
        crop = first_crop_image(
            inputs[VISIONTRIM]["pixel_values"], image_processor.image_mean, image_processor.image_std
        )
        save_overlay(crop, encoded[VISIONTRIM], grid_size, Path(args.save))
        lines.append(f"overlay written to {args.save}")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=model_folder, help="a converted VisionTrim checkpoint folder (default: build a random one)"
    )
    parser.add_argument(
        "--arch", choices=IMAGE_ARCHS, default="llava", help="shape of the random model (without --model)"
    )
    parser.add_argument("--image", type=image_file, help="photo to run (default: the bundled chelsea.jpg)")
    parser.add_argument("--question", type=non_empty_text, default=DEFAULT_QUESTION)
    parser.add_argument(
        "--tokens", type=positive_int, help="visual tokens kept per crop (default: 64, or the checkpoint's)"
    )
    parser.add_argument("--save", type=writable_file, help="write a PNG overlay of the kept cells to this path")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed runs after one warm-up (default: 2)")
    parser.add_argument("--llm-layers", type=positive_int, default=LLAVA_15_SHAPES.llm_layers)
    parser.add_argument("--llm-hidden", type=positive_int, default=LLAVA_15_SHAPES.llm_hidden)
    parser.add_argument(
        "--max-new-tokens", type=non_negative_int, default=0, help="also generate an answer from both models"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
