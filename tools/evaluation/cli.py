# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim eval run`: answer a benchmark with a model folder (stock or VisionTrim, any architecture and
budget), then score the answers; `python -m visiontrim eval score`: score an existing LLaVA answers file (any
model's). `eval video-run` / `eval video-score`: the same for open-ended video QA (MSVD-QA, MSRVTT-QA, TGIF-QA,
ActivityNet-QA) with a folder of an architecture that takes videos.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from ...architectures import ARCHITECTURES, is_visiontrim
from ..arguments import (
    UsageError,
    existing_file,
    existing_folder,
    existing_path,
    folder_architecture,
    model_folder,
    positive_int,
    reduction_ratio,
)
from .data import (
    TASKS,
    DataError,
    Question,
    attach_references,
    pair_answers,
    read_answers,
    read_dataset,
    read_llava_questions,
    read_mmbench,
)
from .lmms_task import TASK_NAME, write_pope_task
from .runner import generate_answers
from .scoring import SCORERS, mmvet_answers
from .video import VIDEO_TASKS, exact_match_accuracy, generate_video_answers, read_video_answers, read_video_qa


logger = logging.getLogger(__name__)


def load_questions(args: argparse.Namespace):
    if args.dataset:
        columns = dict(mapping.split("=", 1) for mapping in args.column or [])
        return read_dataset(args.dataset, args.task, columns, args.split)
    questions_path = Path(args.questions)
    if args.task in ("mmbench", "mmbench_cn"):
        return read_mmbench(questions_path, args.task)
    images = Path(args.images) if getattr(args, "images", None) else None
    return read_llava_questions(questions_path, images, args.task)


def attach_annotations(task: str, questions: list[Question], annotations: Path | None) -> list[Question]:
    """
    Attaches the references of `annotations` to the questions that lack them (all of a LLaVA question file's) and
    returns the questions left without one; refuses a task that needs annotations when none are given.
    """
    if task == "mmvet" or all(question.references for question in questions):
        return []
    if annotations is None:
        raise DataError(f"--annotations is needed to score {task}: the questions carry no answers.")
    return attach_references(task, questions, annotations)


def score(
    task: str,
    questions: list[Question],
    answers_path: Path,
    annotations: Path | None,
    without_reference: list[Question] | None = None,
) -> dict:
    """
    Scores `answers_path` against `questions`, with references from `annotations` where the questions lack them
    (`without_reference`: the questions `attach_annotations` already left without one, so it is not run again).
    """
    if without_reference is None:
        without_reference = attach_annotations(task, questions, annotations)
    pairs = pair_answers(questions, read_answers(answers_path), answers_path)
    if task == "mmvet":
        return {"task": task, "answers": mmvet_answers(pairs)}
    scored = [(question, answer) for question, answer in pairs if question.references]
    unscored = sorted({str(question.question_id) for question, _ in pairs if not question.references})
    if unscored:
        logger.warning(
            "%d answers have no reference in %s and are not scored: %s", len(unscored), annotations, unscored[:10]
        )
    if not scored:
        raise DataError(f"No answer in {answers_path} has a reference in {annotations}: nothing to score.")
    return {
        "task": task,
        "metrics": SCORERS[task](scored),
        "answers_scored": len(scored),
        "answers_without_reference": unscored,
        "questions_without_answer": len(questions) - len({question.key for question, _ in pairs}),
        "questions_without_reference": len(without_reference),
    }


def write_scores(scores: dict, output: Path | None, summary: dict) -> None:
    """Writes `scores` to `output` (when given) and prints `summary`, the figures a reader looks at first."""
    text = json.dumps(scores, indent=2, ensure_ascii=False)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        logger.info("scores written to %s", output)
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def image_summary(scores: dict) -> dict:
    """The mean metrics of an image task's scores (MM-Vet, graded elsewhere: its answers)."""
    return scores["metrics"]["mean"] if "metrics" in scores else scores["answers"]


def budget_overrides(args: argparse.Namespace) -> dict[str, float]:
    """
    The budget override of `args` for the `--model` folder, checked without loading the model: refuses an
    architecture the action does not run and a budget the folder does not take.
    """
    videos = args.action == "video-run"
    among = [architecture for architecture in ARCHITECTURES if architecture.videos or not videos]
    architecture = folder_architecture(
        args.model, among, "video QA" if videos else "the evaluation", stock_allowed=True
    )
    overrides = {"visual_tokens": args.visual_tokens} if args.visual_tokens else {}
    if args.reduction_ratio is not None:
        overrides = {"reduction_ratio": args.reduction_ratio}
    option = "--visual-tokens" if args.visual_tokens else "--reduction-ratio"
    if args.visual_tokens and architecture.qwen:
        raise UsageError(
            f"argument --visual-tokens: {architecture.display_name} keeps a share of each image's merged tokens "
            "(images have any size): give --reduction-ratio instead"
        )
    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=True, **overrides)
    except ValueError as error:
        raise UsageError(f"argument {option}: {error}") from None
    if overrides and not is_visiontrim(config):
        raise UsageError(f"argument {option}: {args.model} is a stock folder, which has no budget to override")
    return overrides


def load_model(args: argparse.Namespace, overrides: dict[str, float]):
    """The model and processor of `args.model`, on `args.device` in `args.dtype`, with `budget_overrides(args)`."""
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype), **overrides
    )
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True, **overrides)
    return model.to(args.device).eval(), processor


