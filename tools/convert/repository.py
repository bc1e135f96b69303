# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
What both converters share: reading a source (a folder or a Hub id) and its architecture, and writing the VisionTrim
repository folder (weights, processor, model card, checksums), then uploading it.
"""

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from transformers import PreTrainedModel, ProcessorMixin
from transformers.utils import CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

from ... import __version__
from ...architectures import (
    LLAVA_FAMILY,
    ONEVISION_FAMILY,
    QWEN3_FAMILY,
    QWEN_FAMILY,
    Architecture,
    architecture_of,
    is_visiontrim,
)
from ..checksums import folder_checksums, write_manifest


logger = logging.getLogger("visiontrim.convert")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The weight indexes of sharded checkpoints: each maps every weight to the shard file holding it.
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The source option that converts each family's checkpoints.
SOURCE_OPTIONS = {LLAVA_FAMILY: "--llava", ONEVISION_FAMILY: "--llava", QWEN_FAMILY: "--qwen", QWEN3_FAMILY: "--qwen"}


class ConversionError(ValueError):
    """A conversion refused before anything was written; the message says what to change."""


def resolve(source: str) -> Path:
    """
    A local folder as is, a Hub id downloaded (where the Hub is reachable); refuses a folder whose weight index lists
    a shard it lacks.
    """
    if Path(source).is_dir():
        folder = Path(source)
    else:
        try:
            folder = Path(snapshot_download(source))
        except Exception as error:  # offline, unknown repository, bad id: all mean the same to the user
            raise ConversionError(
                f"{source} is neither a local checkpoint folder nor a Hub repository reachable from here ({error})."
            ) from error
    check_shards(folder, source)
    return folder


def check_shards(folder: Path, source: str) -> None:
    """Refuses a sharded checkpoint whose index lists a shard the folder lacks (an interrupted download or copy)."""
    for index in WEIGHT_INDEXES:
        if not (folder / index).is_file():
            continue
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            raise ConversionError(
                f"{source}: {index} is not a weight index with a weight_map ({error!r}): download it again."
            ) from None
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise ConversionError(
                f"{source}: {index} lists {len(missing)} shard(s) the folder lacks, {missing}: download or copy the "
                "checkpoint again."
            )


def is_hub_id(source: str) -> bool:
    return not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def read_config(folder: Path, source: str) -> dict:
    """The source's `config.json`."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} holds no config.json: it is not a checkpoint folder.")
    return json.loads(path.read_text())


def source_architecture(config: dict, source: str, option: str, requested: str | None) -> Architecture:
    """
    The architecture of a stock checkpoint's `config`, given with `option` (`--llava` or `--qwen`); refuses a model
    type VisionTrim does not support, a VisionTrim folder, another family's checkpoint (naming its option) and an
    `--arch` that contradicts it.
    """
    try:
        architecture = architecture_of(config)
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None
    if is_visiontrim(config):
        raise ConversionError(
            f"{source} is already a VisionTrim {architecture.display_name} folder: load it as it is, or convert the "
            "stock checkpoint it came from."
        )
    if SOURCE_OPTIONS[architecture.family] != option:
        raise ConversionError(
            f"{source} is a {architecture.display_name} checkpoint: convert it with "
            f"{SOURCE_OPTIONS[architecture.family]} instead of {option}."
        )
    check_requested(architecture, requested, source)
    return architecture


def load_converted(
    model_class: type[PreTrainedModel], folder: Path, source: str, source_config: dict, settings: dict, dtype: str
) -> PreTrainedModel:
    """
    The checkpoint in `folder` (its `config.json`: `source_config`) loaded into the VisionTrim `model_class`, its
    config the stock fields plus the VisionTrim `settings` given (None: the default); `dtype` is `--dtype`. Refuses
    settings the config refuses, and a checkpoint that does not load cleanly (a key unused, a weight unfilled or
    mismatched), naming the keys.
    """
    try:
        stock_fields = {key: value for key, value in source_config.items() if key not in ("model_type", "auto_map")}
        given = {key: value for key, value in settings.items() if value is not None}
        config = model_class.config_class.from_dict({**stock_fields, **given})
    except ValueError as error:
        raise ConversionError(str(error)) from error
    model, loading = model_class.from_pretrained(
        folder, config=config, dtype=DTYPES[dtype] if dtype != "auto" else "auto", output_loading_info=True
    )
    if loading["unexpected_keys"] or loading["missing_keys"] or loading["mismatched_keys"]:
        raise ConversionError(
            f"{source} does not load cleanly into {model_class.__name__}: unused keys "
            f"{sorted(loading['unexpected_keys'])}, unfilled keys {sorted(loading['missing_keys'])}, mismatched "
            f"{sorted(loading['mismatched_keys'])}."
        )
    return model


def check_requested(architecture: Architecture, requested: str | None, source: str) -> None:
    """Refuses an `--arch` other than the checkpoint's."""
    if requested is not None and requested != architecture.name:
        raise ConversionError(
            f"{source} is a {architecture.name} checkpoint, but --arch {requested} was given: drop --arch or fix it."
        )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuses a non-empty `--output` without `--overwrite`."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConversionError(f"{output} exists and is not empty: choose another --output or pass --overwrite.")


def read_chat_template(folder: Path, tokenizer, default: str | None = None) -> str | None:
    """The checkpoint's chat template (its own file, the legacy JSON, or the tokenizer's), else `default`."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text()
    if (folder / LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE).is_file():
        return json.loads((folder / LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE).read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None) or default


def new_revision() -> str:
    """The tag of this conversion, which the model card's usage snippet pins."""
    return f"visiontrim-{__version__}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def write_repository(
    output: Path,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    card: Callable[[dict[str, str]], str],
    args: argparse.Namespace,
    revision: str,
) -> None:
    """
    Saves `model`, `processor`, the model card (`card(weight_checksums)`) and the checksum manifest to `output`,
    written beside it and moved into place only when complete (a failure leaves nothing behind, not even the folders
    it created to hold `output`), with the permissions the umask gives; then uploads the folder with `--push-to-hub`.
    """
    created = [folder for folder in output.absolute().parents if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-"))
    try:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        processor.save_pretrained(staging)
        weight_checksums = folder_checksums(staging, "*.safetensors")
        (staging / "README.md").write_text(card(weight_checksums))
        write_manifest(staging, known=weight_checksums)
        apply_umask(staging)
    except BaseException:
        shutil.rmtree(created[-1] if created else staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    logger.info("VisionTrim %s repository written to %s", model.config.model_type, output)
    if args.push_to_hub:
        commit = push_to_hub(output, args.push_to_hub, args.private, revision)
        logger.info("Uploaded to %s as commit %s, tagged %s", args.push_to_hub, commit, revision)


def apply_umask(folder: Path) -> None:
    """
    Gives `folder` and everything in it the permissions the umask gives new folders (0777 & ~umask) and files
    (0666 & ~umask): `mkdtemp` makes the folder 0700 and `save_pretrained` writes weight files 0600 whatever it is.
    """
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def push_to_hub(folder: Path, repo_id: str, private: bool, revision: str, api: HfApi | None = None) -> str:
    """Uploads `folder` as one commit to `repo_id` and tags it `revision` (the tag the model card pins)."""
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"VisionTrim conversion ({revision})",
    )
    api.create_tag(repo_id, tag=revision, revision=commit.oid, repo_type="model")
    return commit.oid
