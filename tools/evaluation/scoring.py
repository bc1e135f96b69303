# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Scorers of the benchmarks LLaVA papers report, each taking `(question, answer text)` pairs whose questions carry
their references, and returning `{split: {metric: value}}` plus `"mean"`, in percent as the papers print them.
"""

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from statistics import mean

from .data import Question
from .normalize import vqa_accuracy


Pairs = list[tuple[Question, str]]

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def pope_answer(text: str) -> str:
    """POPE's rule: the first sentence, commas dropped, is "no" if its words hold "No", "no" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split()
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def yes_no_answer(text: str) -> str:
    """MME's rule: "yes" / "no" if the answer is that word or begins with it (first 4 characters), else "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    start = text[:4]
    return "yes" if "yes" in start else "no" if "no" in start else "other"


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """
    The option letter an answer picks: the bare letter, a leading "B.", "(B)", "B)" or "B:", "the answer is B", or an
    answer equal to one option's text; None when none of these holds (counted wrong).
    """
    text = text.strip()
    letters = set(options)
    if text.rstrip(".") in letters:
        return text.rstrip(".")
    leading = re.match(r"^\(?([A-Z])(?:[.):]|\s|$)", text)
    if leading and leading.group(1) in letters:
        return leading.group(1)
    stated = re.search(r"answer is:?\s*\(?([A-Z])\b", text, re.IGNORECASE)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    by_text = [letter for letter, option in options.items() if option.strip().lower() == text.rstrip(".").lower()]
    return by_text[0] if len(by_text) == 1 else None


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def with_mean(per_split: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Adds `"mean"`: each metric averaged over the splits."""
    metrics = {name for values in per_split.values() for name in values}
    per_split["mean"] = {
        name: mean(values[name] for values in per_split.values() if name in values) for name in sorted(metrics)
    }
    return per_split


def by_split(pairs: Pairs) -> dict[str, Pairs]:
    splits = defaultdict(list)
    for question, answer in pairs:
        splits[question.split].append((question, answer))
    return dict(sorted(splits.items()))


def score_pope(pairs: Pairs) -> dict:
    """Accuracy, precision, recall, F1 (positive: "yes") and the share of "yes" answers, per split."""
    metrics = {}
    for split, split_pairs in by_split(pairs).items():
        predictions = [pope_answer(answer) == "yes" for _, answer in split_pairs]
        labels = [question.references[0].lower() == "yes" for question, _ in split_pairs]
        true_positive = sum(p and t for p, t in zip(predictions, labels, strict=True))
        false_positive = sum(p and not t for p, t in zip(predictions, labels, strict=True))
        false_negative = sum(not p and t for p, t in zip(predictions, labels, strict=True))
        true_negative = len(labels) - true_positive - false_positive - false_negative
        precision = percent(true_positive, true_positive + false_positive)
        recall = percent(true_positive, true_positive + false_negative)
        metrics[split] = {
            "accuracy": percent(true_positive + true_negative, len(labels)),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": percent(sum(predictions), len(predictions)),
        }
    return with_mean(metrics)


def accuracy_by_split(pairs: Pairs, correct: Callable[[Question, str], float]) -> dict:
    """Mean of `correct` (in [0, 1]) per split, plus `"all"` over every question; `"mean"` is `"all"`."""
    metrics = {
        split: {"accuracy": percent(sum(correct(q, a) for q, a in p), len(p))} for split, p in by_split(pairs).items()
    }
    overall = {"accuracy": percent(sum(correct(q, a) for q, a in pairs), len(pairs))}
    return {**metrics, "all": overall, "mean": dict(overall)}


def score_gqa(pairs: Pairs) -> dict:
    """GQA's exact match (lower case, final period dropped), as LLaVA's GQA evaluation."""
    return accuracy_by_split(pairs, lambda q, a: a.strip().rstrip(".").lower() == q.references[0].strip().lower())


def score_vqa(pairs: Pairs) -> dict:
    """VQAv2 / TextVQA: the official VQA accuracy over the human answers."""
    return accuracy_by_split(pairs, lambda q, a: vqa_accuracy(a, q.references))


def score_multiple_choice(pairs: Pairs) -> dict:
    """ScienceQA-IMG and SEED-Bench image: the picked option letter against the answer letter."""
    return accuracy_by_split(pairs, lambda q, a: choice_letter(a, q.options) == q.references[0])


def score_mmbench(pairs: Pairs) -> dict:
    """
    MMBench circular evaluation: a question counts only if every rotation of its options is answered right
    (`circular_accuracy`); `accuracy` is the first rotation alone. Per category and overall.
    """
    rounds = defaultdict(list)
    for question, answer in pairs:
        rounds[question.group].append((question, choice_letter(answer, question.options) == question.references[0]))
    per_category = defaultdict(list)
    for group_rounds in rounds.values():
        first = min(group_rounds, key=lambda item: item[0].round_id)
        per_category[first[0].split].append((first[1], all(correct for _, correct in group_rounds)))
    per_category = dict(sorted(per_category.items()))
    every = [item for items in per_category.values() for item in items]

    def summary(items: list[tuple[bool, bool]]) -> dict[str, float]:
        return {
            "accuracy": percent(sum(first for first, _ in items), len(items)),
            "circular_accuracy": percent(sum(circular for _, circular in items), len(items)),
        }

    metrics = {category: summary(items) for category, items in per_category.items()}
    return {**metrics, "all": summary(every), "mean": summary(every)}


def score_mme(pairs: Pairs) -> dict:
    """
    MME: per category, `acc` (questions) and `acc_plus` (images with both questions right), `score = acc + acc_plus`;
    `perception` and `cognition` sum their categories' scores.
    """
    metrics = {}
    for category, category_pairs in by_split(pairs).items():
        images = defaultdict(list)
        for question, answer in category_pairs:
            images[question.group].append(yes_no_answer(answer) == question.references[0].lower())
        accuracy = percent(sum(sum(answers) for answers in images.values()), len(category_pairs))
        accuracy_plus = percent(sum(all(answers) for answers in images.values()), len(images))
        metrics[category] = {"acc": accuracy, "acc_plus": accuracy_plus, "score": accuracy + accuracy_plus}
    totals = {
        "perception": sum(metrics[c]["score"] for c in MME_PERCEPTION if c in metrics),
        "cognition": sum(metrics[c]["score"] for c in MME_COGNITION if c in metrics),
    }
    metrics["perception"] = {"score": totals["perception"]}
    metrics["cognition"] = {"score": totals["cognition"]}
    metrics["mean"] = totals
    return metrics


SCORERS: dict[str, Callable[[Pairs], dict]] = {
    "pope": score_pope,
    "gqa": score_gqa,
    "vqav2": score_vqa,
    "textvqa": score_vqa,
    "scienceqa": score_multiple_choice,
    "seed": score_multiple_choice,
    "mmbench": score_mmbench,
    "mmbench_cn": score_mmbench,
    "mme": score_mme,
}


def mmvet_answers(pairs: Iterable[tuple[Question, str]]) -> dict[str, str]:
    """MM-Vet has no local scorer: its GPT grader reads `{question_id: answer}`."""
    return {str(question.question_id): answer for question, answer in pairs}
