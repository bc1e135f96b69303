# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""Generation over benchmark questions: batched, resumable (answered questions are skipped), LLaVA answers format."""

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Question, answer_record, read_answers


logger = logging.getLogger(__name__)


def chat_prompt(processor, question: Question) -> str:
    """The question in the model's chat format (LLaVA-1.5: "USER: <image>\\n<question> ASSISTANT:")."""
    content = ([{"type": "image"}] if question.image_path or question.image_data is not None else []) + [
        {"type": "text", "text": question.text}
    ]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = f"{processor.image_token}\n" if len(content) == 2 else ""
    return f"USER: {image}{question.text} ASSISTANT:"


def answered_keys(answers_path: Path) -> set:
    """Keys of the questions an existing answers file already answers (nothing if it does not exist)."""
    if not answers_path.is_file():
        return set()
    return {
        (answer.question_id, answer.round_id, (answer.prompt or "").split("\n")[0].strip())
        for answer in read_answers(answers_path)
    }


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    questions: list[Question],
    task: str,
    answers_path: Path,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    model_id: str = "model",
) -> int:
    """
    Answers every question not yet in `answers_path` (greedy decoding, `batch_size` prompts at a time, left padding),
    appending LLaVA answers lines as they come so an interrupted run resumes where it stopped. Returns how many it
    answered.
    """
    done = answered_keys(answers_path)
    todo = [question for question in questions if question.key not in done]
    if done:
        logger.info("%s: %d questions already answered, %d to go", answers_path, len(questions) - len(todo), len(todo))
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a", encoding="utf-8") as output, tqdm(total=len(todo), desc=task, unit="q") as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [image for image in (question.load_image() for question in batch) if image is not None]
            prompts = [chat_prompt(processor, question) for question in batch]
            image_inputs = {"images": images} if images else {}
            inputs = processor(text=prompts, padding=True, return_tensors="pt", **image_inputs).to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for question, text in zip(batch, texts, strict=True):
                output.write(
                    json.dumps(answer_record(question, text.strip(), model_id, task), ensure_ascii=False) + "\n"
                )
            output.flush()
            progress.update(len(batch))
    return len(todo)
