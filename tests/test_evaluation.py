"""
The evaluation runner: every scorer against hand-computed scores, the input formats (LLaVA question files with image
folders, MMBench .tsv with base64 images, datasets folders and files), their errors, resume, batch size, the CLI,
and the lmms-eval plugin.
"""

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import datasets
import numpy
import pytest
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

from visiontrim.__main__ import main
from visiontrim.tools.evaluation import cli as evaluation_cli
from visiontrim.tools.evaluation.cli import score
from visiontrim.tools.evaluation.data import (
    DataError,
    Question,
    pair_answers,
    read_answers,
    read_dataset,
    read_json_lines,
    read_llava_questions,
    read_mmbench,
)
from visiontrim.tools.evaluation.lmms_task import write_pope_task
from visiontrim.tools.evaluation.normalize import normalize_vqa_answer, vqa_accuracy
from visiontrim.tools.evaluation.runner import generate_answers
from visiontrim.tools.evaluation.scoring import (
    choice_letter,
    mmvet_answers,
    pope_answer,
    score_gqa,
    score_mmbench,
    score_mme,
    score_multiple_choice,
    score_pope,
    score_vqa,
    yes_no_answer,
)

from helpers import refused, save_qwen_checkpoint


POPE = Path(__file__).parent / "data" / "pope"


def question(question_id, references, split="all", **fields) -> Question:
    return Question(
        question_id=question_id, text=f"q{question_id}", source="test", references=references, split=split, **fields
    )


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---- scorers, against scores worked out by hand


@pytest.mark.parametrize(
    ("text", "label"),
    [("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No", "no"), ("no, it is a cat", "no"),
     ("There is not a dog. Yes.", "no"), ("Yes. No.", "yes"), ("Nope", "yes"), ("NO", "yes")],
)  # fmt: skip
def test_pope_reads_the_first_sentence(text, label):
    assert pope_answer(text) == label


def test_pope_scores_by_hand():
    # split a: labels y y n n, answers y n y n -> TP 1, FN 1, FP 1, TN 1.
    # split b: labels y n n n, answers y y n n -> TP 1, FP 1, TN 2: accuracy 75, precision 50, recall 100, F1 66.67.
    labels = {"a": ["yes", "yes", "no", "no"], "b": ["yes", "no", "no", "no"]}
    answers = {"a": ["Yes", "No", "Yes", "No"], "b": ["Yes", "Yes", "No", "no."]}
    pairs = [
        (question(f"{split}{i}", [label], split), answer)
        for split in labels
        for i, (label, answer) in enumerate(zip(labels[split], answers[split], strict=True))
    ]
    metrics = score_pope(pairs)
    assert metrics["a"] == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0}
    assert metrics["b"] == pytest.approx(
        {"accuracy": 75.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 50.0}
    )
    assert metrics["mean"] == pytest.approx(
        {"accuracy": 62.5, "precision": 50.0, "recall": 75.0, "f1": (50 + 200 / 3) / 2, "yes_ratio": 50.0}
    )


def test_pope_on_the_real_files_matches_by_image_and_object(tmp_path):
    questions = read_llava_questions(POPE / "llava_pope_test.jsonl", None, "pope")
    answers = write_lines(
        tmp_path / "answers.jsonl",
        [{"question_id": q.question_id, "prompt": q.text, "text": "Yes"} for q in questions],
    )
    scores = score("pope", questions, answers, POPE / "coco")
    assert scores["answers_scored"] == 69 and scores["questions_without_reference"] == 0  # the "imange" ones too
    # Answering "yes" to all: adversarial and popular have 12 yes / 12 no, the random questions 11 yes / 10 no.
    for split in ("adversarial", "popular"):
        assert scores["metrics"][split] == pytest.approx(
            {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 100.0}
        )
    random_precision = 100 * 11 / 21
    assert scores["metrics"]["random"] == pytest.approx(
        {"accuracy": random_precision, "precision": random_precision, "recall": 100.0,
         "f1": 2 * random_precision * 100 / (random_precision + 100), "yes_ratio": 100.0}
    )  # fmt: skip
    assert scores["metrics"]["mean"]["accuracy"] == pytest.approx((50 + 50 + random_precision) / 3)


