"""
Attention analysis: measurements on hand-built maps, recorded rows equal to eager attention, shapes and masses for
every LLaVA-family architecture, and the refusal of the others.
"""

import json
import logging
import math
import sys

import numpy
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaModel

from visiontrim.__main__ import main
from visiontrim.tools import plots
from visiontrim.tools.analysis import (
    analyze_sample,
    attention_entropy,
    box_centre_cells,
    centre_of_mass,
    record_attention_rows,
    top_k_share,
)
from visiontrim.tools.build import stock_llava_with_same_weights, stock_processor
from visiontrim.tools.build_qwen import build_qwen_config

from helpers import assert_plot, load_remote, refused, save_checkpoint


GRID = 24


def test_centre_of_mass_by_hand():
    grid = numpy.zeros((GRID, GRID))
    grid[2, 3] = 5.0
    assert centre_of_mass(grid).tolist() == [2.0, 3.0]
    grid[:] = 0
    grid[0, 0] = grid[0, 4] = 1.0
    grid[6, 4] = 2.0
    # rows: (0 + 0 + 2 * 6) / 4 = 3; cols: (0 + 4 + 2 * 4) / 4 = 3
    assert centre_of_mass(grid).tolist() == [3.0, 3.0]
    assert numpy.isnan(centre_of_mass(numpy.zeros((GRID, GRID)))).all()


def test_entropy_and_top_k_share_by_hand():
    assert attention_entropy(numpy.full(4, 0.25)) == pytest.approx(math.log(4))
    assert attention_entropy(numpy.array([0.0, 3.0, 0.0])) == 0.0
    assert attention_entropy(numpy.array([2.0, 2.0, 0.0, 0.0])) == pytest.approx(math.log(2))
    assert top_k_share(numpy.array([1.0, 4.0, 2.0, 3.0]), 2) == pytest.approx(0.7)


def test_recorded_rows_equal_eager_attention_with_rope_and_grouped_heads():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaModel(config).eval()
    input_ids = torch.randint(0, 50, (1, 12))
    attention_mask = torch.ones(1, 12, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding
    queries = torch.tensor([11, 7, 9])
    with torch.no_grad(), record_attention_rows(model, [0, 2], queries, attention_mask[0].bool()) as recorded:
        eager = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    for layer in (0, 2):
        expected = eager[layer][0].mean(dim=0)[queries]
        torch.testing.assert_close(recorded.rows[layer], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recorded.rows[layer].sum(dim=-1), torch.ones(3))
    assert set(recorded.rows) == {0, 2}  # only the layers asked for


def test_box_centre_follows_the_preprocessing(remote):
    _, processor = remote  # CLIP preprocessing: short side to 336, centre crop
    photo = Image.new("RGB", (600, 400))
    assert box_centre_cells([250, 150, 350, 250], photo, processor).tolist() == pytest.approx([12.0, 12.0])
    # Short side 400 -> 336 (scale 0.84), 84 px cut on each side: x = 30 * 0.84 - 84 = -58.8 px, outside the crop.
    assert box_centre_cells([0, 0, 60, 40], photo, processor).tolist() == pytest.approx([20 * 0.84 / 14, -58.8 / 14])


@pytest.mark.parametrize("arch", ["llava", "llava-next", "video-llava", "llava-next-video"])
def test_sample_measurements_for_visiontrim_and_stock(tmp_path, photos, arch):
    model, processor = load_remote(save_checkpoint(tmp_path, arch=arch))
    stock, stock_proc = stock_llava_with_same_weights(model), stock_processor(processor)
    question = "What animal is this?"
    for net, net_processor, compressed in ((model, processor, True), (stock, stock_proc, False)):
        sample = analyze_sample(net, net_processor, photos[0], question, [0, 1], top_k=4, box=[100, 50, 300, 250])
        visual_tokens = sample["visual_attention"].shape[-1]
        inputs = net_processor(images=photos[0], text=f"USER: <image>\n{question} ASSISTANT:")
        assert visual_tokens == int((torch.as_tensor(inputs["input_ids"][0]) == net.config.image_token_id).sum())
        assert sample["visual_attention"].shape == (2, 2, visual_tokens) and sample["cells"].shape == (
            visual_tokens,
            3,
        )
        # Each row's attention over the visual tokens sums to the mass reported, which is a share of the whole row.
        numpy.testing.assert_allclose(sample["visual_attention"].sum(-1), sample["visual_mass"], rtol=1e-5)
        assert ((sample["visual_mass"] > 0) & (sample["visual_mass"] <= 1 + 1e-6)).all()
        on_grid = sample["cells"][:, 0] >= 0
        numpy.testing.assert_allclose(
            sample["grids"].sum(axis=(-3, -2, -1)), sample["visual_attention"][..., on_grid].sum(-1), rtol=1e-5
        )
        assert (sample["entropy"] <= math.log(visual_tokens) + 1e-6).all() and (
            sample["top_k_share"] <= 1 + 1e-6
        ).all()
        grid = 16 if arch == "video-llava" else GRID  # Video-LLaVA's 224 px towers
        assert sample["grids"].shape[-2:] == (grid, grid)
        assert ((sample["centre_of_mass"] >= 0) & (sample["centre_of_mass"] <= grid - 1)).all()
        assert sample["crop_image"].shape == (grid * 14, grid * 14, 3) and not numpy.isnan(sample["box_centre"]).any()
        crops, anyres = sample["grids"].shape[2], arch in ("llava-next", "llava-next-video")
        if compressed:  # the budget per crop, and for LLaVA-NeXT one newline per crop
            assert on_grid.sum() == net.config.visual_tokens * crops and (~on_grid).sum() == (crops if anyres else 0)
        elif not anyres:
            assert visual_tokens == grid * grid and on_grid.all()
        else:
            assert sample["cells"][:576, 0].tolist() == [0] * 576 and (~on_grid).sum() > 0  # row newlines


def test_command_line_on_a_three_item_file(checkpoint, photos, tmp_path, capsys):
    for name, photo in zip(("cat.jpg", "cup.jpg"), photos, strict=True):
        photo.save(tmp_path / name)
    rows = [{"image": "cat.jpg", "question": "What animal is this?", "box": [100, 20, 300, 280]},
            {"image": "cup.jpg", "question": "What is in the cup?"},
            {"image": "cup.jpg", "text": "Is the cup white?", "box": [200, 100, 400, 300]}]  # fmt: skip
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    main(
        [
            "analyze",
            "--model",
            str(checkpoint),
            "--data",
            str(data),
            "--with-stock",
            "--top-k",
            "8",
            "--output-dir",
            str(output),
            "--device",
            "cpu",
        ]
    )
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["models"]) == {"VisionTrim", "stock"} and summary["top_k"] == 8
    for model in summary["models"].values():
        assert model["samples"] == 3 and model["layers"] == [0, 1]
        for kind in ("last_token", "question"):
            assert len(model[kind]["entropy"]) == 2 and len(model[kind]["centre_of_mass"]) == 2
            assert model[kind]["centre_of_mass_shift"][0] is None and model[kind]["distance_to_box"] is not None
    for index in range(3):
        assert_plot(output / f"{index:05d}.png", (600, 600))  # 2 models x 2 layers
        for name in ("VisionTrim", "stock"):
            arrays = numpy.load(output / f"{index:05d}-{name}.npz")
            assert arrays["visual_attention"].shape[-1] == (64 if name == "VisionTrim" else 576)
    assert_plot(output / "layers.png", (900, 600))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "analyze",
                "--model",
                str(checkpoint),
                "--data",
                str(data),
                "--layers",
                "0,5",
                "--output-dir",
                str(output),
            ]
        )
    assert exit_info.value.code == 2
    assert "argument --layers: must be within 0..1 (the LLM's layers), got [0, 5]" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen2.5-vl", "qwen2-vl"])
