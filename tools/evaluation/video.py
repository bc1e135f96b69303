# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Open-ended video QA in the layout Video-ChatGPT and Video-LLaVA evaluate MSVD-QA, MSRVTT-QA, TGIF-QA and
ActivityNet-QA with: a question JSON (`[{"video_name", "question", "question_id"}, ...]`), an answer JSON
(`[{"answer", "question_id", ...}, ...]`, same order) and a folder of videos named `<video_name>.<ext>`
(ActivityNet-QA: `v_<video_name>.<ext>`).

Frames are decoded with PyAV (`pip install av`, FFmpeg's decoders) and sampled uniformly as Video-LLaVA does:
`numpy.linspace(0, frames - 1, num_frames, dtype=int)`. Answers are written as the JSON list that Video-ChatGPT's
GPT-assisted scorer (`quantitative_evaluation/evaluate_activitynet_qa.py`) reads, `{"video_name", "Q", "A", "pred"}`,
with Video-LLaVA's `{"id", "question", "answer"}` keys beside them. The score here is exact match after VQA answer
normalisation: a judge-free proxy, lower than the GPT-judged accuracy papers report.
"""

import json
import logging
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DataError
from .normalize import normalize_vqa_answer


logger = logging.getLogger(__name__)

VIDEO_TASKS = ("msvd_qa", "msrvtt_qa", "tgif_qa", "activitynet_qa")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


@dataclass
class VideoQuestion:
    question_id: str
    video_name: str
    question: str
    answer: str
    video_path: Path
    answer_type: str | None = None


def find_video(folder: Path, video_name: str, task: str) -> Path | None:
    """`<video_name>.<ext>` in `folder` (ActivityNet-QA also `v_<video_name>.<ext>`), the first extension found."""
    names = [video_name, f"v_{video_name}"] if task == "activitynet_qa" else [video_name]
    for name in names:
        for extension in VIDEO_EXTENSIONS:
            if (folder / f"{name}{extension}").is_file():
                return folder / f"{name}{extension}"
    return None


def read_json_list(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """A JSON list of objects that all hold `fields`; errors name the file and the entry."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON file ({error}).") from error
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(entries).__name__}.")
    for index, entry in enumerate(entries):
        missing = [name for name in fields if not isinstance(entry, dict) or name not in entry]
        if missing:
            raise DataError(f"{path}: entry {index} lacks {missing} (expected the fields {list(fields)}).")
    return entries


def read_video_qa(questions: Path, answers: Path, videos: Path, task: str) -> list[VideoQuestion]:
    """
    The questions of `questions` paired with the answers of `answers` by position (as Video-LLaVA's inference script
    pairs them), checked by `question_id` where both have one, and their videos in `videos`.
    """
    question_entries = read_json_list(questions, ("video_name", "question", "question_id"))
    answer_entries = read_json_list(answers, ("answer",))
    if len(question_entries) != len(answer_entries):
        raise DataError(
            f"{questions} has {len(question_entries)} questions but {answers} {len(answer_entries)} answers: pass the "
            "answer file of the same split."
        )
    if not videos.is_dir():
        raise DataError(f"{videos} is not a folder of videos.")
    items, missing = [], []
    for index, (question, answer) in enumerate(zip(question_entries, answer_entries, strict=True)):
        if "question_id" in answer and str(answer["question_id"]) != str(question["question_id"]):
            raise DataError(
                f"{answers}: entry {index} answers question_id {answer['question_id']} but {questions} entry "
                f"{index} is {question['question_id']}: the files must list the same questions in the same order."
            )
        video_path = find_video(videos, str(question["video_name"]), task)
        if video_path is None:
            missing.append(str(question["video_name"]))
            continue
        answer_type = answer.get("type")
        items.append(
            VideoQuestion(
                question_id=str(question["question_id"]),
                video_name=str(question["video_name"]),
                question=str(question["question"]),
                answer=str(answer["answer"]),
                video_path=video_path,
                answer_type=None if answer_type is None else str(answer_type),
            )
        )
    if missing:
        logger.warning("%d questions have no video in %s and are skipped: %s", len(missing), videos, missing[:10])
    if not items:
        raise DataError(f"No video of {questions} is in {videos} (looked for <video_name>{VIDEO_EXTENSIONS}).")
    return items


