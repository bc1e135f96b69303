"""
The main job, `python -m visiontrim`: its report and overlay for every architecture's VisionTrim folder, its refusals
(stock folders, unsupported model types), and the commands a new user runs.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from visiontrim.__main__ import main
from visiontrim.tools.build import build_config, build_model, stock_llava_with_same_weights
from visiontrim.tools.demo import DOMINANT_COLOUR, LEGEND_HEIGHT, SEED_COLOUR

from helpers import save_checkpoint, save_qwen_checkpoint


def grid_cells(report: str, rows: int = 24, cols: int = 24, title: str = "patch grid") -> list[str]:
    lines = report[report.index(title) :].splitlines()[1 : rows + 1]
    cells = [line.split() for line in lines]
    assert len(cells) == rows and all(len(row) == cols for row in cells)
    return [cell for row in cells for cell in row]


def error_line(capsys, argv: list[str]) -> str:
    """The one-line argument error `argv` ends in (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    """A tiny VisionTrim Qwen2.5-VL folder, images at most 448 x 448."""
    return save_qwen_checkpoint(tmp_path_factory.mktemp("qwen2.5-vl"), max_pixels=448 * 448)


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


@pytest.mark.parametrize(
    ("arch", "name", "grid", "tokens"),
    [("video-llava", "Video-LLaVA", 16, 28), ("llava-next-video", "LLaVA-NeXT-Video", 24, 195)],
)
def test_video_architectures_run_their_image_path(tmp_path, capsys, arch, name, grid, tokens):
    # Video-LLaVA's image tower sees 224 px (a 16x16 grid, 28 of 256 tokens kept); LLaVA-NeXT-Video's images are
    # LLaVA-NeXT's anyres crops.
    folder = save_checkpoint(tmp_path / arch, arch=arch)
    overlay = tmp_path / "overlay.png"
    main(["--model", str(folder), "--repeats", "1", "--save", str(overlay)])
    report = capsys.readouterr().out
    assert (
        f"model: {folder} ({ {'video-llava': 'Video-LLaVA', 'llava-next-video': 'LLaVA-NeXT-Video'}[arch] })" in report
    )
    assert re.search(rf"visual tokens fed to the LLM: stock \d+, VisionTrim {tokens} \(", report)
    cells = grid_cells(report, grid, grid)
    assert cells.count("D") + cells.count("S") == (tokens if arch == "video-llava" else 64)
    assert Image.open(overlay).size == (grid * 14, grid * 14 + LEGEND_HEIGHT)


def test_qwen_report_shows_the_kept_units(qwen_folder, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    main(["--model", str(qwen_folder), "--repeats", "1", "--save", str(overlay), "--max-new-tokens", "2"])
    report = capsys.readouterr().out
    # The 451x300 photo becomes 22 x 32 patches of 14 px: an 11 x 16 grid of 176 merged units, of which
    # round_half_up(176 * 64 / 576) = 20 are kept: 15 by DVTS and 5 TGVC seeds.
    assert "model: " + str(qwen_folder) + " (Qwen2.5-VL)" in report
    assert "guidance text (LLM tokens): 'What animal is in the picture, and what is it lying on?'" in report
    assert "visual tokens fed to the LLM: stock 176, VisionTrim 20 (15 DVTS + 5 TGVC, 88.6% fewer)" in report
    cells = grid_cells(report, 11, 16, "grid of the image's merged units")
    assert (cells.count("D"), cells.count("S"), cells.count(".")) == (15, 5, 156)
    assert "answer, stock:" in report and "answer, VisionTrim:" in report
    image = Image.open(overlay)
    assert image.size == (16 * 28, 11 * 28 + LEGEND_HEIGHT)
    pixels = numpy.asarray(image.convert("RGB")).astype(int)
    for index, cell in enumerate(cells):
        row, col = divmod(index, 16)
        if cell == "D":
            assert tuple(pixels[row * 28, col * 28]) == DOMINANT_COLOUR[:3], index


def test_onevision_report_counts_crops_in_the_llms_vocabulary(tmp_path, capsys):
    from visiontrim.tools.build_onevision import build_onevision_config, build_onevision_processor

    config = build_onevision_config()
    build_model(config).save_pretrained(tmp_path / "onevision")
    build_onevision_processor(config).save_pretrained(tmp_path / "onevision")
    main(["--model", str(tmp_path / "onevision"), "--repeats", "1", "--max-new-tokens", "2"])
    report = capsys.readouterr().out
    # The 451x300 photo picks the 1x2 grid of 384 px crops: the base view and 2 crops of 27 x 27 patches, each keeping
    # 81 of 729 tokens (61 by DVTS, 20 TGVC seeds) and its newline.
    assert "guidance text (LLM tokens): 'What animal is in the picture, and what is it lying on?'" in report
    assert "VisionTrim 246 (3 crops x (61 DVTS + 20 TGVC + 1 image_newline)" in report
    cells = grid_cells(report, 27, 27, "patch grid of the base crop")
    assert (cells.count("D"), cells.count("S")) == (61, 20)


def test_qwen_budget_is_a_ratio(qwen_folder, capsys):
    line = error_line(capsys, ["--model", str(qwen_folder), "--tokens", "16"])
    assert "argument --tokens: Qwen2.5-VL keeps a share of each image's merged tokens" in line
    main(["--model", str(qwen_folder), "--repeats", "1", "--reduction-ratio", "0.5"])
    assert "stock 176, VisionTrim 88 (" in capsys.readouterr().out


def test_a_stock_folder_is_refused_in_one_line(tmp_path, capsys):
    config = build_config()
    stock_llava_with_same_weights(build_model(config)).save_pretrained(tmp_path / "stock")
    line = error_line(capsys, ["--model", str(tmp_path / "stock")])
    assert line == (
        f"visiontrim: error: argument --model: {tmp_path / 'stock'} is a stock LLaVA-1.5 folder; the main job runs "
        "stock and VisionTrim with the same weights from a VisionTrim folder: convert it with visiontrim-convert first"
    )


def test_an_unsupported_model_type_and_a_qwen_random_model_are_refused_naming_the_supported_ones(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    line = error_line(capsys, ["--model", str(tmp_path / "other")])
    assert "model_type 'idefics3' is not an architecture VisionTrim supports: llava (LLaVA-1.5)," in line
    assert line.endswith("qwen2-vl (Qwen2-VL), qwen3-vl (Qwen3-VL), qwen3-vl-moe (Qwen3-VL-MoE).")
    line = error_line(capsys, ["--arch", "qwen2.5-vl"])
    assert line == (
        "visiontrim: error: argument --arch: the random model is one of llava (LLaVA-1.5), llava-next (LLaVA-NeXT), "
        "video-llava (Video-LLaVA), llava-next-video (LLaVA-NeXT-Video), got 'qwen2.5-vl' (run other architectures "
        "from a VisionTrim folder with --model)"
    )


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
