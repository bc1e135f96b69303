"""The command-line tools on bad arguments: an argparse error naming the argument, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from visiontrim.__main__ import main
from visiontrim.convert_checkpoint import main as convert_main


def error_of(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "visiontrim: error: argument --tokens: must be a whole number of at least 1, got '0'"),
        (["--tokens", "many"], "argument --tokens: must be a whole number, got 'many'"),
        (["--tokens", "1000"], "argument --tokens: 1000 is more than the 576 patches of a crop"),
        (["--question", ""], "argument --question: must not be empty"),
        (["--image", "nope.jpg"], "argument --image: no such file: nope.jpg"),
        (["--model", "ckpt-typo"], "argument --model: no such folder: ckpt-typo (give a model folder written by"),
        (["--save", "no/such/folder/overlay.png"], "argument --save: no such folder to write"),
        (["bench", "--repeats", "0"], "visiontrim bench: error: argument --repeats: must be a whole number of at"),
        (["bench", "--model", "missing"], "visiontrim bench: error: argument --model: no such folder: missing"),
        (
            ["bench-vllm", "--vllm-python", "no/venv/bin/python"],
            "visiontrim bench-vllm: error: argument --vllm-python: no such file: no/venv/bin/python",
        ),
        (["bench-vllm", "--vllm-python", __file__, "--requests", "0"], "argument --requests: must be a whole number"),
        (
            ["bench-vllm", "--vllm-python", __file__, "--concurrency", "1", "4"],
            "argument --concurrency: takes one value for --arch llava, got 2",
        ),
        (
            ["bench-vllm", "--vllm-python", __file__, "--media", "image-448x448"],
            "argument --media: is for the Qwen archs",
        ),
        (
            ["bench-vllm", "--vllm-python", __file__, "--arch", "qwen2.5-vl", "--media", "image-336x336"],
            "argument --media: invalid choice: 'image-336x336'",
        ),
        (
            ["eval", "run", "--task", "pope", "--questions", "q.jsonl", "--answers", "a.jsonl", "--model", "."],
            "visiontrim eval run: error: argument --questions: no such file: q.jsonl",
        ),
        (["eval", "score", "--task", "pope", "--questions", "missing.jsonl", "--answers", "a.jsonl"], "no such file"),
        (["analyze", "--model", "missing", "--data", "d.jsonl"], "argument --model: no such folder: missing"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = error_of(capsys, lambda: main(argv))
    assert "error: argument" in line and message in line


def test_a_file_that_is_not_an_image_is_named(capsys, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a photo")
    line = error_of(capsys, lambda: main(["--image", str(tmp_path / "notes.jpg")]))
    assert f"argument --image: {tmp_path / 'notes.jpg'} is not an image Pillow can read" in line


def test_a_budget_beyond_a_checkpoints_grid_is_an_argument_error(capsys, checkpoint):
    line = error_of(capsys, lambda: main(["--model", str(checkpoint), "--tokens", "1000"]))
    assert "argument --tokens:" in line and "visual_tokens must be an integer in [1, 576]" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--llava", "./missing", "--clip", "c", "--output", "o"], "argument --llava: no such folder: ./missing"),
        (["--llava", ".", "--clip", ".", "--output", "o", "--tokens", "-3"], "argument --tokens: must be a whole"),
    ],
)
def test_converter_arguments(capsys, argv, message):
    line = error_of(capsys, lambda: convert_main(argv))
    assert message in line


@pytest.mark.parametrize("module", ["visiontrim.tools.convert", "visiontrim.convert_checkpoint"])
def test_converter_help_prints_no_torchvision_warning(module):
    # In a fresh interpreter: Transformers warns once per process, so an in-process check could miss it. The older
    # module name runs the same command.
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--dtype {auto,float16,bfloat16,float32}" in result.stdout
    usage = " ".join(result.stdout.split())
    architectures = (
        "llava,llava-next,video-llava,llava-next-video,llava-onevision,qwen2.5-vl,qwen2-vl,qwen3-vl,qwen3-vl-moe"
    )
    assert f"--arch {{{architectures}}}" in usage
    assert "torchvision" not in result.stderr + result.stdout
