# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
A local POPE task for lmms-eval's own command line, offline: the questions, labels and images a user has (LLaVA's
`llava_pope_test.jsonl`, the POPE annotations, the COCO val2014 images) written as a `datasets` folder (images
embedded), with a task YAML that reads its Arrow files through the `arrow` builder and scores them with lmms-eval's
POPE functions. The YAML names those files relative to itself (lmms-eval resolves a local builder's `data_files`
against the YAML's folder), so the task folder can be moved or copied:

    python -m visiontrim eval lmms-task --questions llava_pope_test.jsonl --images val2014/ --annotations coco/ \
        --output pope-task/
    python -m lmms_eval --model visiontrim --model_args pretrained=PATH --tasks visiontrim_pope \
        --include_path pope-task/ --output_path results/ --log_samples
"""

import shutil
from pathlib import Path

from .data import DataError, attach_references, read_llava_questions


TASK_NAME = "visiontrim_pope"
POPE_INSTRUCTION = "\nAnswer the question using a single word or phrase."

# lmms-eval's POPE task (lmms_eval/tasks/pope/pope.yaml), reading a local dataset instead of the Hub's.
TASK_YAML = """\
# Written by `python -m visiontrim eval lmms-task`: lmms-eval's POPE task on a local copy of the data. The data files
# are relative to this file's folder, where lmms-eval looks for them.
dataset_path: arrow
dataset_kwargs:
  data_files:
    test:
{data_files}
task: "{task_name}"
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post_prompt}"
metadata:
  - version: 0.0
"""

# The task's `!function utils.*` references: lmms-eval's own POPE functions.
TASK_UTILS = """\
# Written by `python -m visiontrim eval lmms-task`: the task uses lmms-eval's own POPE functions.
from lmms_eval.tasks.pope.utils import *  # noqa: F403
"""


def write_pope_task(
    questions_path: Path, images: Path, annotations: Path, output: Path, limit: int | None = None
) -> int:
    """
    Writes `output/data` (a `datasets` DatasetDict with a `test` split: question_id, question, answer, category,
    image), `output/visiontrim_pope.yaml` (naming the split's Arrow files relative to itself) and `output/utils.py`.
    Returns the number of questions written; questions without a label stop it with their file and line, before
    anything is written.
    """
    from datasets import Dataset, DatasetDict, Features, Image, Value

    questions = read_llava_questions(questions_path, images, "pope")[:limit]
    unmatched = attach_references("pope", questions, annotations)
    if unmatched:
        raise DataError(f"{unmatched[0].source}: no POPE label matches this question (nor {len(unmatched) - 1} more).")
    features = Features(
        {
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
            "image": Image(),
        }
    )
    rows = {
        "question_id": [str(question.question_id) for question in questions],
        "question": [question.text.removesuffix(POPE_INSTRUCTION).strip() for question in questions],
        "answer": [question.references[0] for question in questions],
        "category": [question.split for question in questions],
        "image": [str(question.image_path) for question in questions],
    }
    created = [folder for folder in (output.absolute(), *output.absolute().parents) if not folder.exists()]
    try:
        DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(output / "data"))
        data_files = sorted(path.relative_to(output).as_posix() for path in (output / "data" / "test").glob("*.arrow"))
        post_prompt = POPE_INSTRUCTION.replace("\n", "\\n")
        (output / f"{TASK_NAME}.yaml").write_text(
            TASK_YAML.format(
                data_files="\n".join(f"      - {name}" for name in data_files),
                task_name=TASK_NAME,
                post_prompt=post_prompt,
            )
        )
        (output / "utils.py").write_text(TASK_UTILS)
    except BaseException:
        if created:  # a folder this call made: nothing half-written is left
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    return len(questions)
