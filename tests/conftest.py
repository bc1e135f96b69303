"""
Shared fixtures: tiny random VisionTrim LLaVA checkpoints (real 336 px / patch 14 grid, small widths) saved to
temporary folders and loaded back as a user would, with `trust_remote_code=True` from another working directory, so
only the folder's copy of the code runs.
"""

import os
import tempfile


# Before Transformers is imported: never reach the Hub, and keep the copied remote code out of the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="visiontrim-modules-")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from visiontrim.tools.demo import sample_photo  # noqa: E402

from helpers import load_remote, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Two real CC0 photos shipped with the package: a cat (451x300) and a coffee cup (600x400)."""
    return [Image.open(sample_photo(name)).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg")]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint with the default budget (64 = 48 DVTS + 16 TGVC tokens per image)."""
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session")
def remote(checkpoint):
    """(model, processor) loaded from `checkpoint` with `trust_remote_code=True`; treat as read-only."""
    return load_remote(checkpoint)


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield
