# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim analyze`: how the LLM's text tokens attend to the visual tokens, layer by layer (the paper's
motivation for TGVC):

- attention shift: the text-to-visual attention (last prompt token, and the mean over the question's tokens) laid back
  onto the tower's patch grid (24x24; per crop for LLaVA-NeXT), its centre of mass per layer and how it moves with
  depth, and its distance to the question's target when a box is given;
- attention dispersion: per layer, the entropy of the text-to-visual attention and the share of its mass on the top-k
  visual tokens; for a VisionTrim model the same over the tokens it kept, so stock and VisionTrim compare side by side.

Only the recorded layers' attention is computed (from each layer's input, with its RoPE, by the same function the LLM
stage uses), while every layer runs its usual kernel: no model is asked for all its attention maps. It runs the LLaVA
family's folders, stock or VisionTrim, on images.
"""

import argparse
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ..architectures import architecture_of, is_visiontrim, supported
from ..llm_stage_visiontrim import causal_attention_probabilities
from . import plots
from .arguments import (
    UsageError,
    existing_file,
    existing_folder,
    existing_path,
    folder_architecture,
    model_folder,
    positive_int,
)
from .build import LLAVA_ARCHITECTURES, processor_architecture, stock_llava_with_same_weights, stock_processor
from .demo import first_crop_image, prepare
from .evaluation.data import DataError, Question, column_names, load_local_dataset, read_json_lines
from .evaluation.runner import chat_prompt


logger = logging.getLogger(__name__)

ROW_KINDS = ("last_token", "question")


# ---- measurements on attention distributions


def centre_of_mass(grid: numpy.ndarray) -> numpy.ndarray:
    """`(row, col)` centre of mass of a non-negative `(rows, cols)` map, in cell units; NaN for an all-zero map."""
    total = grid.sum()
    if total <= 0:
        return numpy.array([numpy.nan, numpy.nan])
    rows, cols = numpy.indices(grid.shape)
    return numpy.array([(rows * grid).sum() / total, (cols * grid).sum() / total])


def attention_entropy(weights: numpy.ndarray) -> float:
    """Shannon entropy (nats) of `weights` normalised to a distribution (zero weights contribute nothing)."""
    probabilities = weights / weights.sum()
    probabilities = probabilities[probabilities > 0]
    return float(-(probabilities * numpy.log(probabilities)).sum())


def top_k_share(weights: numpy.ndarray, k: int) -> float:
    """Share of the total mass on the `k` largest weights."""
    return float(numpy.sort(weights)[::-1][:k].sum() / weights.sum())


# ---- recording attention rows of chosen decoder layers


@dataclass
class RecordedRows:
    """Head-mean attention probabilities of some query positions, per recorded layer: `{layer: (queries, keys)}`."""

    rows: dict[int, torch.Tensor]


@contextmanager
def record_attention_rows(
    language_model: torch.nn.Module, layers: list[int], queries: torch.Tensor, key_mask: torch.Tensor
) -> Iterator[RecordedRows]:
    """Records `attention_rows` of `queries` at each of `layers` while the language model runs, one row set a layer."""
    recorded = RecordedRows({})
    handles = []
    for layer in layers:
        attention = language_model.layers[layer].self_attn
        missing = [
            name
            for name in ("q_proj", "k_proj", "head_dim", "num_key_value_groups", "scaling")
            if not hasattr(attention, name)
        ]
        if missing:
            raise ValueError(
                f"Layer {layer}'s attention ({type(attention).__name__}) lacks {missing}: the analysis supports "
                "Llama-style decoders (Llama, Vicuna, Mistral)."
            )

        def hook(module, args, kwargs, layer=layer):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            probabilities = causal_attention_probabilities(
                module, hidden_states, kwargs["position_embeddings"], key_mask[None]
            )
            recorded.rows[layer] = probabilities[0, queries].cpu()

        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


# ---- where each visual token sits in the patch grid


def grid_side(vision_config) -> int:
    """Patches per side of a crop's grid: 24 for CLIP ViT-L/14-336, 16 for Video-LLaVA's 224 px towers."""
    return vision_config.image_size // vision_config.patch_size


def visual_token_cells(model, inputs, image_outputs) -> numpy.ndarray:
    """
    `(visual tokens, 3)`: the `(crop, row, col)` cell of each visual token of the (single) image, in prompt order;
    `-1` rows for `image_newline` tokens. Stock LLaVA: raster order; VisionTrim: the DVTS cells then the TGVC seed
    cells (merged tokens sit on their seed) of each crop; stock LLaVA-NeXT: the base view, then the unpadded grid.
    """
    config = model.config
    anyres = architecture_of(config).anyres
    grid = grid_side(config.vision_config)
    if is_visiontrim(config):
        dominant, seeds = image_outputs.dominant_indices, image_outputs.complement_seed_indices
        per_crop = torch.cat([dominant, seeds], dim=1).cpu().numpy()
        cells = []
        for crop, indices in enumerate(per_crop):
            cells.extend((crop, *divmod(int(index), grid)) for index in indices)
            if anyres and config.crop_newline:
                cells.append((-1, -1, -1))
        return numpy.array(cells)
    base = [(0, *divmod(index, grid)) for index in range(grid * grid)]
    if not anyres:
        return numpy.array(base)
    image_size = inputs["image_sizes"][0]
    crops_high, crops_wide = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    full = torch.arange(crops_high * grid * crops_wide * grid).view(1, crops_high * grid, crops_wide * grid)
    kept = unpad_image(full, image_size)[0]  # the stock model's own unpadding, on positions
    cells = list(base)
    for row in kept.tolist():
        for position in row:
            grid_row, grid_col = divmod(position, crops_wide * grid)
            crop = 1 + (grid_row // grid) * crops_wide + grid_col // grid
            cells.append((crop, grid_row % grid, grid_col % grid))
        cells.append((-1, -1, -1))  # image_newline after each row
    return numpy.array(cells)


def box_centre_cells(box: list[float], image: Image.Image, processor) -> numpy.ndarray:
    """The centre of a pixel box `[x0, y0, x1, y1]` in the first crop's grid `(row, col)`, following the processor."""
    width, height = image.size
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = processor.image_processor.crop_size["height"]
    cell = processor.patch_size
    if processor_architecture(processor).anyres:  # the base view is the whole image resized to a square
        return numpy.array([y * side / height / cell, x * side / width / cell])
    if getattr(processor.image_processor, "do_pad", False):  # padded to a square, then resized
        square = max(width, height)
        scale = side / square
        return numpy.array([(y + (square - height) / 2) * scale / cell, (x + (square - width) / 2) * scale / cell])
    scale = side / min(width, height)  # resized on the short side, then centre-cropped
    return numpy.array(
        [(y * scale - (height * scale - side) / 2) / cell, (x * scale - (width * scale - side) / 2) / cell]
    )


