# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Benchmark data in the formats people already have: the LLaVA evaluation layout (question `.jsonl` / `.json` plus an
image folder, MMBench `.tsv` with base64 images), any `datasets`-loadable local dataset with a column mapping, the
official annotation files of each benchmark, and LLaVA answers files. Errors name the file and the line.
"""

import base64
import csv
import io
import json
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


TASKS = ("pope", "gqa", "vqav2", "textvqa", "scienceqa", "seed", "mmbench", "mmbench_cn", "mme", "mmvet")
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTER_ANSWER_CN = "请直接回答选项字母。"
# LLaVA-1.5's evaluation prompts (appended to the question when the question file does not already hold them).
INSTRUCTIONS = {
    "pope": SHORT_ANSWER, "gqa": SHORT_ANSWER, "vqav2": SHORT_ANSWER, "textvqa": SHORT_ANSWER, "mme": SHORT_ANSWER,
    "scienceqa": LETTER_ANSWER, "seed": LETTER_ANSWER, "mmbench": LETTER_ANSWER, "mmbench_cn": LETTER_ANSWER_CN,
    "mmvet": None,
}  # fmt: skip
POPE_SPLITS = ("adversarial", "popular", "random")
POPE_OBJECT = re.compile(r"Is there an? (.+?) in the im\w*\?", re.IGNORECASE)
OPTION_LINE = re.compile(r"^\(?([A-Z])[.)]\s*(.+)$")


class DataError(ValueError):
    """Bad benchmark data; the message names the file and line and says what is wrong."""


@dataclass
class Question:
    """One question as the model sees it, with its references once annotations are attached."""

    question_id: str | int
    text: str
    source: str  # "file:line" for messages
    image_path: Path | None = None
    image_data: bytes | Image.Image | None = None
    split: str = "all"  # POPE split, or the benchmark's category
    references: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    group: str | None = None  # MMBench: the question whose rotations these are; MME: the image
    round_id: int = 0  # MMBench: which rotation of the options

    @property
    def key(self) -> tuple[str, int, str]:
        """What identifies the question in an answers file: id, rotation, first line of the prompt."""
        return str(self.question_id), self.round_id, self.text.split("\n")[0].strip()

    def load_image(self) -> Image.Image | None:
        if isinstance(self.image_data, Image.Image):
            return self.image_data.convert("RGB")
        if isinstance(self.image_data, bytes):
            return Image.open(io.BytesIO(self.image_data)).convert("RGB")
        if self.image_path is not None:
            return Image.open(self.image_path).convert("RGB")
        return None


@dataclass
class Answer:
    """One line of a LLaVA answers file."""

    question_id: str
    text: str
    prompt: str | None
    round_id: int
    source: str

    @property
    def key(self) -> tuple[str, int, str] | None:
        return (
            (self.question_id, self.round_id, self.prompt.split("\n")[0].strip()) if self.prompt is not None else None
        )


def with_instruction(text: str, task: str) -> str:
    instruction = INSTRUCTIONS[task]
    return text if instruction is None or instruction in text else f"{text}\n{instruction}"


def parse_options(text: str) -> dict[str, str]:
    """Option letters and texts, one per line ("A. cat") or inline ("(A) cat (B) dog"), as in SEED and ScienceQA."""
    options = {}
    for line in text.split("\n"):
        for part in re.split(r"\s(?=\([A-Z]\)\s)", line.strip()):
            match = OPTION_LINE.match(part.strip())
            if match:
                options[match.group(1)] = match.group(2).strip()
    return options


def read_json_lines(path: Path) -> list[tuple[str, dict]]:
    """
    `(source, object)` for each element of a JSON list, or each line of a JSON Lines file (whatever the suffix: the
    POPE annotations are JSON Lines named `.json`).
    """
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from error
    else:
        if isinstance(data, list):
            return [(f"{path}:item {index + 1}", item) for index, item in enumerate(data)]
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected JSON objects, got {type(data).__name__}.")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not a JSON object ({error.msg}).") from error
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
        rows.append((f"{path}:{number}", row))
    return rows


def read_llava_questions(path: Path, image_folder: Path | None, task: str) -> list[Question]:
    """
    A LLaVA question file: `.jsonl` lines `{question_id, image, text[, category]}`, or ScienceQA's `.json` list of
    `{id, image, conversations}`. Images are checked to exist when `image_folder` is given.
    """
    questions = []
    for source, row in read_json_lines(path):
        if "conversations" in row:
            question_id, text = row.get("id"), row["conversations"][0]["value"].replace("<image>", "").strip()
        else:
            question_id, text = row.get("question_id"), row.get("text")
        if question_id is None or text is None:
            raise DataError(f"{source}: a question needs `question_id` and `text` (or `id` and `conversations`).")
        image_path = None
        if row.get("image") and image_folder is not None:
            image_path = image_folder / row["image"]
            if not image_path.is_file():
                raise DataError(f"{source}: image {row['image']} not found in {image_folder}.")
        question = Question(
            question_id=question_id,
            text=with_instruction(text, task),
            source=source,
            image_path=image_path,
            split=row.get("category", "all"),
            group=row.get("image"),
        )
        if task in ("scienceqa", "seed"):
            question.options = parse_options(question.text)
        if task == "scienceqa" and not row.get("image"):
            continue  # ScienceQA-IMG: the questions with an image
        questions.append(question)
    if not questions:
        raise DataError(f"{path}: no questions.")
    return questions


def read_mmbench(path: Path, task: str) -> list[Question]:
    """
    An MMBench `.tsv` (index, question, hint, A-D, answer, category, base64 image): one question per rotation of its
    options (LLaVA's "all rounds"), for the circular evaluation.
    """
    questions = []
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        missing = {"index", "question", "image"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}:1: MMBench columns {sorted(missing)} are missing.")
        for number, row in enumerate(reader, start=2):
            letters = [letter for letter in "ABCDEFGH" if (row.get(letter) or "").strip() not in ("", "nan")]
            if len(letters) < 2:
                raise DataError(f"{path}:{number}: an MMBench question needs at least options A and B.")
            try:
                image = base64.b64decode(row["image"], validate=True)
            except ValueError as error:
                raise DataError(f"{path}:{number}: the image column is not base64 ({error}).") from error
            texts = [row[letter].strip() for letter in letters]
            hint = (row.get("hint") or "").strip()
            stem = f"{hint}\n{row['question'].strip()}" if hint and hint != "nan" else row["question"].strip()
            answer = (row.get("answer") or "").strip()
            for round_id in range(len(letters)):
                rotated = texts[round_id:] + texts[:round_id]
                options = dict(zip(letters, rotated, strict=True))
                prompt = stem + "".join(f"\n{letter}. {text}" for letter, text in options.items())
                references = []
                if answer in letters:
                    references = [letters[(letters.index(answer) - round_id) % len(letters)]]
                questions.append(
                    Question(
                        question_id=row["index"],
                        text=with_instruction(prompt, task),
                        source=f"{path}:{number}",
                        image_data=image,
                        split=(row.get("category") or "all").strip(),
                        references=references,
                        options=options,
                        group=row["index"],
                        round_id=round_id,
                    )
                )
    return questions


def column_names(
    dataset, path: str, columns: dict[str, str], fields: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, str]:
    """The dataset column of each field (`columns` renames them, `--column FIELD=NAME`); the `required` must exist."""
    names = {name: columns.get(name, name) for name in fields}
    for name in required:
        if names[name] not in dataset.column_names:
            raise DataError(
                f"{path}: no column {names[name]!r} for {name}; columns are {dataset.column_names}. Map it with "
                f"--column {name}=NAME."
            )
    return names


def load_local_dataset(path: str, split: str | None):
    """
    A local `datasets` dataset: a folder saved with `save_to_disk`, an image folder, or a parquet / json / jsonl /
    csv file; `split` (default: the first) of a dataset dictionary.
    """
    import datasets

    location = Path(path)
    if (location / "dataset_info.json").is_file() or (location / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(location))
    elif location.is_dir():
        dataset = datasets.load_dataset("imagefolder", data_dir=str(location))
    else:
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(location.suffix)
        if builder is None:
            raise DataError(f"{path}: not a dataset folder nor a .parquet / .json / .jsonl / .csv file.")
        dataset = datasets.load_dataset(builder, data_files=str(location))
    if isinstance(dataset, datasets.DatasetDict):
        chosen = split or next(iter(dataset))
        if chosen not in dataset:
            raise DataError(f"{path}: no split {chosen!r}; it has {sorted(dataset)}.")
        dataset = dataset[chosen]
    return dataset


def read_dataset(path: str, task: str, columns: dict[str, str], split: str | None) -> list[Question]:
    """
    A local `datasets` dataset (a folder saved with `save_to_disk`, or parquet / json / jsonl / csv files, or an
    image folder). `columns` maps our fields (question_id, question, image, answer, answers, category, options, and
    option letters A-H) to the dataset's column names; unmapped fields use their own names when present.
    """
    dataset = load_local_dataset(path, split)
    names = column_names(
        dataset,
        path,
        columns,
        ("question_id", "question", "image", "answer", "answers", "category", "options"),
        required=("question_id", "question"),
    )
    questions = []
    for number, row in enumerate(dataset):
        source = f"{path}:row {number}"
        options = {}
        if names["options"] in row and row[names["options"]]:
            options = dict(zip("ABCDEFGH", row[names["options"]], strict=False))
        for letter in "ABCDEFGH":
            column = columns.get(letter, letter)
            if column in row and row[column] not in (None, ""):
                options[letter] = str(row[column])
        text = row[names["question"]]
        if options and not parse_options(text):
            text += "".join(f"\n{letter}. {option}" for letter, option in options.items())
        image = row.get(names["image"])
        references = row.get(names["answers"]) or (
            [row[names["answer"]]] if row.get(names["answer"]) is not None else []
        )
        questions.append(
            Question(
                question_id=row[names["question_id"]],
                text=with_instruction(text, task),
                source=source,
                image_data=image if isinstance(image, Image.Image) else None,
                image_path=Path(image) if isinstance(image, str) else None,
                split=str(row.get(names["category"], "all")),
                references=[str(reference) for reference in references],
                options=options,
                group=image if isinstance(image, str) else str(row[names["question_id"]]),
            )
        )
    return questions


def attach_references(task: str, questions: list[Question], annotations: Path) -> list[Question]:
    """
    Sets each question's references from the benchmark's official annotations (or a `.jsonl` / `.json` of
    `{question_id, answer | answers}`), returning the questions that have none (reported, never dropped silently).
    """
    if task == "pope":
        return _attach_pope(questions, annotations)
    if task == "mme":
        return _attach_mme(questions, annotations)
    by_id = _references_by_id(task, annotations)
    unmatched = []
    for question in questions:
        reference = by_id.get(str(question.question_id))
        if reference is None:
            unmatched.append(question)
        else:
            question.references, category = reference
            if question.split == "all" and category:
                question.split = category
    return unmatched


def _attach_pope(questions: list[Question], folder: Path) -> list[Question]:
    """POPE labels matched by split, image and queried object, never by position or id (see the data README)."""
    labels = {}
    for split in POPE_SPLITS:
        path = folder / f"coco_pope_{split}.json"
        if not path.is_file():
            raise DataError(f"{folder}: {path.name} is missing (the POPE annotations of the {split} split).")
        for source, row in read_json_lines(path):
            match = POPE_OBJECT.search(row.get("text", ""))
            if match is None or row.get("label") not in ("yes", "no"):
                raise DataError(
                    f"{source}: expected a POPE question 'Is there a ... in the image?' with a yes/no label."
                )
            labels[(split, row["image"], match.group(1).lower())] = row["label"]
    unmatched = []
    for question in questions:
        match = POPE_OBJECT.search(question.text)
        if question.split not in POPE_SPLITS or match is None:
            raise DataError(
                f"{question.source}: a POPE question needs a category in {POPE_SPLITS} and 'Is there a ...'."
            )
        label = labels.get((question.split, question.group, match.group(1).lower()))
        if label is None:
            unmatched.append(question)
        else:
            question.references = [label]
    return unmatched


def _attach_mme(questions: list[Question], folder: Path) -> list[Question]:
    """MME: `<category>/**/*.txt` lines `image<TAB>question<TAB>yes|no`, matched by category, image and question."""
    answers = {}
    for text_file in sorted(folder.glob("*/**/*.txt")):
        category = text_file.relative_to(folder).parts[0]
        for number, line in enumerate(text_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3 or parts[2].strip().lower() not in ("yes", "no"):
                raise DataError(f"{text_file}:{number}: expected 'image<TAB>question<TAB>yes|no'.")
            answers[(category, Path(parts[0]).name, parts[1].strip())] = parts[2].strip()
    unmatched = []
    for question in questions:
        image = Path(str(question.group or question.question_id)).name
        reference = answers.get((question.split, image, question.text.split("\n")[0].strip()))
        if reference is None:
            unmatched.append(question)
        else:
            question.references = [reference]
            question.group = f"{question.split}/{image}"
    return unmatched


def _references_by_id(task: str, path: Path) -> dict[str, tuple[list[str], str | None]]:
    """`{question_id: (references, category)}` from the task's official annotation file or a generic one."""
    if path.suffix == ".jsonl":
        rows = [row for _, row in read_json_lines(path)]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from error
        if isinstance(data, dict) and "annotations" in data:  # VQAv2
            rows = [
                {"question_id": a["question_id"], "answers": [x["answer"] for x in a["answers"]]}
                for a in data["annotations"]
            ]
        elif isinstance(data, dict) and "data" in data:  # TextVQA
            rows = data["data"]
        elif isinstance(data, dict) and "questions" in data:  # SEED-Bench
            rows = data["questions"]
        elif isinstance(data, dict):  # GQA (qid -> {answer}) or ScienceQA problems (pid -> {answer: index, choices})
            rows = [{"question_id": key, **value} for key, value in data.items()]
        else:
            rows = data
    references = {}
    for number, row in enumerate(rows, start=1):
        if "question_id" not in row or not ("answer" in row or "answers" in row):
            raise DataError(f"{path}:{number}: expected `question_id` and `answer` or `answers`.")
        answers = row.get("answers")
        if answers is None:
            answer = row["answer"]
            if task == "scienceqa" and isinstance(answer, int):
                answer = "ABCDEFGH"[answer]
            answers = [answer]
        category = row.get("question_type_id") if task == "seed" else None
        references[str(row["question_id"])] = (
            [str(answer) for answer in answers],
            str(category) if category else None,
        )
    return references


def read_answers(path: Path) -> list[Answer]:
    """A LLaVA answers `.jsonl` (`question_id`, `text`, and `prompt` / `round_id` when present)."""
    answers = []
    for source, row in read_json_lines(path):
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{source}: unknown answer format: expected `question_id` and a `text` string.")
        answers.append(
            Answer(str(row["question_id"]), row["text"], row.get("prompt"), int(row.get("round_id", 0)), source)
        )
    return answers


def pair_answers(questions: list[Question], answers: list[Answer], answers_path: Path) -> list[tuple[Question, str]]:
    """
    Each answer with its question: by id, rotation and prompt, or by id alone where ids are unique. An answer whose
    question is not in the question file is an error (the files do not belong together).
    """
    by_key = {question.key: question for question in questions}
    by_id = defaultdict(list)
    for question in questions:
        by_id[(str(question.question_id), question.round_id)].append(question)
    pairs = []
    for answer in answers:
        question = by_key.get(answer.key) if answer.key else None
        if question is None and len(by_id.get((answer.question_id, answer.round_id), ())) == 1:
            question = by_id[(answer.question_id, answer.round_id)][0]
        if question is None:
            raise DataError(
                f"{answer.source}: question_id {answer.question_id} (round {answer.round_id}) is not in the question "
                f"file: the answers in {answers_path} do not belong to these questions."
            )
        pairs.append((question, answer.text))
    return pairs


def answer_record(question: Question, text: str, model_id: str, task: str) -> dict:
    """A line of a LLaVA answers file."""
    record = {
        "question_id": question.question_id,
        "prompt": question.text,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": {},
    }
    if task in ("mmbench", "mmbench_cn"):
        record.update(round_id=question.round_id, options=list(question.options.values()))
    return record
