# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The Qwen converter: a Qwen2.5-VL or Qwen2-VL folder (Hub layout) becomes a VisionTrim repository folder. The weights
are the model's own (VisionTrim adds none), the config gains the VisionTrim settings, and the processor counts the
kept tokens.
"""

import argparse
import json
import string
from importlib import resources
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer

from ... import __version__
from ...video_processing_visiontrim import VisionTrimQwenVideoProcessor
from .repository import (
    DTYPES,
    ConversionError,
    check_output,
    is_hub_id,
    new_revision,
    read_chat_template,
    read_config,
    resolve,
    source_architecture,
    write_repository,
)


CARD_TEMPLATE = "model_card_qwen.md"


def convert_qwen(args: argparse.Namespace) -> Path:
    """Converts the `--qwen` checkpoint to `--output`."""
    output = Path(args.output)
    check_output(output, args.overwrite)
    if args.clip is not None or args.image_clip is not None or args.tokens is not None:
        raise ConversionError(
            "Qwen models need no CLIP model (TGVC compares the question's own LLM embeddings) and take their budget "
            "as --reduction-ratio (images have any size): drop --clip, --image-clip and --tokens."
        )
    folder = resolve(args.qwen)
    source_config = read_config(folder, args.qwen)
    architecture = source_architecture(source_config, args.qwen, "--qwen", args.arch)
    model_class = architecture.visiontrim_class("model")
    settings = {"reduction_ratio": args.reduction_ratio, "dominant_ratio": args.dvts_ratio}
    settings = {key: value for key, value in settings.items() if value is not None}
    try:
        stock_fields = {key: value for key, value in source_config.items() if key not in ("model_type", "auto_map")}
        config = model_class.config_class.from_dict({**stock_fields, **settings})
    except ValueError as error:
        raise ConversionError(str(error)) from error
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else "auto"
    model, loading = model_class.from_pretrained(folder, config=config, dtype=dtype, output_loading_info=True)
    if loading["unexpected_keys"] or loading["missing_keys"] or loading["mismatched_keys"]:
        raise ConversionError(
            f"{args.qwen} does not load cleanly into {model_class.__name__}: unused keys "
            f"{sorted(loading['unexpected_keys'])}, unfilled keys {sorted(loading['missing_keys'])}, mismatched "
            f"{sorted(loading['mismatched_keys'])}."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    video_config = folder / "video_preprocessor_config.json"
    video_size = json.loads(video_config.read_text()).get("size") if video_config.exists() else None
    processor = architecture.visiontrim_class("processor")(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tokenizer,
        video_processor=VisionTrimQwenVideoProcessor(size=video_size),
        chat_template=read_chat_template(folder, tokenizer),
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
    )
    revision = new_revision()

    def card(weight_checksums: dict[str, str]) -> str:
        template = string.Template((resources.files("visiontrim") / "hub_cards" / CARD_TEMPLATE).read_text())
        hub_base = is_hub_id(args.qwen)
        return template.substitute(
            license=args.license or "apache-2.0",
            base_model_metadata=f"base_model: {args.qwen}\n" if hub_base else "",
            architecture=architecture.display_name,
            base_model=args.qwen,
            base_model_link=f"[{args.qwen}](https://huggingface.co/{args.qwen})" if hub_base else f"`{args.qwen}`",
            kept_percent=f"{100 * (1 - config.reduction_ratio):.1f}",
            reduction_ratio=f"{config.reduction_ratio:.6f}",
            dominant_ratio=config.dominant_ratio,
            example_budget=config.kept_tokens(972),
            visiontrim_version=__version__,
            repo_id=args.push_to_hub or "path/to/this/folder",
            revision=revision,
            checksums="\n".join(f"| `{file}` | `{digest}` |" for file, digest in weight_checksums.items()),
        )

    write_repository(output, model, processor, card, args, revision)
    return output