# ---- one sample


@torch.inference_mode()
def analyze_sample(
    model, processor, image: Image.Image, question: str, layers: list[int], top_k: int, box=None
) -> dict:
    """Every per-layer measurement of one image and question (see the module docstring); numpy arrays."""
    prompt = chat_prompt(processor, Question("sample", question, "analysis", image_data=image))
    inputs = prepare(processor, image, prompt, model.device, model.dtype)
    image_inputs = {key: value for key, value in inputs.items() if key.startswith("guidance_") or key == "image_sizes"}
    image_outputs = model.model.get_image_features(pixel_values=inputs["pixel_values"], **image_inputs)

    input_ids = inputs["input_ids"][0]
    visual = torch.nonzero(input_ids == model.config.image_token_id).flatten()
    question_positions = torch.arange(int(visual[-1]) + 1, len(input_ids), device=input_ids.device)
    queries = torch.cat([question_positions[-1:], question_positions])  # the last prompt token, then the question
    key_mask = inputs["attention_mask"][0].bool()
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with record_attention_rows(model.model.language_model, layers, queries, key_mask) as recorded:
        model(**text, mm_encoder_outputs={"image": image_outputs}, logits_to_keep=1)

    cells = visual_token_cells(model, inputs, image_outputs)
    crops, grid = int(cells[:, 0].max()) + 1, grid_side(model.config.vision_config)
    on_grid = cells[:, 0] >= 0
    visual_cpu = visual.cpu().numpy()
    shape = (len(layers), len(ROW_KINDS))
    result = {
        "layers": numpy.array(layers),
        "cells": cells,
        "visual_attention": numpy.zeros((*shape, len(visual_cpu)), dtype=numpy.float32),
        "visual_mass": numpy.zeros(shape),
        "grids": numpy.zeros((*shape, crops, grid, grid), dtype=numpy.float32),
        "centre_of_mass": numpy.zeros((*shape, 2)),
        "entropy": numpy.zeros(shape),
        "normalised_entropy": numpy.zeros(shape),
        "top_k_share": numpy.zeros(shape),
        "box_centre": box_centre_cells(box, image, processor) if box is not None else numpy.full(2, numpy.nan),
    }
    for layer_index, layer in enumerate(layers):
        rows = recorded.rows[layer].numpy()
        kinds = {"last_token": rows[0], "question": rows[1:].mean(axis=0)}
        for kind_index, kind in enumerate(ROW_KINDS):
            weights = kinds[kind][visual_cpu]
            grid = result["grids"][layer_index, kind_index]
            numpy.add.at(grid, (cells[on_grid, 0], cells[on_grid, 1], cells[on_grid, 2]), weights[on_grid])
            result["visual_attention"][layer_index, kind_index] = weights
            result["visual_mass"][layer_index, kind_index] = weights.sum()
            result["centre_of_mass"][layer_index, kind_index] = centre_of_mass(grid[0])
            result["entropy"][layer_index, kind_index] = attention_entropy(weights)
            result["normalised_entropy"][layer_index, kind_index] = attention_entropy(weights) / math.log(len(weights))
            result["top_k_share"][layer_index, kind_index] = top_k_share(weights, top_k)
    result["crop_image"] = numpy.asarray(
        first_crop_image(
            inputs["pixel_values"], processor.image_processor.image_mean, processor.image_processor.image_std
        )
    )
    return result