def test_pope_reports_questions_it_cannot_label(tmp_path):
    questions = read_llava_questions(POPE / "llava_pope_test.jsonl", None, "pope")
    questions[0].text = questions[0].text.replace("Is there a ", "Is there a purple ")
    answers = write_lines(
        tmp_path / "answers.jsonl", [{"question_id": q.question_id, "prompt": q.text, "text": "no"} for q in questions]
    )
    scores = score("pope", questions, answers, POPE / "coco")
    assert scores["answers_without_reference"] == [str(questions[0].question_id)] and scores["answers_scored"] == 68


def test_vqa_normalisation_and_accuracy_by_hand():
    assert normalize_vqa_answer("A dog.") == "dog"
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("isnt it") == "isn't it"
    assert normalize_vqa_answer("1,000 people") == "1000 people"
    references = ["red", "red"] + ["blue"] * 8
    # "red": each red reference sees 1 other red (1/3), each blue one sees 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    assert vqa_accuracy("Red.", references) == pytest.approx(0.6)
    assert vqa_accuracy("the blue", references) == pytest.approx(1.0)
    assert vqa_accuracy("green", references) == 0.0
    pairs = [(question(1, references, "colour"), "red"), (question(2, ["2"] * 10, "count"), "two")]
    assert score_vqa(pairs)["all"]["accuracy"] == pytest.approx(80.0)
    assert score_vqa(pairs)["colour"]["accuracy"] == pytest.approx(60.0)


def test_gqa_exact_match():
    pairs = [(question(1, ["table"]), "Table."), (question(2, ["left"]), "on the left"), (question(3, ["yes"]), "yes")]
    assert score_gqa(pairs)["mean"]["accuracy"] == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("B.", "B"), ("(C) a dog", "C"), ("A: cat", "A"), ("The answer is D.", "D"), ("a red car", "B"),
     ("E", None), ("I cannot tell", None)],
)  # fmt: skip
def test_choice_letter(text, letter):
    assert choice_letter(text, {"A": "cat", "B": "a red car", "C": "dog", "D": "bird"}) == letter


def test_multiple_choice_scores_per_category():
    options = {"A": "x", "B": "y"}
    pairs = [(question(1, ["A"], "scene", options=options), "A"), (question(2, ["B"], "scene", options=options), "A"),
             (question(3, ["B"], "count", options=options), "y")]  # fmt: skip
    metrics = score_multiple_choice(pairs)
    assert metrics["scene"]["accuracy"] == 50.0 and metrics["count"]["accuracy"] == 100.0
    assert metrics["all"]["accuracy"] == pytest.approx(200 / 3) == metrics["mean"]["accuracy"]


def test_mmbench_circular_evaluation_by_hand():
    def rounds(index, answers, correct, category):
        options = {"A": "1", "B": "2"}
        return [
            (Question(index, "q", "test", references=[correct[r]], options=options, group=str(index), round_id=r,
                      split=category), answers[r])
            for r in range(2)
        ]  # fmt: skip

    pairs = (
        rounds(1, ["A", "B"], ["A", "B"], "ocr")
        + rounds(2, ["A", "A"], ["A", "B"], "ocr")
        + rounds(3, ["B", "A"], ["A", "B"], "logic")
    )
    metrics = score_mmbench(pairs)
    assert metrics["ocr"] == {"accuracy": 100.0, "circular_accuracy": 50.0}
    assert metrics["logic"] == {"accuracy": 0.0, "circular_accuracy": 0.0}
    assert metrics["all"] == pytest.approx({"accuracy": 200 / 3, "circular_accuracy": 100 / 3})


