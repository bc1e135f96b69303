# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The LLaVA-OneVision converter (`--llava` with a OneVision source): a llava-hf LLaVA-OneVision folder becomes a
VisionTrim repository folder. No CLIP model is needed: the weights are the model's own (VisionTrim adds none), the
config gains the VisionTrim settings, and the processor counts the kept tokens.
"""

import argparse
import json
import string
from importlib import resources
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer

from ... import __version__
from ...video_processing_visiontrim import VisionTrimVideoProcessor
from .repository import (
    ConversionError,
    check_output,
    is_hub_id,
    load_converted,
    new_revision,
    read_chat_template,
    source_architecture,
    write_repository,
)


CARD_TEMPLATE = "model_card_onevision.md"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def convert_onevision(args: argparse.Namespace, folder: Path, source_config: dict) -> Path:
    """Converts the `--llava` LLaVA-OneVision checkpoint (resolved to `folder`, its `config.json`) to `--output`."""
    output = Path(args.output)
    check_output(output, args.overwrite)
    if args.clip is not None or args.image_clip is not None:
        raise ConversionError(
            "LLaVA-OneVision needs no CLIP model (TGVC compares the question's own LLM embeddings): drop --clip and "
            "--image-clip."
        )
    architecture = source_architecture(source_config, args.llava, "--llava", args.arch)
    model_class = architecture.visiontrim_class("model")
    settings = {
        "reduction_ratio": args.reduction_ratio,
        "visual_tokens": args.tokens,
        "dominant_ratio": args.dvts_ratio,
    }
    model = load_converted(model_class, folder, args.llava, source_config, settings, args.dtype)
    config = model.config
    stock_processor = read_json(folder / "processor_config.json")
    video_size = read_json(folder / "video_preprocessor_config.json").get("size") or {"height": 384, "width": 384}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = architecture.visiontrim_class("processor")(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tokenizer,
        video_processor=VisionTrimVideoProcessor(size=video_size, crop_size=video_size, do_center_crop=False),
        num_image_tokens=stock_processor.get("num_image_tokens", config.num_patches),
        vision_feature_select_strategy=stock_processor.get(
            "vision_feature_select_strategy", config.vision_feature_select_strategy
        ),
        chat_template=read_chat_template(folder, tokenizer),
        vision_aspect_ratio=stock_processor.get("vision_aspect_ratio", config.vision_aspect_ratio),
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
        crop_newline=config.crop_newline,
    )
    revision = new_revision()

    def card(weight_checksums: dict[str, str]) -> str:
        template = string.Template((resources.files("visiontrim") / "hub_cards" / CARD_TEMPLATE).read_text())
        hub_base = is_hub_id(args.llava)
        return template.substitute(
            license=args.license or "apache-2.0",
            base_model_metadata=f"base_model: {args.llava}\n" if hub_base else "",
            base_model=args.llava,
            base_model_link=f"[{args.llava}](https://huggingface.co/{args.llava})" if hub_base else f"`{args.llava}`",
            visual_tokens=config.visual_tokens,
            dominant=config.dominant_tokens,
            complement=config.complement_tokens,
            crop_tokens=config.visual_tokens + int(config.crop_newline),
            frame_tokens=config.frame_tokens,
            reduction_ratio=f"{config.reduction_ratio:.6f}",
            visiontrim_version=__version__,
            repo_id=args.push_to_hub or "path/to/this/folder",
            revision=revision,
            checksums="\n".join(f"| `{file}` | `{digest}` |" for file, digest in weight_checksums.items()),
        )

    write_repository(output, model, processor, card, args, revision)
    return output