def aggregate(samples: list[dict]) -> dict:
    """Per layer and row kind, the means over samples (centre of mass, its shift between layers, box distance)."""
    layers = samples[0]["layers"].tolist()
    summary = {"samples": len(samples), "layers": layers}
    for kind_index, kind in enumerate(ROW_KINDS):

        def mean(name: str, kind_index: int = kind_index) -> list:
            return numpy.nanmean(numpy.stack([sample[name][:, kind_index] for sample in samples]), axis=0).tolist()

        centres = numpy.nanmean(numpy.stack([sample["centre_of_mass"][:, kind_index] for sample in samples]), axis=0)
        distances = numpy.stack(
            [
                numpy.linalg.norm(sample["centre_of_mass"][:, kind_index] - sample["box_centre"], axis=-1)
                for sample in samples
            ]
        )
        summary[kind] = {
            "visual_mass": mean("visual_mass"),
            "entropy": mean("entropy"),
            "normalised_entropy": mean("normalised_entropy"),
            "top_k_share": mean("top_k_share"),
            "centre_of_mass": centres.tolist(),
            "centre_of_mass_shift": [None] + numpy.linalg.norm(numpy.diff(centres, axis=0), axis=-1).tolist(),
            "distance_to_box": (
                numpy.nanmean(distances, axis=0).tolist() if not numpy.isnan(distances).all() else None
            ),
        }
    return summary


# ---- figures