def test_mme_scores_by_hand():
    def pair(category, image, reference, answer):
        return Question(
            image, "q", "test", references=[reference], split=category, group=f"{category}/{image}"
        ), answer

    pairs = [
        pair("existence", "1.jpg", "Yes", "Yes"), pair("existence", "1.jpg", "No", "no, it is not"),  # both right
        pair("existence", "2.jpg", "Yes", "Yes"), pair("existence", "2.jpg", "No", "Yes"),  # one right
        pair("code_reasoning", "3.png", "Yes", "maybe"), pair("code_reasoning", "3.png", "No", "No"),
    ]  # fmt: skip
    metrics = score_mme(pairs)
    assert metrics["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert metrics["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert metrics["mean"] == {"perception": 125.0, "cognition": 50.0}
    assert yes_no_answer("Yes, it is.") == "yes" and yes_no_answer("I think so") == "other"


def test_mmvet_writes_the_graders_answers_file():
    pairs = [(question("v1_0", []), "a cat"), (question("v1_1", []), "42")]
    assert mmvet_answers(pairs) == {"v1_0": "a cat", "v1_1": "42"}


# ---- input formats and their errors


@pytest.fixture
def pope_like(tmp_path, photos):
    """A POPE-style question file about the two bundled photos, their image folder and annotations."""
    images = tmp_path / "images"
    images.mkdir()
    for name, photo in zip(("cat.jpg", "cup.jpg"), photos, strict=True):
        photo.save(images / name)
    rows, labels = [], {"adversarial": [], "popular": [], "random": []}
    facts = [("cat.jpg", "cat", "yes"), ("cat.jpg", "dog", "no"), ("cup.jpg", "cup", "yes"), ("cup.jpg", "cat", "no")]
    for number, (split, (image, thing, label)) in enumerate(((s, f) for s in labels for f in facts), start=1):
        text = f"Is there a {thing} in the image?"
        rows.append(
            {
                "question_id": number,
                "image": image,
                "text": f"{text}\nAnswer the question using a single word or phrase.",
                "category": split,
            }
        )
        labels[split].append({"question_id": len(labels[split]) + 1, "image": image, "text": text, "label": label})
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for split, split_rows in labels.items():
        write_lines(annotations / f"coco_pope_{split}.json", split_rows)
    return write_lines(tmp_path / "questions.jsonl", rows), images, annotations


def test_llava_question_file_and_its_errors(tmp_path, pope_like):
    questions_file, images, _ = pope_like
    questions = read_llava_questions(questions_file, images, "pope")
    assert len(questions) == 12 and questions[0].load_image().size == (451, 300)
    assert questions[0].text.endswith("Answer the question using a single word or phrase.")
    (images / "cup.jpg").unlink()
    with pytest.raises(DataError, match=r"questions.jsonl:3: image cup.jpg not found in .*images"):
        read_llava_questions(questions_file, images, "pope")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not a JSON object"):
        read_llava_questions(broken, None, "gqa")
    missing = write_lines(tmp_path / "missing.jsonl", [{"question_id": 1, "prompt": "a"}])
    with pytest.raises(DataError, match=r"missing.jsonl:1: a question needs `question_id` and `text`"):
        read_llava_questions(missing, None, "gqa")


def test_answers_file_errors(tmp_path, pope_like):
    questions = read_llava_questions(pope_like[0], None, "pope")
    bad = write_lines(tmp_path / "bad.jsonl", [{"question_id": 1, "answer": "yes"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: unknown answer format: expected `question_id` and a `text`"):
        read_answers(bad)
    foreign = write_lines(
        tmp_path / "foreign.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 99, "text": "no"}]
    )
    with pytest.raises(DataError, match=r"foreign.jsonl:2: question_id 99 .* do not belong to these questions"):
        pair_answers(questions, read_answers(foreign), foreign)


def mmbench_file(path: Path, photos) -> Path:
    buffer = io.BytesIO()
    photos[0].save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        writer.writerow(
            [7, "What animal is this?", "Look closely.", "cat", "dog", "cow", "fox", "A", "animals", image]
        )
        writer.writerow([8, "Is it indoors?", "nan", "yes", "no", "", "", "B", "scenes", image])
    return path


def test_mmbench_tsv_gives_one_question_per_rotation(tmp_path, photos):
    questions = read_mmbench(mmbench_file(tmp_path / "mmbench.tsv", photos), "mmbench")
    assert [(q.question_id, q.round_id) for q in questions] == [
        ("7", 0),
        ("7", 1),
        ("7", 2),
        ("7", 3),
        ("8", 0),
        ("8", 1),
    ]
    assert questions[0].text == (
        "Look closely.\nWhat animal is this?\nA. cat\nB. dog\nC. cow\nD. fox\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert questions[1].options == {"A": "dog", "B": "cow", "C": "fox", "D": "cat"} and questions[1].references == [
        "D"
    ]
    assert questions[5].options == {"A": "no", "B": "yes"} and questions[5].references == ["A"]
    assert questions[0].load_image().size == (451, 300)
    assert read_mmbench(tmp_path / "mmbench.tsv", "mmbench_cn")[0].text.endswith("请直接回答选项字母。")


def test_datasets_inputs_with_a_column_mapping(tmp_path, photos):
    photos[1].save(tmp_path / "cup.jpg")
    records = [
        {
            "id": "q1",
            "prompt": "What is in the cup?",
            "img": str(tmp_path / "cup.jpg"),
            "gold": "coffee",
            "topic": "food",
        }
    ]
    write_lines(tmp_path / "data.jsonl", records)
    columns = {"question_id": "id", "question": "prompt", "image": "img", "answer": "gold", "category": "topic"}
    [from_json] = read_dataset(str(tmp_path / "data.jsonl"), "gqa", columns, None)
    assert (from_json.question_id, from_json.references, from_json.split) == ("q1", ["coffee"], "food")
    assert from_json.text == "What is in the cup?\nAnswer the question using a single word or phrase."
    assert from_json.load_image().size == (600, 400)

    saved = datasets.Dataset.from_dict(
        {"question_id": [1], "question": ["Which animal?"], "image": [photos[0]], "choices": [["cat", "dog"]],
         "answer": ["A"]},
        features=datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                    "image": datasets.Image(), "choices": datasets.Sequence(datasets.Value("string")),
                                    "answer": datasets.Value("string")}),
    )  # fmt: skip
    saved.save_to_disk(str(tmp_path / "saved"))
    [from_disk] = read_dataset(str(tmp_path / "saved"), "seed", {"options": "choices"}, None)
    assert from_disk.options == {"A": "cat", "B": "dog"} and from_disk.references == ["A"]
    assert (
        from_disk.text
        == "Which animal?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    )
    assert from_disk.load_image().size == (451, 300)
    with pytest.raises(DataError, match=r"no column 'prompt' for question.*--column question=NAME"):
        read_dataset(str(tmp_path / "saved"), "seed", {"question": "prompt"}, None)


# ---- generation: batching, resume, the CLI


def test_batch_size_does_not_change_the_answers(remote, pope_like, tmp_path):
    model, processor = remote
    questions = read_llava_questions(pope_like[0], pope_like[1], "pope")
    generate_answers(model, processor, questions, "pope", tmp_path / "one.jsonl", batch_size=1, max_new_tokens=4)
    generate_answers(model, processor, questions, "pope", tmp_path / "four.jsonl", batch_size=4, max_new_tokens=4)
    one = [(a.question_id, a.text) for a in read_answers(tmp_path / "one.jsonl")]
    four = [(a.question_id, a.text) for a in read_answers(tmp_path / "four.jsonl")]
    assert len(one) == 12 and one == four


def test_an_interrupted_run_resumes(remote, pope_like, tmp_path):
    model, processor = remote
    questions = read_llava_questions(pope_like[0], pope_like[1], "pope")
    answers = tmp_path / "answers.jsonl"
    assert generate_answers(model, processor, questions[:5], "pope", answers, batch_size=2, max_new_tokens=3) == 5
    first = answers.read_text().splitlines()
    assert generate_answers(model, processor, questions, "pope", answers, batch_size=2, max_new_tokens=3) == 7
    lines = answers.read_text().splitlines()
    assert lines[:5] == first and len(lines) == 12
    assert sorted(json.loads(line)["question_id"] for line in lines) == list(range(1, 13))
    assert generate_answers(model, processor, questions, "pope", answers) == 0


def test_eval_run_and_score_from_the_command_line(checkpoint, pope_like, tmp_path, capsys):
    questions, images, annotations = pope_like
    answers, scores = tmp_path / "answers.jsonl", tmp_path / "scores.json"
    main(["eval", "run", "--task", "pope", "--model", str(checkpoint), "--questions", str(questions), "--images",
          str(images), "--annotations", str(annotations), "--answers", str(answers), "--batch-size", "3",
          "--max-new-tokens", "3", "--device", "cpu"])  # fmt: skip
    written = json.loads(answers.with_suffix(".scores.json").read_text())
    assert written["task"] == "pope" and set(written["metrics"]) == {"adversarial", "popular", "random", "mean"}
    assert set(written["metrics"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert all(json.loads(line)["model_id"] == checkpoint.name for line in answers.read_text().splitlines())
    main(["eval", "score", "--task", "pope", "--questions", str(questions), "--annotations", str(annotations),
          "--answers", str(answers), "--output", str(scores)])  # fmt: skip
    assert json.loads(scores.read_text())["metrics"] == written["metrics"]
    assert '"accuracy"' in capsys.readouterr().out


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> Path:
    """A tiny VisionTrim Qwen2.5-VL folder (88.9% of each image's merged tokens removed)."""
    return save_qwen_checkpoint(tmp_path_factory.mktemp("qwen2.5-vl-visiontrim"), max_pixels=448 * 448)


def test_eval_run_answers_with_a_qwen_folder_and_its_budget_override(qwen_checkpoint, pope_like, tmp_path):
    questions, images, annotations = pope_like
    answers = tmp_path / "answers.jsonl"
    main(["eval", "run", "--task", "pope", "--model", str(qwen_checkpoint), "--questions", str(questions), "--images",
          str(images), "--annotations", str(annotations), "--answers", str(answers), "--batch-size", "2",
          "--max-new-tokens", "2", "--device", "cpu", "--limit", "4", "--reduction-ratio", "0.5"])  # fmt: skip
    assert len(answers.read_text().splitlines()) == 4
    assert set(json.loads(answers.with_suffix(".scores.json").read_text())["metrics"]) >= {"mean"}
    with pytest.raises(SystemExit):
        main(["eval", "run", "--task", "pope", "--model", str(qwen_checkpoint), "--questions", str(questions),
              "--images", str(images), "--answers", str(answers), "--reduction-ratio", "1.5"])  # fmt: skip


def eval_error(capsys, argv: list[str]) -> str:
    """The one-line argument error of `visiontrim eval ...argv` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_eval_refuses_a_budget_or_a_modality_the_folder_does_not_take(
    qwen_checkpoint, checkpoint, pope_like, tmp_path, capsys
):
    questions, images, _ = pope_like
    pope = ["run", "--task", "pope", "--questions", str(questions), "--images", str(images), "--limit", "1"]
    line = eval_error(capsys, [*pope, "--model", str(qwen_checkpoint), "--visual-tokens", "8", "--answers", "a"])
    assert "argument --visual-tokens: Qwen2.5-VL keeps a share of each image's merged tokens" in line
    line = eval_error(capsys, [*pope, "--model", str(checkpoint), "--visual-tokens", "900", "--answers", "a"])
    assert "argument --visual-tokens:" in line and "visual_tokens must be an integer in [1, 576]" in line

    videos = tmp_path / "videos"
    videos.mkdir()
    with av.open(str(videos / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in numpy.zeros((2, 32, 32, 3), dtype=numpy.uint8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "q.json").write_text(json.dumps([{"video_name": "clip", "question": "What?", "question_id": 1}]))
    (tmp_path / "a.json").write_text(json.dumps([{"answer": "x", "question_id": 1}]))
    video = ["video-run", "--questions", str(tmp_path / "q.json"), "--gt-answers", str(tmp_path / "a.json"),
             "--videos", str(videos), "--answers", str(tmp_path / "answers.json")]  # fmt: skip
    assert eval_error(capsys, [*video, "--model", str(checkpoint)]) == (
        f"visiontrim eval: error: argument --model: {checkpoint} is a LLaVA-1.5 folder; video QA supports "
        "video-llava (Video-LLaVA), llava-next-video (LLaVA-NeXT-Video), llava-onevision (LLaVA-OneVision), "
        "qwen2.5-vl (Qwen2.5-VL), "
        "qwen2-vl (Qwen2-VL), qwen3-vl (Qwen3-VL), qwen3-vl-moe (Qwen3-VL-MoE)"
    )


def test_eval_score_refuses_unscorable_input(pope_like, tmp_path, capsys):
    questions, _, annotations = pope_like
    answers = write_lines(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
    with refused(capsys, r"--annotations is needed to score pope"):
        main(["eval", "score", "--task", "pope", "--questions", str(questions), "--answers", str(answers)])
    empty = tmp_path / "empty"
    shutil.copytree(annotations, empty)
    write_lines(
        empty / "coco_pope_adversarial.json",
        [{"question_id": 1, "image": "x.jpg", "text": "Is there a cow in the image?", "label": "no"}],
    )
    with refused(capsys, r"No answer in .* has a reference"):
        main(
            [
                "eval",
                "score",
                "--task",
                "pope",
                "--questions",
                str(questions),
                "--annotations",
                str(empty),
                "--answers",
                str(answers),
            ]
        )


def test_eval_run_checks_the_annotations_before_the_model_runs(checkpoint, pope_like, tmp_path, monkeypatch, capsys):
    questions, images, _ = pope_like
    (tmp_path / "wrong").mkdir()

    def load_model(*args):
        raise AssertionError("the model was loaded before the annotations were checked")

    monkeypatch.setattr(evaluation_cli, "load_model", load_model)
    run = ["eval", "run", "--task", "pope", "--model", str(checkpoint), "--questions", str(questions),
           "--images", str(images), "--answers", str(tmp_path / "answers.jsonl")]  # fmt: skip
    with refused(capsys, r"wrong: coco_pope_adversarial.json is missing"):
        main([*run, "--annotations", str(tmp_path / "wrong")])
    with refused(capsys, r"--annotations is needed to score pope"):
        main(run)
    assert not (tmp_path / "answers.jsonl").exists()


def test_video_score_prints_the_score_summary(tmp_path, capsys):
    answers = tmp_path / "answers.json"
    answers.write_text(
        json.dumps(
            [{"id": "1", "Q": "What?", "A": "cat", "pred": "A cat.", "type": 0},
             {"id": "2", "Q": "What?", "A": "dog", "pred": "cat", "type": 1}]
        )
    )  # fmt: skip
    main(["eval", "video-score", "--answers", str(answers)])
    assert json.loads(capsys.readouterr().out) == {"exact_match": 50.0, "answers": 2}


# ---- lmms-eval


def test_lmms_eval_plugin_loads_and_answers_one_item(checkpoint, photos):
    model_class = get_model("visiontrim")
    assert model_class.__name__ == "VisionTrimLmms"
    lm = model_class(pretrained=str(checkpoint), device="cpu", dtype="float32")
    lm.task_dict = {"pope": {"test": [{"image": photos[0]}]}}
    context = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    arguments = (context, {"max_new_tokens": 4, "until": ["\n\n"]}, lambda doc: [doc["image"]], 0, "pope", "test")
    request = Instance("generate_until", arguments, 0, {"task": "pope", "doc_id": 0, "repeats": 1})
    [answer] = lm.generate_until([request])

    processor = lm.processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=photos[0], text=prompt, return_tensors="pt")
    assert processor.guidance_tokenizer.decode(inputs["guidance_input_ids"][0], skip_special_tokens=True).startswith(
        "is there a cat in the image ? answer the question"
    )
    expected = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(expected, skip_special_tokens=True).split("\n\n")[0].strip()

    likelihood = Instance(
        "loglikelihood",
        (context, " Yes", lambda doc: [doc["image"]], 0, "pope", "test"),
        0,
        {"task": "pope", "doc_id": 0, "repeats": 1},
    )
    [(log_probability, greedy)] = lm.loglikelihood([likelihood])
    assert log_probability < 0 and isinstance(greedy, bool)


def test_lmms_eval_plugin_names_every_argument_it_accepts(checkpoint):
    with pytest.raises(ValueError, match=r"unknown model_args \['bogus'\]; it accepts pretrained, device, dtype, "
                       r"batch_size, visual_tokens, reduction_ratio, max_new_tokens\."):  # fmt: skip
        get_model("visiontrim")(pretrained=str(checkpoint), bogus=1)


def test_lmms_eval_plugin_puts_the_image_into_a_qwen_chat(qwen_checkpoint, photos):
    lm = get_model("visiontrim")(
        pretrained=str(qwen_checkpoint), device="cpu", dtype="float32", reduction_ratio="0.75"
    )
    assert lm.model.config.reduction_ratio == lm.processor.reduction_ratio == 0.75
    lm.task_dict = {"pope": {"test": [{"image": photos[0]}]}}
    context = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    arguments = (context, {"max_new_tokens": 4}, lambda doc: [doc["image"]], 0, "pope", "test")
    [answer] = lm.generate_until(
        [Instance("generate_until", arguments, 0, {"task": "pope", "doc_id": 0, "repeats": 1})]
    )
    processor = lm.processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}],
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>Is there a cat" in prompt
    inputs = processor(images=[photos[0]], text=[prompt], return_tensors="pt")
    assert processor.tokenizer.decode(inputs["guidance_input_ids"][0]) == context.replace("\n", " ")
    expected = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(expected, skip_special_tokens=True).strip()


def test_lmms_task_leaves_no_folder_behind_when_writing_fails(pope_like, tmp_path, monkeypatch):
    questions, images, annotations = pope_like

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_pope_task(questions, images, annotations, tmp_path / "new" / "task")
    assert not (tmp_path / "new").exists()


def run_lmms_eval(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """lmms-eval's own command line, `python -m lmms_eval`, offline, in a fresh interpreter (`cwd` holds its cache)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_DATASETS_CACHE": str(cwd / "datasets-cache")}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=600,
    )


def test_lmms_eval_command_line_runs_the_shipped_pope_task_offline(checkpoint, qwen_checkpoint, photos, tmp_path):
    # The task: real POPE questions and labels (tests/data/pope) on two bundled photos saved under their COCO names.
    images = tmp_path / "val2014"
    images.mkdir()
    names = sorted({row["image"] for _, row in read_json_lines(POPE / "llava_pope_test.jsonl")})
    for index, name in enumerate(names):
        photos[index % 2].save(images / name)
    main(["eval", "lmms-task", "--questions", str(POPE / "llava_pope_test.jsonl"), "--images", str(images),
          "--annotations", str(POPE / "coco"), "--output", str(tmp_path / "written"), "--limit", "8"])  # fmt: skip
    assert str(tmp_path) not in (tmp_path / "written" / "visiontrim_pope.yaml").read_text()
    # The folder moved after it was written, and run from elsewhere: its data paths are relative to its YAML.
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "written", tmp_path / "moved" / "task")

    task = ["--tasks", "visiontrim_pope", "--include_path", str(tmp_path / "moved" / "task")]
    result = run_lmms_eval(
        "--model", "visiontrim", "--model_args", f"pretrained={checkpoint},visual_tokens=64", *task,
        "--batch_size", "1", "--output_path", str(tmp_path / "results"), "--log_samples", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "results").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["visiontrim_pope"] == {"original": 8, "effective": 8}
    metrics = results["results"]["visiontrim_pope"]
    for metric in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"):
        assert 0 <= metrics[f"{metric},none"] <= 1, metric
    [samples_file] = (tmp_path / "results").rglob("*_samples_visiontrim_pope.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 8 and samples[0]["target"] in ("yes", "no")
    assert (
        samples[0]["input"] == "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    )
    assert samples[0]["pope_accuracy"]["prediction"] == samples[0]["filtered_resps"].lower().strip()

    # A Qwen2.5-VL folder through the same command line, with its budget override.
    qwen = run_lmms_eval(
        "--model", "visiontrim", "--model_args", f"pretrained={qwen_checkpoint},reduction_ratio=0.75", *task,
        "--limit", "4", "--batch_size", "1", "--output_path", str(tmp_path / "qwen"), cwd=tmp_path,
    )  # fmt: skip
    assert qwen.returncode == 0, qwen.stderr[-3000:]
    [qwen_results] = (tmp_path / "qwen").rglob("*_results.json")
    assert json.loads(qwen_results.read_text())["n-samples"]["visiontrim_pope"] == {"original": 8, "effective": 4}
    assert "pope_accuracy,none" in json.loads(qwen_results.read_text())["results"]["visiontrim_pope"]

    # lmms-eval 0.7.3 logs an error raised during the evaluation and exits 0; --verbosity DEBUG makes it fail.
    bad = ("--model", "visiontrim", "--model_args", f"pretrained={checkpoint},bogus=1", *task)
    quiet = run_lmms_eval(*bad, "--output_path", str(tmp_path / "quiet"), cwd=tmp_path)
    assert quiet.returncode == 0 and "unknown model_args ['bogus']" in quiet.stderr
    assert not (tmp_path / "quiet").exists()  # what tells the failure: no results file
    loud = run_lmms_eval(*bad, "--output_path", str(tmp_path / "loud"), "--verbosity", "DEBUG", cwd=tmp_path)
    assert loud.returncode != 0 and "unknown model_args ['bogus']" in loud.stderr
