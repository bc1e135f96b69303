"""
Shared fixtures: tiny random VisionTrim LLaVA checkpoints (real 336 px / patch 14 grid, small widths) saved to
temporary folders and loaded back as a user would, with `trust_remote_code=True` from another working directory, so
only the folder's copy of the code runs.
"""

import os
import subprocess
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

from helpers import REPO, load_remote, save_checkpoint  # noqa: E402


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


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """
    The vLLM environment's Python (tests/vllm/make_env.sh), with this checkout's package (re)installed in it. Without
    it the vLLM tests are skipped, unless VISIONTRIM_REQUIRE_VLLM=1 (CI), which makes them fail.
    """
    python = Path(os.environ.get("VISIONTRIM_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        message = f"no vLLM environment at {python}: build it with `tests/vllm/make_env.sh .venv-vllm`"
        if os.environ.get("VISIONTRIM_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)],
        check=True,
        capture_output=True,
    )
    return python
