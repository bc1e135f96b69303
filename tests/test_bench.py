"""
The benchmark at a toy size, every architecture: every field of its JSON, the analytic numbers against hand
computation (no timing); a VisionTrim folder of any architecture, and the folders it refuses.
"""

import json
import logging
import math
import sys

import pytest
import torch
from transformers import LlamaConfig

from visiontrim.__main__ import main
from visiontrim.architectures import architecture_named
from visiontrim.tools import bench, bench_qwen, plots
from visiontrim.tools.build import (
    LLAVA_15_SHAPES,
    Shapes,
    build_config,
    build_model,
    describe_shapes,
    stock_llava_with_same_weights,
)
from visiontrim.tools.demo import build_random
from visiontrim.tools.measure import Timing, noise_note, prefill_flops, time_per_step

from helpers import assert_plot, save_qwen_checkpoint


ROW_FIELDS = {
    "name", "tokens_per_crop", "dominant_ratio", "llm_stage_tokens", "llm_stage_layer",
    "prompt_tokens_after_llm_stage", "visual_tokens", "prompt_tokens", "vision_encoding", "compression",
    "compression_repeated_question",
    "guidance_encoding", "vision_tower", "prefill", "decode_per_token", "end_to_end", "prefill_flops",
    "kv_cache_bytes", "peak_prefill_memory_bytes", "ratios",
}  # fmt: skip
RATIO_FIELDS = {
    "visual_tokens", "vision_encoding_time", "prefill_time", "prefill_flops", "decode_time_per_token",
    "end_to_end_time", "kv_cache_bytes", "peak_prefill_memory", "compression_share_of_tower",
    "repeated_question_compression_share_of_tower", "guidance_encoding_share_of_tower", "prefill_speedup_over_ideal",
}  # fmt: skip


def test_prefill_flops_by_hand():
    config = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=3,
        vocab_size=10,
    )
    # n = 5, d = 8, d_h = 4: QKV 2*5*8*(2+2)*4 = 1280, O 2*5*2*4*8 = 640, attention 4*25*2*4 = 800,
    # MLP 6*5*8*16 = 3840.
    assert prefill_flops(config, 5) == 3 * (1280 + 640 + 800 + 3840) + 2 * 8 * 10
    # With the LLM stage from layer 1 on 3 tokens: layer 1 and 2 over n = 3 (QKV 768, O 384, attention 288, MLP 2304),
    # plus the rerank at n = 5: Q and K 2*5*8*(2+1)*4 = 960, scores 2*25*2*4 = 400, 2 merges of 2*25*8 = 400 each.
    assert prefill_flops(config, 5, pruned_length=3, pruned_from=1, merges=2) == (
        (1280 + 640 + 800 + 3840) + 2 * (768 + 384 + 288 + 2304) + 960 + 400 + 2 * 400 + 2 * 8 * 10
    )


@pytest.mark.parametrize(
    ("arch", "tokens"),
    [
        ("llava", [576, 192, 128, 64, 64, 64, 64]),
        ("llava-next", [2928, 640, 320, 160, 320, 320, 320]),
        ("video-llava", [2056, 256, 128, 64, 128, 128]),  # 8 frames: stock 8 x 257, then 32 / 16 / 8 per frame
        ("llava-next-video", [1152, 512, 256, 128, 256, 256]),  # 8 frames: stock 8 x 144 pooled, then 64 / 32 / 16
    ],
)
def test_toy_benchmark_writes_every_field(tmp_path, capsys, arch, tokens):
    main(
        [
            "bench",
            "--toy",
            "--arch",
            arch,
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / f"bench-{arch}.json").read_text())
    assert_plot(tmp_path / f"bench-{arch}.png", (720, 480))
    assert set(report) == {
        "model",
        "arch",
        "media_size",
        "question",
        "dtype",
        "warmup",
        "repeats",
        "new_tokens",
        "machine",
        "rows",
    }
    assert {"device", "cpu", "cpu_count", "torch_threads", "torch", "transformers"} <= set(report["machine"])
    rows = report["rows"]
    assert [row["visual_tokens"] for row in rows] == tokens
    shapes = Shapes()
    for row in rows:
        assert set(row) == ROW_FIELDS and set(row["ratios"]) == RATIO_FIELDS
        for timing in ("vision_encoding", "prefill", "end_to_end"):
            assert len(row[timing]["runs"]) == 1 and row[timing]["runs"][0] > 0
        # Llama K and V, fp32: 2 x prompt tokens of each layer x kv heads x head dim x 4 bytes; with the LLM stage
        # (from layer 1 of 2 in the toy), layer 1 holds only the kept prompt.
        head_dim = shapes.llm_hidden // shapes.llm_heads
        if row["llm_stage_tokens"] is None:
            tokens_per_layer = shapes.llm_layers * row["prompt_tokens"]
        else:
            assert row["llm_stage_layer"] == 1 and row["name"].endswith("@1")
            kept = row["prompt_tokens_after_llm_stage"]
            assert kept == row["prompt_tokens"] - (row["visual_tokens"] - row["llm_stage_tokens"])
            tokens_per_layer = row["prompt_tokens"] + kept
        assert row["kv_cache_bytes"] == 2 * tokens_per_layer * shapes.llm_kv_heads * head_dim * 4
        assert row["ratios"]["visual_tokens"] == pytest.approx(row["visual_tokens"] / tokens[0])
        assert row["ratios"]["prefill_flops"] == pytest.approx(row["prefill_flops"] / rows[0]["prefill_flops"])
        tgvc = row["tokens_per_crop"] is not None and row["dominant_ratio"] < 1
        assert (row["guidance_encoding"] is not None) == tgvc
        assert (row["compression_repeated_question"] is not None) == tgvc
    assert rows[0]["compression"] is None and rows[0]["ratios"]["compression_share_of_tower"] is None
    assert all(row["compression"] is not None for row in rows[1:])
    assert report["model"].startswith(f"random {architecture_named(arch).display_name}-shaped: tiny towers")
    table = capsys.readouterr().out
    assert all(row["name"] in table for row in rows)
    # One run of 2 tokens against one of 1: a decode time is a positive figure, or said to be below the noise.
    assert all(row["decode_per_token"] is None or row["decode_per_token"] > 0 for row in rows)
    assert (noise_note(2) in table) == any(row["decode_per_token"] is None for row in rows)