def test_qwen_folders_are_refused_naming_the_llava_family(tmp_path, capsys, arch):
    build_qwen_config(arch).save_pretrained(tmp_path / arch)  # refused from its config.json, before loading
    (tmp_path / "items.jsonl").write_text(json.dumps({"image": "cat.jpg", "question": "What animal is this?"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--model", str(tmp_path / arch), "--data", str(tmp_path / "items.jsonl")])
    name = {"qwen2.5-vl": "Qwen2.5-VL", "qwen2-vl": "Qwen2-VL"}[arch]
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"visiontrim analyze: error: argument --model: {tmp_path / arch} is a {name} folder; the attention analysis "
        "supports llava (LLaVA-1.5), llava-next (LLaVA-NeXT), video-llava (Video-LLaVA), llava-next-video "
        "(LLaVA-NeXT-Video)"
    )


def test_without_matplotlib_the_analysis_finishes_and_says_how_to_plot(
    checkpoint, photos, tmp_path, caplog, monkeypatch
):
    photos[0].save(tmp_path / "cat.jpg")
    (tmp_path / "items.jsonl").write_text(json.dumps({"image": "cat.jpg", "question": "What animal is this?"}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as where it is not installed
    plots.warn_missing_matplotlib.cache_clear()
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        main(["analyze", "--model", str(checkpoint), "--data", str(tmp_path / "items.jsonl"), "--output-dir",
              str(output), "--device", "cpu"])  # fmt: skip
    summary = json.loads((output / "summary.json").read_text())
    assert summary["models"]["VisionTrim"]["samples"] == 1
    assert (output / "00000-VisionTrim.npz").is_file() and not list(output.glob("*.png"))
    assert "matplotlib is not installed: the PNG plots are not drawn" in caplog.text
    assert caplog.text.count("matplotlib is not installed") == 1  # said once, not once per plot


def test_a_data_file_error_is_one_line_with_exit_status_2(checkpoint, tmp_path, capsys):
    (tmp_path / "items.jsonl").write_text(json.dumps({"image": "missing.jpg", "question": "What is it?"}) + "\n")
    with refused(capsys, r"items.jsonl:1: image missing.jpg not found in"):
        main(["analyze", "--model", str(checkpoint), "--data", str(tmp_path / "items.jsonl")])
