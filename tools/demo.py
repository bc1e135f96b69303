# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The main job: one real photo and a question through stock and VisionTrim with the same weights, reporting the tokens
given to the LLM, which cells of the patch grid (Qwen: of the merged-unit grid) DVTS kept and which TGVC seeds were
chosen, and prefill times. It runs a random LLaVA-family model at its real tower shapes, or any VisionTrim folder.
"""

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..architectures import (
    ARCHITECTURES,
    LLAVA_FAMILY,
    ONEVISION_FAMILY,
    Architecture,
    architecture_named,
    supported,
)
from .arguments import (
    UsageError,
    folder_architecture,
    image_file,
    model_folder,
    non_empty_text,
    non_negative_int,
    positive_int,
    reduction_ratio,
    writable_file,
)
from .build import (
    LLAVA_15_SHAPES,
    LLAVA_ARCHITECTURES,
    Shapes,
    build_config,
    build_model,
    build_processor,
    describe_shapes,
    stock_llava_with_same_weights,
    stock_processor,
    tower_image_size,
    uncompressed_processor,
)
from .build_onevision import stock_onevision_with_same_weights
from .build_qwen import stock_qwen_with_same_weights
from .evaluation.data import Question
from .evaluation.runner import chat_prompt
from .measure import Timing, timings


logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "What animal is in the picture, and what is it lying on?"
DOMINANT_MARK, SEED_MARK, MERGED_MARK = "D", "S", "."
DOMINANT_COLOUR, SEED_COLOUR = (230, 30, 30, 255), (40, 90, 255, 255)
LEGEND_HEIGHT = 24
STOCK, VISIONTRIM = "stock", "VisionTrim"
# The inputs that place the visual tokens in the prompt, beside its ids (Qwen's M-RoPE needs the image grids).
PROMPT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")


def sample_photo(name: str = "chelsea.jpg") -> Path:
    """Path of a photo shipped with the package (see `tools/assets/LICENSE.md`)."""
    return Path(str(resources.files(__package__) / "assets" / name))


@dataclass
class KeptCells:
    """The cells of one crop's (Qwen: one image's unit) grid that DVTS kept and that TGVC chose as seeds."""

    dominant: list[int]  # raster indices in the `rows x cols` grid
    seeds: list[int]
    rows: int
    cols: int


def kept_cells(
    architecture: Architecture, config: PreTrainedConfig, inputs: BatchFeature, encoded: BaseModelOutputWithPooling
) -> KeptCells:
    """
    The kept cells of the first crop (LLaVA: the image, LLaVA-NeXT: its base view; on the tower's patch grid) or, for
    Qwen, of the image (on its grid of merged units, `(h / 2) x (w / 2)` patches).
    """
    if architecture.qwen:
        _, height, width = inputs["image_grid_thw"][0].tolist()
        merge = config.vision_config.spatial_merge_size
        dominant, seeds = encoded.dominant_units.tolist(), encoded.complement_seed_units.tolist()
        return KeptCells(dominant, seeds, height // merge, width // merge)
    side = config.vision_config.image_size // config.vision_config.patch_size
    return KeptCells(encoded.dominant_indices[0].tolist(), encoded.complement_seed_indices[0].tolist(), side, side)


def grid_map(cells: KeptCells) -> list[str]:
    """Rows of the grid: `D` kept by DVTS, `S` a TGVC seed, `.` merged into a seed."""
    marks = [MERGED_MARK] * (cells.rows * cells.cols)
    for index in cells.dominant:
        marks[index] = DOMINANT_MARK
    for index in cells.seeds:
        marks[index] = SEED_MARK
    return [" ".join(marks[row * cells.cols : (row + 1) * cells.cols]) for row in range(cells.rows)]


def first_crop_image(pixel_values: torch.Tensor, image_mean: list[float], image_std: list[float]) -> Image.Image:
    """The first crop the tower sees (LLaVA's image, LLaVA-NeXT's base view), un-normalised, as an RGB image."""
    crop = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0].float().cpu()
    crop = crop * torch.tensor(image_std).view(3, 1, 1) + torch.tensor(image_mean).view(3, 1, 1)
    return Image.fromarray((crop.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def tower_view(
    architecture: Architecture,
    config: PreTrainedConfig,
    processor: ProcessorMixin,
    inputs: BatchFeature,
    image: Image.Image,
) -> Image.Image:
    """
    The image as the tower saw it: LLaVA's first crop un-normalised; for Qwen, the photo resized to the patch grid the
    processor chose (its `image_grid_thw` times the patch size).
    """
    if architecture.qwen:
        _, height, width = inputs["image_grid_thw"][0].tolist()
        patch = config.vision_config.patch_size
        return image.resize((width * patch, height * patch), Image.Resampling.BICUBIC)
    image_processor = processor.image_processor
    return first_crop_image(inputs["pixel_values"], image_processor.image_mean, image_processor.image_std)


def save_overlay(view: Image.Image, cells: KeptCells, path: Path) -> None:
    """
    Writes `view` with its DVTS cells boxed in red and its TGVC seeds filled in blue, as PNG, with a legend strip of
    `LEGEND_HEIGHT` pixels below the image.
    """
    canvas = view.convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cell_height, cell_width = canvas.height / cells.rows, canvas.width / cells.cols

    def box(index: int) -> tuple[float, float, float, float]:
        row, col = divmod(index, cells.cols)
        return col * cell_width, row * cell_height, (col + 1) * cell_width - 1, (row + 1) * cell_height - 1

    for index in cells.dominant:
        draw.rectangle(box(index), outline=DOMINANT_COLOUR, width=2)
    for index in cells.seeds:
        draw.rectangle(box(index), fill=SEED_COLOUR[:3] + (140,), outline=SEED_COLOUR, width=2)
    overlay = Image.alpha_composite(canvas, layer).convert("RGB")
    figure = Image.new("RGB", (overlay.width, overlay.height + LEGEND_HEIGHT), "white")
    figure.paste(overlay)
    legend = ImageDraw.Draw(figure)
    top = overlay.height + 6
    legend.rectangle((6, top, 18, top + 12), outline=DOMINANT_COLOUR, width=2)
    legend.text((24, top), f"kept by DVTS ({len(cells.dominant)})", fill="black")
    left = figure.width // 2
    legend.rectangle((left, top, left + 12, top + 12), fill=SEED_COLOUR[:3], outline=SEED_COLOUR, width=2)
    legend.text((left + 18, top), f"TGVC seed ({len(cells.seeds)}); rest merged", fill="black")
    figure.save(path, format="PNG")


def describe(timing: Timing) -> str:
    return f"min {timing.min:.3f} s, median {timing.median:.3f} s"


def build_random(
    arch: str, budget: dict[str, float], shapes: Shapes, dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random VisionTrim model of the LLaVA-family `arch` with `shapes`, and its processor, at `budget`."""
    tokens = budget.get("visual_tokens")
    if tokens is not None and not tokens <= shapes.num_patches:
        raise UsageError(f"argument --tokens: {tokens} is more than the {shapes.num_patches} patches of a crop")
    logger.info(
        "Building a random %s-shaped VisionTrim model: %s",
        architecture_named(arch).display_name,
        describe_shapes(shapes),
    )
    config = build_config(shapes, arch=arch, **(budget or {"visual_tokens": 64}))
    return build_model(config).to(device=device, dtype=dtype), build_processor(config)


def load_folder(
    path: str, budget: dict[str, float], dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model and processor of the VisionTrim folder `path`, with the `budget` overrides (checked first)."""
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=True, **budget)
    except ValueError as error:
        option = "--tokens" if "visual_tokens" in budget else "--reduction-ratio"
        raise UsageError(f"argument {option}: {error}") from None
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype, **budget)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, **budget)
    return model.to(device).eval(), processor


def load_or_build(
    model_path: str | None, arch: str, budget: dict[str, float], shapes: Shapes, dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The folder's model and processor, or a random LLaVA-family one of `arch` and `shapes`, at `budget`."""
    if model_path is None:
        return build_random(arch, budget, shapes, dtype, device)
    return load_folder(model_path, budget, dtype, device)


def stock_twin(
    architecture: Architecture, model: PreTrainedModel, processor: ProcessorMixin
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The stock model sharing `model`'s weights, and the processor of its prompts (every visual token)."""
    if architecture.qwen:
        return stock_qwen_with_same_weights(model), uncompressed_processor(processor)
    if architecture.family == ONEVISION_FAMILY:
        return stock_onevision_with_same_weights(model), uncompressed_processor(processor)
    return stock_llava_with_same_weights(model), stock_processor(processor)


def encoder(
    model: PreTrainedModel, inputs: BatchFeature, modality: str = "image"
) -> Callable[[], BaseModelOutputWithPooling]:
    """
    Image (or, `modality="video"`, video) encoding of `inputs` by `model`, with the image sizes (Qwen: grids) and
    guidance tensors the inputs hold.
    """
    if modality == "video":
        video_inputs = {key: value for key, value in inputs.items() if key.startswith("video_guidance_")}
        return lambda: model.model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], **video_inputs
        )
    image_inputs = {
        key: value
        for key, value in inputs.items()
        if key.startswith("guidance_") or key in ("image_sizes", "image_grid_thw")
    }
    return lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], **image_inputs)