def test_a_decode_time_below_the_timers_noise_is_said_so():
    assert time_per_step(Timing([2.0, 2.1]), Timing([1.0, 1.05]), 10) == pytest.approx(0.1)
    assert time_per_step(Timing([1.0]), Timing([1.2]), 15) is None  # negative, one run each
    assert time_per_step(Timing([1.1, 1.4]), Timing([1.0, 1.05]), 15) is None  # within the runs' spread

    timing = Timing([0.5])
    rows = [
        bench.Row(name, None, None, vision_encoding=timing, prefill=timing, end_to_end=timing, prefill_flops=10,
                  kv_cache_bytes=2**20, visual_tokens=576, decode_per_token=decode)
        for name, decode in (("stock", 0.02), ("VisionTrim 64", None))
    ]  # fmt: skip
    bench.add_ratios(rows)
    assert rows[1].ratios["decode_time_per_token"] is None
    _, _, stock_line, noisy_line = bench.table(rows).splitlines()
    assert "20.0" in stock_line.split() and "noise" in noisy_line.split()

    qwen_rows = [
        bench_qwen.QwenRow(name, (448, 448), None, None, visual_tokens=256, prefill=timing, prefill_flops=10,
                           kv_cache_bytes=2**20, decode_per_token=decode)
        for name, decode in (("stock", None), ("VisionTrim 25%", 0.01))
    ]  # fmt: skip
    bench_qwen.add_ratios(qwen_rows, timing)
    assert qwen_rows[1].ratios["decode_time_per_token"] is None
    *_, stock_line, figure_line = bench_qwen.table(qwen_rows, timing).splitlines()
    assert "noise" in stock_line.split() and "10.0" in figure_line.split()


def test_the_random_models_header_names_the_towers_that_run(caplog):
    with caplog.at_level(logging.INFO):
        build_random("llava", {}, Shapes(), torch.float32, "cpu")
    assert "model: tiny towers at 336 px (vision 3 x 32, text 2 x 32), LLM 2 x 64" in caplog.text
    assert "ViT-L/14" not in caplog.text
    assert describe_shapes(LLAVA_15_SHAPES) == (
        "CLIP ViT-L/14 towers at 336 px (vision 24 x 1024, text 12 x 768), LLM 4 x 1024"
    )


