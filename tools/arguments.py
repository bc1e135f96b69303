# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Argument types of the command-line tools. A bad argument is an argparse error (usage, one line naming it, exit
status 2), never a traceback: these types check what can be checked while parsing, and `UsageError` is raised for
what can only be checked later (a budget against the model's patch grid, say) and reported the same way.
"""

import argparse
import json
import re
from collections.abc import Collection
from pathlib import Path

from ..architectures import Architecture, architecture_of, is_visiontrim, supported


# A Hub repository id: `owner/name`, neither part a path component of its own.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(ValueError):
    """A bad command-line argument found after parsing; the tools report it as argparse reports its own."""


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return value


def reduction_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the share of visual tokens removed), got {text!r}")
    return value


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def existing_folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def image_file(text: str) -> str:
    """A file Pillow opens as an image."""
    from PIL import Image, UnidentifiedImageError

    existing_file(text)
    try:
        with Image.open(text) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise argparse.ArgumentTypeError(f"{text} is not an image Pillow can read ({error})") from None
    return text


def writable_file(text: str) -> str:
    """A file to write, in a folder that exists."""
    if not Path(text).resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder to write {text} in: {Path(text).parent}")
    return text


def model_folder(text: str) -> str:
    """A local model folder: one written by `save_pretrained` or `visiontrim-convert` (it holds a `config.json`)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"no such folder: {text} (give a model folder written by save_pretrained or visiontrim-convert)"
        )
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no config.json: it is not a model folder")
    return text


def folder_architecture(
    folder: str, among: Collection[Architecture], tool: str, stock_allowed: bool = False
) -> Architecture:
    """
    The architecture of the model folder `folder` (from its config.json), checked for `tool` ("the benchmark"): one
    of `among`, and a VisionTrim folder unless `stock_allowed`. Anything else is a `UsageError` naming what to give.
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    try:
        architecture = architecture_of(config)
    except ValueError as error:
        raise UsageError(f"argument --model: {folder}: {error}") from None
    if architecture not in among:
        raise UsageError(
            f"argument --model: {folder} is a {architecture.display_name} folder; {tool} supports {supported(among)}"
        )
    if not stock_allowed and not is_visiontrim(config):
        raise UsageError(
            f"argument --model: {folder} is a stock {architecture.display_name} folder; {tool} runs stock and "
            "VisionTrim with the same weights from a VisionTrim folder: convert it with visiontrim-convert first"
        )
    return architecture


def folder_or_hub_id(text: str) -> str:
    """A local folder, or a Hub repository id (`owner/name`) where no local path of that name exists."""
    if Path(text).is_dir():
        return text
    if Path(text).exists() or not HUB_ID.match(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text} (give a local folder or a Hub id owner/name)")
    return text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
