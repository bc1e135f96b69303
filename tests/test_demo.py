"""The main job, `python -m visiontrim`: its report, its overlay, and the commands a new user runs."""

import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from visiontrim.__main__ import main
from visiontrim.tools.demo import DOMINANT_COLOUR, LEGEND_HEIGHT, SEED_COLOUR

from helpers import save_checkpoint


def grid_cells(report: str) -> list[str]:
    lines = report[report.index("patch grid") :].splitlines()[1:25]
    rows = [line.split() for line in lines]
    assert len(rows) == 24 and all(len(row) == 24 for row in rows)
    return [cell for row in rows for cell in row]


def test_report_and_overlay_for_a_converted_checkpoint(checkpoint, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    main(["--model", str(checkpoint), "--save", str(overlay), "--repeats", "1", "--max-new-tokens", "2"])
    report = capsys.readouterr().out
    assert (
        "visual tokens fed to the LLM: stock 576, VisionTrim 64 (1 crop x (48 DVTS + 16 TGVC), 88.9% fewer)" in report
    )
    assert "guidance text (CLIP tokens): 'what animal is in the picture , and what is it lying on ?'" in report
    assert "24x24 patch grid of the image" in report
    cells = grid_cells(report)
    assert (cells.count("D"), cells.count("S"), cells.count(".")) == (48, 16, 512)
    for label in (
        "vision encoding, stock",
        "vision encoding, VisionTrim",
        "LLM prefill, stock",
        "LLM prefill, VisionTrim",
    ):
        assert re.search(re.escape(label) + r".*: min \d+\.\d{3} s, median \d+\.\d{3} s", report), label
    assert "answer, stock:" in report and "answer, VisionTrim:" in report

    image = Image.open(overlay)
    assert image.format == "PNG" and image.size == (336, 336 + LEGEND_HEIGHT)
    legend = numpy.asarray(image.convert("RGB"))[336:].astype(int)
    assert (legend == DOMINANT_COLOUR[:3]).all(-1).any() and (legend == SEED_COLOUR[:3]).all(-1).any()
    assert (legend < 100).all(-1).sum() > 50  # the legend's text
    pixels = numpy.asarray(image.convert("RGB")).astype(int)
    for index, cell in enumerate(cells):
        row, col = divmod(index, 24)
        corner = pixels[row * 14, col * 14]  # the box's top-left pixel: outline colour for kept cells
        if cell == "D":
            assert tuple(corner) == DOMINANT_COLOUR[:3], index
        elif cell == "S":
            assert tuple(corner) == SEED_COLOUR[:3], index


def test_llava_next_report_counts_crops_and_newlines(tmp_path, capsys):
    folder = save_checkpoint(tmp_path / "next", arch="llava-next")
    main(["--model", str(folder), "--repeats", "1"])
    report = capsys.readouterr().out
    # The 451x300 photo takes llava-hf's 336x672 pinpoint: base view + 1x2 crops = 3 crops of 64 + 1 newline.
    assert "VisionTrim 195 (3 crops x (48 DVTS + 16 TGVC + 1 image_newline)" in report
    assert "24x24 patch grid of the base crop" in report
    stock = int(re.search(r"visual tokens fed to the LLM: stock (\d+),", report).group(1))
    # Stock: the 576-token base view, then the 24x48 grid unpadded to the photo's 451:300 aspect (24 x 36 = 864) with
    # one newline per row (24).
    assert stock == 576 + 24 * 36 + 24


@pytest.mark.parametrize("arch", ["llava", "llava-next"])
def test_main_job_runs_with_no_arguments(arch):
    # The README's first command (and its NeXT variant): LLaVA-shaped random models with the real CLIP ViT-L/14-336
    # towers, stock vs VisionTrim with the same weights.
    arguments = [sys.executable, "-m", "visiontrim", "--repeats", "1"] + (["--arch", arch] if arch != "llava" else [])
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=400, check=True)
    name = {"llava": "LLaVA-1.5", "llava-next": "LLaVA-NeXT"}[arch]
    assert f"random {name}-shaped (CLIP ViT-L/14-336, LLM 4 x 1024)" in result.stdout
    expected = "stock 576, VisionTrim 64" if arch == "llava" else "VisionTrim 195 (3 crops"
    assert expected in result.stdout
    assert re.search(r"prefill speed-up: LLM \d+\.\d\dx", result.stdout)


def test_ci_runs_the_readmes_test_command():
    root = Path(__file__).resolve().parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("python -m pytest")
    assert f"```bash\n{ci_command}\n```" in (root / "README.md").read_text()