def run_video(args: argparse.Namespace) -> None:
    answers = Path(args.answers)
    if args.action == "video-run":
        items = read_video_qa(Path(args.questions), Path(args.gt_answers), Path(args.videos), args.task)[: args.limit]
        model, processor = load_model(args, budget_overrides(args))
        generate_video_answers(model, processor, items, answers, args.frames, args.batch_size, args.max_new_tokens)
    scores = {"task": args.task, "answers": str(answers), "metrics": exact_match_accuracy(read_video_answers(answers))}
    default_output = answers.with_suffix(".scores.json") if args.action == "video-run" else None
    write_scores(scores, Path(args.output) if args.output else default_output, scores["metrics"]["all"])


def run(args: argparse.Namespace) -> None:
    """Runs the `eval` action; bad input raises `UsageError` or `DataError` (one line, exit 2, by `__main__`)."""
    if args.action == "lmms-task":
        count = write_pope_task(
            Path(args.questions), Path(args.images), Path(args.annotations), Path(args.output), args.limit
        )
        print(
            f"{count} POPE questions written to {args.output}: run them with python -m lmms_eval --model "
            f"visiontrim --model_args pretrained=PATH --tasks {TASK_NAME} --include_path {args.output}"
        )
        return
    if args.action in ("video-run", "video-score"):
        run_video(args)
        return
    if args.action == "score":
        scores = score(
            args.task,
            load_questions(args),
            Path(args.answers),
            Path(args.annotations) if args.annotations else None,
        )
        write_scores(scores, Path(args.output) if args.output else None, image_summary(scores))
        return
    questions = load_questions(args)[: args.limit]
    # Every input is checked (questions, model folder and budget, annotations) before the model loads and runs.
    overrides = budget_overrides(args)
    annotations = Path(args.annotations) if args.annotations else None
    without_reference = attach_annotations(args.task, questions, annotations)
    model, processor = load_model(args, overrides)
    answers = Path(args.answers)
    generate_answers(
        model,
        processor,
        questions,
        args.task,
        answers,
        args.batch_size,
        args.max_new_tokens,
        Path(args.model).name,
    )
    scores = score(args.task, questions, answers, annotations, without_reference)
    write_scores(
        scores, Path(args.output) if args.output else answers.with_suffix(".scores.json"), image_summary(scores)
    )


def add_model_arguments(sub: argparse.ArgumentParser, max_new_tokens: int) -> None:
    sub.add_argument("--model", type=model_folder, required=True, help="model folder: stock or VisionTrim")
    budget = sub.add_mutually_exclusive_group()
    budget.add_argument(
        "--visual-tokens", type=positive_int, help="override a VisionTrim LLaVA model's budget per crop (or frame)"
    )
    budget.add_argument(
        "--reduction-ratio",
        type=reduction_ratio,
        help="override a VisionTrim model's share of tokens removed (Qwen: of each image's merged tokens)",
    )
    sub.add_argument("--batch-size", type=positive_int, default=1)
    sub.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    sub.add_argument("--limit", type=positive_int, help="only the first N questions")
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def add_video_arguments(actions) -> None:
    for action, help_text in (
        ("video-run", "answer video questions with a model, then score (exact match)"),
        ("video-score", "exact-match score of a video answers file"),
    ):
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument(
            "--answers",
            type=existing_file if action == "video-score" else str,
            required=True,
            help="answers JSON (Video-ChatGPT's scorer format)",
        )
        sub.add_argument("--output", help="scores JSON (video-run default: next to the answers)")
        sub.add_argument("--task", default="msvd_qa", choices=VIDEO_TASKS)
        if action == "video-run":
            sub.add_argument("--questions", type=existing_file, required=True, help="question JSON, e.g. test_q.json")
            sub.add_argument("--gt-answers", type=existing_file, required=True, help="answer JSON, e.g. test_a.json")
            sub.add_argument(
                "--videos", type=existing_folder, required=True, help="folder of <video_name>.<ext> videos"
            )
            sub.add_argument(
                "--frames", type=positive_int, default=8, help="frames sampled uniformly per video (default 8)"
            )
            add_model_arguments(sub, max_new_tokens=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    add_video_arguments(actions)
    task = actions.add_parser("lmms-task", help="write a local POPE task (data + YAML) for lmms-eval's command line")
    task.add_argument("--questions", type=existing_file, required=True, help="LLaVA's llava_pope_test.jsonl")
    task.add_argument("--images", type=existing_folder, required=True, help="the COCO val2014 images it names")
    task.add_argument(
        "--annotations", type=existing_folder, required=True, help="the folder of coco_pope_{adversarial,...}.json"
    )
    task.add_argument("--output", required=True, help="folder to write the task to (pass it as --include_path)")
    task.add_argument("--limit", type=positive_int, help="only the first N questions")
    for action, help_text in (
        ("run", "answer the questions with a model, then score"),
        ("score", "score an answers file"),
    ):
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument("--task", required=True, choices=TASKS)
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--questions", type=existing_file, help="LLaVA question .jsonl / .json, or MMBench .tsv")
        source.add_argument(
            "--dataset", type=existing_path, help="a local datasets dataset (folder, parquet, json, jsonl, csv)"
        )
        sub.add_argument("--split", help="dataset split (default: the first)")
        sub.add_argument("--column", action="append", help="map a field to a dataset column: question=prompt_text")
        sub.add_argument(
            "--annotations", type=existing_path, help="the benchmark's annotations (POPE: the coco_pope_*.json folder)"
        )
        sub.add_argument(
            "--answers",
            type=existing_file if action == "score" else str,
            required=True,
            help="LLaVA answers .jsonl (written by run, read by score)",
        )
        sub.add_argument("--output", help="scores JSON (run default: next to the answers)")
        if action == "run":
            sub.add_argument("--images", type=existing_folder, help="image folder of a LLaVA question file")
            add_model_arguments(sub, max_new_tokens=16)