def save_overlays(samples: dict[str, dict], path: Path, title: str) -> bool:
    """
    For each model, the question's attention on the first crop at the first, middle and last recorded layers; False
    when matplotlib is missing (nothing drawn).
    """
    pyplot = plots.pyplot()
    if pyplot is None:
        return False
    names = list(samples)
    layer_count = len(samples[names[0]]["layers"])
    picks = sorted({0, layer_count // 2, layer_count - 1})
    figure, axes = pyplot.subplots(len(names), len(picks), figsize=(3 * len(picks), 3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        sample = samples[name]
        for column, pick in enumerate(picks):
            axis = axes[row][column]
            crop = sample["crop_image"]
            axis.imshow(crop)
            heat = sample["grids"][pick, ROW_KINDS.index("question"), 0]
            axis.imshow(
                heat, cmap="inferno", alpha=0.55, extent=(0, crop.shape[1], crop.shape[0], 0), interpolation="nearest"
            )
            cell = crop.shape[0] / heat.shape[0]
            centre = sample["centre_of_mass"][pick, ROW_KINDS.index("question")] * cell
            axis.plot(centre[1], centre[0], "c+", markersize=12, markeredgewidth=2)
            if not numpy.isnan(sample["box_centre"]).any():
                box = sample["box_centre"] * cell
                axis.plot(box[1], box[0], "gx", markersize=10, markeredgewidth=2)
            axis.set_title(f"{name}, layer {int(sample['layers'][pick])}", fontsize=8)
            axis.axis("off")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def save_curves(summaries: dict[str, dict], path: Path, top_k: int) -> bool:
    """
    Per-layer curves of every model: entropy, top-k share, visual mass, centre-of-mass row; False when matplotlib is
    missing (nothing drawn).
    """
    pyplot = plots.pyplot()
    if pyplot is None:
        return False
    panels = [
        ("normalised_entropy", "normalised entropy"),
        ("top_k_share", f"top-{top_k} share"),
        ("visual_mass", "attention mass on visual tokens"),
        ("centre_of_mass", "centre of mass: grid row"),
    ]
    figure, axes = pyplot.subplots(2, 2, figsize=(9, 6))
    for axis, (field, label) in zip(axes.flat, panels, strict=True):
        for name, summary in summaries.items():
            for kind, style in zip(ROW_KINDS, ("--", "-"), strict=True):
                values = summary[kind][field]
                values = [value[0] for value in values] if field == "centre_of_mass" else values
                axis.plot(summary["layers"], values, style, marker=".", label=f"{name}, {kind.replace('_', ' ')}")
        axis.set_xlabel("LLM layer")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


# ---- inputs and the command line


@dataclass
class Item:
    image: Image.Image
    question: str
    box: list[float] | None
    source: str


def read_items(path: Path, images: Path | None) -> list[Item]:
    """The LLaVA analysis format: `.jsonl` lines `{image, question[, box: [x0, y0, x1, y1] pixels]}`."""
    items = []
    for source, row in read_json_lines(path):
        question = row.get("question", row.get("text"))
        if "image" not in row or question is None:
            raise DataError(f"{source}: an item needs `image` and `question`.")
        image_path = (images or path.parent) / row["image"]
        if not image_path.is_file():
            raise DataError(f"{source}: image {row['image']} not found in {image_path.parent}.")
        box = row.get("box")
        if box is not None and (len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]):
            raise DataError(f"{source}: box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}.")
        items.append(Item(Image.open(image_path).convert("RGB"), question, box, source))
    return items


def read_dataset_items(path: str, columns: dict[str, str], split: str | None) -> list[Item]:
    """A local `datasets` dataset with image, question and optional box columns (renamed with `columns`)."""
    dataset = load_local_dataset(path, split)
    names = column_names(dataset, path, columns, ("image", "question", "box"), required=("image", "question"))
    items = []
    for number, row in enumerate(dataset):
        image = row[names["image"]]
        image = image if isinstance(image, Image.Image) else Image.open(image)
        items.append(Item(image.convert("RGB"), row[names["question"]], row.get(names["box"]), f"{path}:row {number}"))
    return items


def run(args: argparse.Namespace) -> dict:
    folder_architecture(args.model, LLAVA_ARCHITECTURES, "the attention analysis", stock_allowed=True)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(
        args.device
    )
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    models = {"VisionTrim" if is_visiontrim(model.config) else "stock": (model.eval(), processor)}
    if args.with_stock and "VisionTrim" in models:
        models["stock"] = (stock_llava_with_same_weights(model), stock_processor(processor))
    if args.dataset:
        columns = dict(mapping.split("=", 1) for mapping in args.column or [])
        items = read_dataset_items(args.dataset, columns, args.split)
    else:
        items = read_items(Path(args.data), Path(args.images) if args.images else None)
    items = items[: args.limit]
    layer_count = model.config.text_config.num_hidden_layers
    layers = list(range(layer_count)) if args.layers == "all" else args.layers
    if not all(0 <= layer < layer_count for layer in layers):
        raise UsageError(f"argument --layers: must be within 0..{layer_count - 1} (the LLM's layers), got {layers}")

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = {name: [] for name in models}
    for index, item in enumerate(tqdm(items, desc="analyze", unit="sample")):
        per_model = {}
        for name, (net, net_processor) in models.items():
            sample = analyze_sample(net, net_processor, item.image, item.question, layers, args.top_k, item.box)
            numpy.savez_compressed(output / f"{index:05d}-{name}.npz", **sample)
            results[name].append(sample)
            per_model[name] = sample
        save_overlays(per_model, output / f"{index:05d}.png", item.question)
    summaries = {name: aggregate(samples) for name, samples in results.items()}
    report = {"model": args.model, "top_k": args.top_k, "models": summaries}
    (output / "summary.json").write_text(json.dumps(report, indent=2))
    written = [output / "summary.json"]
    if save_curves(summaries, output / "layers.png", args.top_k):
        written.append(output / "layers.png")
    print(f"{len(items)} samples, layers {layers[0]}..{layers[-1]}: {', '.join(map(str, written))}")
    return report


def layer_list(text: str) -> str | list[int]:
    """`all`, or comma-separated LLM layer indices."""
    if text == "all":
        return text
    try:
        return [int(layer) for layer in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'all' or layer numbers such as 0,8,16, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=model_folder,
        required=True,
        help=f"model folder, stock or VisionTrim, of the LLaVA family: {supported(LLAVA_ARCHITECTURES)}",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_file, help=".jsonl of {image, question[, box]}")
    source.add_argument(
        "--dataset", type=existing_path, help="a local datasets dataset with image, question[, box] columns"
    )
    parser.add_argument("--images", type=existing_folder, help="image folder of --data (default: the file's folder)")
    parser.add_argument("--split", help="dataset split (default: the first)")
    parser.add_argument("--column", action="append", help="map a field to a dataset column: question=prompt")
    parser.add_argument(
        "--layers", type=layer_list, default="all", help="LLM layers to record: all, or e.g. 0,8,16,31"
    )
    parser.add_argument("--top-k", type=positive_int, default=16, help="k of the top-k attention share (default 16)")
    parser.add_argument("--with-stock", action="store_true", help="also run stock LLaVA with the same weights")
    parser.add_argument("--limit", type=positive_int, help="only the first N samples")
    parser.add_argument("--output-dir", default="analysis-results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
