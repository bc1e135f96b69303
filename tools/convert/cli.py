# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`visiontrim-convert` (`python -m visiontrim.tools.convert`): a stock checkpoint into a VisionTrim repository folder
that loads with `from_pretrained(..., trust_remote_code=True)`. `--llava` takes the LLaVA family, with `--clip`, the
CLIP model its vision tower comes from:

    visiontrim-convert --llava llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14-336 \\
        --output visiontrim-llava-1.5-7b --tokens 64

`--llava` also takes LLaVA-OneVision checkpoints, without `--clip`, and `--qwen` the Qwen models (`--qwen
Qwen/Qwen2.5-VL-7B-Instruct --reduction-ratio 0.75`; Qwen2-VL, Qwen3-VL too). A refused or failed conversion prints one
line, exits with status 2 and leaves nothing behind.
"""

import argparse
import logging
import sys
from pathlib import Path

from ...architectures import (
    ARCHITECTURE_NAMES,
    ARCHITECTURES,
    LLAVA_FAMILY,
    ONEVISION_FAMILY,
    QWEN_FAMILIES,
    architecture_of,
)
from ..arguments import folder_or_hub_id, positive_int
from .llava import convert_llava
from .onevision import convert_onevision
from .qwen import convert_qwen
from .repository import DTYPES, ConversionError, read_config, resolve


logger = logging.getLogger("visiontrim.convert")


def family_names(*families: str) -> str:
    """The display names of `families`' architectures: "LLaVA-1.5, LLaVA-NeXT, ... or LLaVA-NeXT-Video"."""
    names = [architecture.display_name for architecture in ARCHITECTURES if architecture.family in families]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def convert(args: argparse.Namespace) -> Path:
    """Converts the `--llava` or `--qwen` checkpoint of `args` (from `parse_arguments`); returns the folder written."""
    if args.qwen is not None:
        return convert_qwen(args)
    folder = resolve(args.llava)
    config = read_config(folder, args.llava)
    try:
        onevision = architecture_of(config).family == ONEVISION_FAMILY
    except ValueError:  # not a supported model type (or the original LLaVA layout): the LLaVA converter says which
        onevision = False
    return (convert_onevision if onevision else convert_llava)(args, folder, config)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="visiontrim-convert",
        description=f"Convert a {family_names(LLAVA_FAMILY)} checkpoint (--llava, plus the CLIP model its vision "
        f"tower comes from), a {family_names(ONEVISION_FAMILY)} one (--llava, no CLIP model) or a "
        f"{family_names(*QWEN_FAMILIES)} one (--qwen) into a VisionTrim repository folder that loads with "
        "from_pretrained(..., trust_remote_code=True).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--llava",
        type=folder_or_hub_id,
        help=f"{family_names(LLAVA_FAMILY, ONEVISION_FAMILY)} checkpoint: local folder or Hub id (llava-hf or "
        "original LLaVA layout)",
    )
    source.add_argument(
        "--qwen",
        type=folder_or_hub_id,
        help=f"{family_names(*QWEN_FAMILIES)} checkpoint: local folder or Hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct",
    )
    parser.add_argument(
        "--clip",
        type=folder_or_hub_id,
        help="LLaVA with a CLIP tower only (required there; not LLaVA-OneVision): CLIP model of its vision tower, "
        "e.g. openai/clip-vit-large-patch14-336",
    )
    parser.add_argument(
        "--image-clip",
        type=folder_or_hub_id,
        help="Video-LLaVA only: CLIP model of the image tower (default: --clip), for its projection",
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--arch", choices=ARCHITECTURE_NAMES, help="checked against the checkpoint (default: inferred)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--reduction-ratio",
        type=float,
        help="share of each crop's (or frame's) tokens removed (default 0.889; Qwen3-VL: 0.5)",
    )
    budget.add_argument(
        "--tokens", type=positive_int, help="tokens kept per crop or video frame (default: 1 - 0.889 of it)"
    )
    parser.add_argument("--dvts-ratio", type=float, help="share of kept tokens chosen by DVTS (default 0.75)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="stored precision (default auto: the checkpoint's own, so nothing is rounded)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument(
        "--license", help="license tag of the model card (default: llama2 for LLaVA, apache-2.0 for Qwen)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder as one commit and tag it")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """The command line: a refused conversion, or a file that cannot be read or written, is one line and status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(parse_arguments(argv))
    except ConversionError as error:
        logger.error("conversion refused: %s", error)
        sys.exit(2)
    except OSError as error:  # a source file unreadable, the output not writable: nothing was left behind
        logger.error("conversion failed: %s", error)
        sys.exit(2)