def prefiller(
    model: PreTrainedModel,
    inputs: BatchFeature,
    encoded: BaseModelOutputWithPooling,
    modality: str = "image",
) -> Callable[[], object]:
    """LLM prefill of `inputs` with the images (or videos) already encoded, keeping the last logits, as generate()."""
    text = {key: inputs[key] for key in PROMPT_INPUTS if key in inputs}
    return lambda: model(**text, mm_encoder_outputs={modality: encoded}, logits_to_keep=1)


def prepare(
    processor: ProcessorMixin, image: Image.Image, prompt: str, device: str | torch.device, dtype: torch.dtype
) -> BatchFeature:
    """The processor's inputs for `image` and `prompt` on `device`, pixels in `dtype` (as `pixel_values`)."""
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    if "pixel_values_images" in batch:  # Video-LLaVA's stock processor's name; its models take `pixel_values` too
        batch["pixel_values"] = batch.pop("pixel_values_images")
    batch = batch.to(device)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def token_breakdown(architecture: Architecture, config: PreTrainedConfig, encoded: BaseModelOutputWithPooling) -> str:
    """How VisionTrim's visual tokens are made: per crop (LLaVA) or out of the image's merged units (Qwen)."""
    if architecture.qwen:
        return f"{len(encoded.dominant_units)} DVTS + {len(encoded.complement_seed_units)} TGVC"
    crops = encoded.dominant_indices.shape[0]
    newline = " + 1 image_newline" if architecture.anyres and config.crop_newline else ""
    return (
        f"{crops} crop{'s' * (crops > 1)} x ({config.dominant_tokens} DVTS + {config.complement_tokens} TGVC{newline})"
    )


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    budget = {"visual_tokens": args.tokens} if args.tokens is not None else {}
    if args.reduction_ratio is not None:
        budget = {"reduction_ratio": args.reduction_ratio}
    if args.model is not None:
        architecture = folder_architecture(args.model, ARCHITECTURES, "the main job")
    else:
        architecture = architecture_named(args.arch)
    if architecture.qwen and args.tokens is not None:
        raise UsageError(
            f"argument --tokens: {architecture.display_name} keeps a share of each image's merged tokens (images "
            "have any size): give --reduction-ratio instead"
        )
    shapes = Shapes(
        **{
            **vars(LLAVA_15_SHAPES),
            "image_size": tower_image_size(architecture.name),
            "llm_layers": args.llm_layers,
            "llm_hidden": args.llm_hidden,
        }
    )
    model, processor = load_or_build(args.model, architecture.name, budget, shapes, dtype, args.device)
    stock, stock_prompts = stock_twin(architecture, model, processor)
    models = {STOCK: stock, VISIONTRIM: model}
    image = Image.open(args.image or sample_photo()).convert("RGB")
    prompt = chat_prompt(processor, Question("main job", args.question, "main job", image_data=image))
    inputs = {
        STOCK: prepare(stock_prompts, image, prompt, args.device, dtype),
        VISIONTRIM: prepare(processor, image, prompt, args.device, dtype),
    }
    inputs[STOCK] = BatchFeature({key: value for key, value in inputs[STOCK].items() if "guidance_" not in key})
    config = model.config

    with torch.inference_mode():
        encoded = {name: encoder(models[name], inputs[name])() for name in models}
        vision_seconds = {name: timings(encoder(models[name], inputs[name]), 1, args.repeats) for name in models}
        prefill_seconds = {
            name: timings(prefiller(models[name], inputs[name], encoded[name]), 1, args.repeats) for name in models
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
            f"random {architecture.display_name}-shaped (CLIP ViT-L/14-{shapes.image_size}, LLM "
            f"{shapes.llm_layers} x {shapes.llm_hidden})"
        )
    else:
        description = f"{args.model} ({architecture.display_name})"
    cells = kept_cells(architecture, config, inputs[VISIONTRIM], encoded[VISIONTRIM])
    qwen = architecture.qwen
    if qwen:
        grid = f"{cells.rows}x{cells.cols} grid of the image's merged units, 2x2 patches each"
    else:
        crops = encoded[VISIONTRIM].dominant_indices.shape[0]
        grid = f"{cells.rows}x{cells.cols} patch grid of the {'base crop' if crops > 1 else 'image'}"
    end_to_end = {name: vision_seconds[name].min + prefill_seconds[name].min for name in models}
    lines = [
        f"model: {description}",
        f"image: {args.image or sample_photo()}  question: {args.question!r}",
        f"guidance text ({'CLIP' if architecture.family == LLAVA_FAMILY else 'LLM'} tokens): {guidance!r}",
        f"visual tokens fed to the LLM: stock {visual[STOCK]}, VisionTrim {visual[VISIONTRIM]} "
        f"({token_breakdown(architecture, config, encoded[VISIONTRIM])}, "
        f"{1 - visual[VISIONTRIM] / visual[STOCK]:.1%} fewer)",
        f"prompt length: stock {inputs[STOCK]['input_ids'].shape[1]}, "
        f"VisionTrim {inputs[VISIONTRIM]['input_ids'].shape[1]} tokens",
        f"{grid} ({DOMINANT_MARK} = kept by DVTS, {SEED_MARK} = TGVC seed, {MERGED_MARK} = merged into a seed):",
        *("  " + row for row in grid_map(cells)),
        f"timings on {args.device}, {args.dtype}, {torch.get_num_threads()} threads, 1 warm-up + {args.repeats} runs:",
        f"  vision encoding, stock: {describe(vision_seconds[STOCK])}",
        f"  vision encoding, VisionTrim (tower + DVTS + TGVC): {describe(vision_seconds[VISIONTRIM])}",
        f"  LLM prefill, stock: {describe(prefill_seconds[STOCK])}",
        f"  LLM prefill, VisionTrim: {describe(prefill_seconds[VISIONTRIM])}",
        f"  prefill speed-up: LLM {prefill_seconds[STOCK].min / prefill_seconds[VISIONTRIM].min:.2f}x, "
        f"end to end {end_to_end[STOCK] / end_to_end[VISIONTRIM]:.2f}x (minimums)",
        *(f"answer, {name}: {answer!r}" for name, answer in answers.items()),
    ]
    if args.save:
        view = tower_view(architecture, config, processor, inputs[VISIONTRIM], image)
        save_overlay(view, cells, Path(args.save))
        lines.append(f"overlay written to {args.save}")
    print("\n".join(lines))


def random_arch(text: str) -> str:
    """A LLaVA-family architecture name: the random model's shape."""
    if text not in [architecture.name for architecture in LLAVA_ARCHITECTURES]:
        raise argparse.ArgumentTypeError(
            f"the random model is one of {supported(LLAVA_ARCHITECTURES)}, got {text!r} (run other architectures "
            "from a VisionTrim folder with --model)"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=model_folder,
        help=f"a VisionTrim folder, of any architecture: {supported()} (default: build a random model)",
    )
    parser.add_argument(
        "--arch",
        type=random_arch,
        default="llava",
        help=f"shape of the random model, without --model: {supported(LLAVA_ARCHITECTURES)} (default: llava)",
    )
    parser.add_argument("--image", type=image_file, help="photo to run (default: the bundled chelsea.jpg)")
    parser.add_argument("--question", type=non_empty_text, default=DEFAULT_QUESTION)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--tokens", type=positive_int, help="LLaVA: visual tokens kept per crop (default: 64, or the folder's)"
    )
    budget.add_argument(
        "--reduction-ratio",
        type=reduction_ratio,
        help="share of visual tokens removed (Qwen: of each image's merged tokens; default: the folder's)",
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
