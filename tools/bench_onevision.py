# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim bench --arch llava-onevision` (or `--model` a VisionTrim LLaVA-OneVision folder): stock
LLaVA-OneVision vs VisionTrim with the same weights, in the same process, on a photo at 384 x 384 (2 crops) and at
768 x 768 (5 crops), with llava-hf's image_grid_pinpoints. The default model has a real OneVision-7B tower
(SigLIP-so400m: 26 layers x 1152, 27 x 27 patches per crop, random weights) and a small random LLM. The rows and their
measurements are `bench_qwen.py`'s: tokens, the tower's time (once per size), the compression's time and share of it,
prefill, decode and KV-cache bytes, each as a ratio to stock.
"""

import argparse

import torch
from transformers import LlavaOnevisionConfig

from ..architectures import Architecture
from .arguments import UsageError
from .bench_qwen import FamilyBench, QwenRow, bench_against_stock
from .build import build_model
from .build_onevision import (
    ONEVISION_7B_VISION_SHAPES,
    OnevisionShapes,
    build_onevision_config,
    build_onevision_processor,
)
from .demo import load_folder


# Per row: name, reduction ratio (None: the stock model), DVTS share; names give the tokens kept per crop of 729.
ONEVISION_ROWS = (
    ("stock", None, None),
    ("VisionTrim 144", 1 - 144 / 729, 0.75),
    ("VisionTrim 81", 1 - 81 / 729, 0.75),
    ("VisionTrim 36", 1 - 36 / 729, 0.75),
    ("DVTS only 81", 1 - 81 / 729, 1.0),
    ("TGVC only 81", 1 - 81 / 729, 0.0),
)
# (width, height): one high-res crop plus the base view, and a 2 x 2 grid plus the base view.
ONEVISION_IMAGE_SIZES = ((384, 384), (768, 768))


def onevision_encoder(row: QwenRow, model, inputs, tower_run):
    """A row's image features: stock's own `get_image_features`, or VisionTrim's compression of the tower run."""
    image = {name: inputs[name] for name in ("pixel_values", "image_sizes", "batch_num_images")}
    if row.reduction_ratio is None:
        encoded = model.model.get_image_features(**image)
        return lambda: encoded
    crops = [tower_run.features.shape[0]]  # one image: all the run's crops
    guidance = (inputs["guidance_input_ids"], inputs["guidance_attention_mask"])
    return lambda: model.model.image_output(tower_run, crops, *guidance)


def run_onevision(args: argparse.Namespace, architecture: Architecture) -> dict:
    """The LLaVA-OneVision benchmark: the `--model` folder, or a random model with OneVision-7B's tower (`--toy`)."""
    if args.video is not None:
        raise UsageError("argument --video: the LLaVA-OneVision benchmark runs a photo (--image), not a video")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model is not None:
        model, processor = load_folder(args.model, {}, dtype, args.device)
        description = f"{args.model} ({architecture.display_name})"
    else:
        shapes = (
            OnevisionShapes()
            if args.toy
            else OnevisionShapes(
                **{**vars(ONEVISION_7B_VISION_SHAPES), "llm_layers": args.llm_layers, "llm_hidden": args.llm_hidden}
            )
        )
        config = build_onevision_config(shapes, LlavaOnevisionConfig().image_grid_pinpoints)
        model = build_model(config).to(device=device, dtype=dtype)
        processor = build_onevision_processor(config)
        description = (
            f"random {architecture.display_name}-shaped: SigLIP {shapes.vision_layers} x {shapes.vision_hidden} at "
            f"{shapes.image_size} px, LLM {shapes.llm_layers} x {shapes.llm_hidden}"
        )

    def tower(inputs):
        crops = inputs["pixel_values"][0].to(dtype)  # one image: its crops
        return model.model.run_tower(crops, model.config.vision_feature_layer)

    def crops(inputs) -> dict:
        return {"crops": inputs["pixel_values"].shape[1]}

    bench = FamilyBench(ONEVISION_IMAGE_SIZES, ONEVISION_ROWS, tower, onevision_encoder, crops)
    return bench_against_stock(args, architecture, model, processor, description, bench)
