"""The main job, `python -m visiontrim`: its report, its overlay, and the command a new user runs."""

import re
import subprocess
import sys
from pathlib import Path

import numpy
from PIL import Image

from visiontrim.__main__ import main
from visiontrim.tools.demo import sample_photo


def grid_rows(report: str) -> list[list[str]]:
    start = report.index("patch grid")
    lines = report[start:].splitlines()[1:25]
    return [line.split() for line in lines]


def test_report_and_overlay_for_a_converted_checkpoint(checkpoint, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    main(["--model", str(checkpoint), "--save", str(overlay), "--repeats", "1", "--max-new-tokens", "2"])
    report = capsys.readouterr().out
    assert "visual tokens fed to the LLM: stock 576, VisionTrim 64 (48 DVTS + 16 TGVC, 88.9% fewer)" in report
    assert "guidance text (CLIP tokens): 'what animal is in the picture , and what is it lying on ?'" in report
    rows = grid_rows(report)
    assert len(rows) == 24 and all(len(row) == 24 for row in rows)
    cells = [cell for row in rows for cell in row]
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
    assert image.format == "PNG" and image.size == (336, 336)
    plain = Image.open(sample_photo()).convert("RGB")
    scale = 336 / min(plain.size)
    resized = plain.resize((round(plain.width * scale), round(plain.height * scale)), Image.Resampling.BICUBIC)
    left = (resized.width - 336) // 2
    crop = resized.crop((left, 0, left + 336, 336))
    changed = int((numpy.asarray(image.convert("RGB")) != numpy.asarray(crop)).any(axis=-1).sum())
    assert changed > 64 * 14  # every kept cell is outlined or filled


def test_main_job_runs_with_no_arguments():
    # The README's first command: a LLaVA-1.5-shaped random model (real CLIP ViT-L/14-336 tower), stock vs VisionTrim.
    result = subprocess.run(
        [sys.executable, "-m", "visiontrim", "--repeats", "1"], capture_output=True, text=True, timeout=300, check=True
    )
    assert "visual tokens fed to the LLM: stock 576, VisionTrim 64" in result.stdout
    assert "random LLaVA-1.5-shaped (CLIP ViT-L/14-336, LLM 4 x 1024)" in result.stdout
    assert re.search(r"prefill speed-up: LLM \d+\.\d\dx", result.stdout)


def test_ci_runs_the_readmes_test_command():
    root = Path(__file__).resolve().parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("python -m pytest")
    assert f"```bash\n{ci_command}\n```" in (root / "README.md").read_text()