def test_without_matplotlib_the_benchmark_finishes_and_says_how_to_plot(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as where it is not installed
    plots.warn_missing_matplotlib.cache_clear()
    with caplog.at_level(logging.WARNING):
        main(["bench", "--toy", "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench-llava.json").read_text())
    assert len(report["rows"]) == 7 and not (tmp_path / "bench-llava.png").exists()
    assert "matplotlib is not installed: the PNG plots are not drawn" in caplog.text
    assert 'pip install "visiontrim[tools]"' in caplog.text
    assert "Timings on a shared machine are noisy" in caplog.text


TOY_ARGUMENTS = ["--warmup", "0", "--repeats", "1", "--new-tokens", "2"]


@pytest.mark.parametrize("arch", ["qwen2.5-vl", "qwen2-vl"])
def test_toy_qwen_benchmark_reports_both_sizes(tmp_path, capsys, arch):
    """Qwen rows at 448 x 448 (16 x 16 units) and 1008 x 756 (36 x 27 units): stock, 25%, 11% and ablations."""
    arguments = [*TOY_ARGUMENTS, "--output-dir", str(tmp_path)]
    main(["bench", "--toy", "--arch", arch, *arguments])
    report = json.loads((tmp_path / f"bench-{arch}.json").read_text())
    assert report["arch"] == arch
    assert_plot(tmp_path / f"bench-{arch}.png", (720, 480))
    assert [entry["grid_thw"] for entry in report["sizes"]] == [[1, 32, 32], [1, 54, 72]]
    for entry, units in zip(report["sizes"], (256, 972), strict=True):
        rows = entry["rows"]
        eleven = max(1, round(units * 64 / 576))
        assert [row["visual_tokens"] for row in rows] == [units, round(units * 0.25), eleven, eleven, eleven]
        assert rows[0]["compression"] is None and all(row["compression"] for row in rows[1:])
        for row in rows:
            # Qwen2 K and V, fp32: 2 x prompt tokens x layers x kv heads x head dim x 4 bytes.
            assert row["kv_cache_bytes"] == 2 * row["prompt_tokens"] * 2 * 2 * 16 * 4
            assert row["ratios"]["prefill_flops"] == pytest.approx(row["prefill_flops"] / rows[0]["prefill_flops"])
    assert "1008 x 756: vision tower" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--toy", "--arch", arch, "--video", __file__, *arguments])
    assert exit_info.value.code == 2
    assert "argument --video: the Qwen" in capsys.readouterr().err


def test_toy_qwen3_benchmark_reports_its_default_and_deepstack(tmp_path, capsys):
    """Qwen3-VL rows at 448 x 448 (14 x 14 units) and 1024 x 768 (32 x 24): stock, its 50% default, 25%, 11%."""
    main(["bench", "--toy", "--arch", "qwen3-vl", *TOY_ARGUMENTS, "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench-qwen3-vl.json").read_text())
    assert [entry["grid_thw"] for entry in report["sizes"]] == [[1, 28, 28], [1, 48, 64]]
    for entry, units in zip(report["sizes"], (196, 768), strict=True):
        names = [row["name"] for row in entry["rows"]]
        assert names == [
            "stock",
            "VisionTrim 50%",
            "VisionTrim 25%",
            "VisionTrim 11%",
            "DVTS only 11%",
            "TGVC only 11%",
        ]
        eleven = max(1, round(units * 64 / 576))
        expected = [units, units // 2, round(units * 0.25), eleven, eleven, eleven]
        assert [row["visual_tokens"] for row in entry["rows"]] == expected
    assert "(DeepStack at [0, 1, 2])" in capsys.readouterr().out


def test_toy_onevision_benchmark_reports_crops_and_budgets_per_crop(tmp_path):
    """A 2-crop and a 5-crop photo: stock (base view + unpadded grid + row newlines) and 144 / 81 / 36 per crop."""
    main(["bench", "--toy", "--arch", "llava-onevision", *TOY_ARGUMENTS, "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench-llava-onevision.json").read_text())
    assert [entry["crops"] for entry in report["sizes"]] == [2, 5]
    for entry, crops, stock in zip(report["sizes"], (2, 5), (729 + 27 * 28, 729 + 54 * 55), strict=True):
        names = [row["name"] for row in entry["rows"]]
        assert names == ["stock", "VisionTrim 144", "VisionTrim 81", "VisionTrim 36", "DVTS only 81", "TGVC only 81"]
        per_crop = [144, 81, 36, 81, 81]
        assert [row["visual_tokens"] for row in entry["rows"]] == [stock] + [crops * (k + 1) for k in per_crop]
        assert all(row["compression"] is not None for row in entry["rows"][1:])


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny VisionTrim Qwen2.5-VL folder, images at most 448 x 448."""
    return save_qwen_checkpoint(tmp_path_factory.mktemp("qwen2.5-vl"), max_pixels=448 * 448)


def test_a_qwen_folder_is_benchmarked(qwen_folder, tmp_path, capsys):
    main(["bench", "--model", str(qwen_folder), *TOY_ARGUMENTS, "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench-qwen2.5-vl.json").read_text())
    assert report["model"] == f"{qwen_folder} (Qwen2.5-VL)" and report["arch"] == "qwen2.5-vl"
    # The folder's processor takes at most 448 x 448 pixels, so both sizes shrink; every row keeps its share
    # (round half up) of the same units.
    for entry in report["sizes"]:
        _, height, width = entry["grid_thw"]
        units = height * width // 4
        assert height * width * 14 * 14 <= 448 * 448
        kept = [max(1, math.floor(units * share + 0.5)) for share in (1, 0.25, 64 / 576)]
        assert [row["visual_tokens"] for row in entry["rows"]][:3] == kept
    assert f"{qwen_folder} (Qwen2.5-VL)" in capsys.readouterr().out


def test_a_stock_folder_and_a_contradicting_arch_are_refused(qwen_folder, tmp_path, capsys):
    stock_llava_with_same_weights(build_model(build_config())).save_pretrained(tmp_path / "stock")
    for argv, message in (
        (["--model", str(tmp_path / "stock")], f"argument --model: {tmp_path / 'stock'} is a stock LLaVA-1.5 folder;"),
        (["--model", str(qwen_folder), "--arch", "llava"], f"argument --arch: {qwen_folder} is a qwen2.5-vl folder"),
        (["--new-tokens", "1"], "argument --new-tokens: must be at least 2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *argv])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and error.startswith(f"visiontrim bench: error: {message}"), error