def sample_frames(path: Path, num_frames: int) -> np.ndarray:
    """
    `num_frames` RGB frames `(num_frames, height, width, 3)` uint8, uniformly sampled with PyAV:
    `numpy.linspace(0, total - 1, num_frames, dtype=int)` (Video-LLaVA's sampling; a short clip repeats frames).
    """
    import av  # the `tools` extra; only video evaluation needs it

    try:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        if total == 0:
            raise DataError(f"{path} holds no video frame.")
        wanted = np.linspace(0, total - 1, num_frames, dtype=int)
        frames = {}
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
    except av.error.FFmpegError as error:
        raise DataError(f"{path}: PyAV cannot decode it ({error}).") from error
    available = sorted(frames)  # a container may announce more frames than it decodes
    return np.stack([frames[index] if index in frames else frames[available[-1]] for index in wanted])


def video_prompt(processor, question: str) -> str:
    """The question about a video in the model's chat format (Video-LLaVA: "USER: <video>\\n<question> ASSISTANT:")."""
    content = [{"type": "video"}, {"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: {processor.video_token}\n{question} ASSISTANT:"


def answer_record(item: VideoQuestion, prediction: str) -> dict:
    """One answer: Video-ChatGPT's scorer keys, then Video-LLaVA's."""
    return {
        "video_name": item.video_name,
        "Q": item.question,
        "A": item.answer,
        "pred": prediction,
        "id": item.question_id,
        "question": item.question,
        "answer": item.answer,
        "type": item.answer_type,
    }


def read_video_answers(path: Path) -> list[dict]:
    return read_json_list(path, ("id", "Q", "A", "pred"))


def write_json_atomically(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(handle, "w", encoding="utf-8") as output:
        json.dump(entries, output, ensure_ascii=False, indent=1)
    os.replace(temporary, path)


@torch.inference_mode()
def generate_video_answers(
    model,
    processor,
    items: list[VideoQuestion],
    answers_path: Path,
    num_frames: int = 8,
    batch_size: int = 1,
    max_new_tokens: int = 32,
) -> int:
    """
    Answers every question not yet in `answers_path` (greedy, `batch_size` videos at a time, `num_frames` frames
    each), rewriting the JSON list after each batch so an interrupted run resumes. Returns how many it answered.
    """
    entries = read_video_answers(answers_path) if answers_path.is_file() else []
    done = {entry["id"] for entry in entries}
    todo = [item for item in items if item.question_id not in done]
    for start in tqdm(range(0, len(todo), batch_size), desc="video qa", unit="batch"):
        batch = todo[start : start + batch_size]
        videos = [sample_frames(item.video_path, num_frames) for item in batch]
        prompts = [video_prompt(processor, item.question) for item in batch]
        inputs = processor(text=prompts, videos=videos, padding=True, return_tensors="pt").to(model.device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        entries += [answer_record(item, text.strip()) for item, text in zip(batch, texts, strict=True)]
        write_json_atomically(answers_path, entries)
    return len(todo)


def exact_match_accuracy(entries: list[dict]) -> dict:
    """
    Exact match of `pred` and `A` after VQA answer normalisation, in percent: overall and per answer `type` where the
    answers carry one.
    """
    if not entries:
        raise DataError("No answer to score.")
    by_type = defaultdict(list)
    for entry in entries:
        correct = normalize_vqa_answer(str(entry["pred"])) == normalize_vqa_answer(str(entry["A"]))
        by_type["all"].append(correct)
        if entry.get("type") is not None:
            by_type[f"type_{entry['type']}"].append(correct)
    return {
        name: {"exact_match": 100 * sum(results) / len(results), "answers": len(results)}
        for name, results in by_type.items()
    }
