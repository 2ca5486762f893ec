"""MME: yes/no questions in 14 categories, two per image (one true, one false), under one question_id.

The dataset's questions end in " Please answer yes or no."; lmms-eval removes that phrase and appends its
short-answer post-prompt instead. An answer is read as yes, no or other (Otter's parser, as lmms-eval has it).
A category's score is, averaged over its images, acc (percent of the pair right) + acc+ (100 when both are right):
at most 200. The perception score is the sum over the 10 perception categories (at most 2000), cognition over the
other 4 (at most 800).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, TaskDataError, generated
from .yesno_common import SHORT_ANSWER, build_samples, row_image, value_of

PERCEPTION = frozenset({"existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                        "artwork", "OCR"})
COGNITION = frozenset({"commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"})
METRICS = ("mme_perception_score", "mme_cognition_score")

_ASK_YES_NO = " Please answer yes or no."  # the dataset's own instruction, replaced by the post-prompt


def _samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    def build(row: dict[str, Any], sample_id: str, where: str) -> Sample:
        question_id = value_of(row, "question_id", str, where)
        question = value_of(row, "question", str, where)
        answer = value_of(row, "answer", str, where).lower().strip().replace(".", "")
        category = value_of(row, "category", str, where)
        if category not in PERCEPTION | COGNITION:  # (no row of MME's has another: another benchmark's data)
            raise TaskDataError(f"{where} has the category {category!r}, not one of MME's 14 "
                                f"({', '.join(sorted(PERCEPTION | COGNITION))}): is --data MME's "
                                "(lmms-lab-encoder/MME)?")
        if answer not in ("yes", "no"):  # lmms-eval asserts this and stops the whole run
            raise RowError(f"the answer is {row['answer']!r}, not yes or no")
        prompt = question.strip().replace(_ASK_YES_NO, "") + SHORT_ANSWER
        return Sample(id=sample_id, images=[row_image(row, "image", where)], prompt=prompt, references=answer,
                      extra={"question_id": question_id, "category": category})

    return build_samples(rows, "mme", "question_id", build)


def read_yes_no(text: str) -> str:
    """"yes", "no" or "other": the whole answer (dots removed) when it is yes/no, "y"/"n" alone, else the first of
    yes/no found in its first four characters ("Yes, there is" -> yes; "None" -> no, as in lmms-eval)."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _score(sample: Sample, prediction: str) -> dict[str, Any]:
    category = sample.extra["category"]
    return {"metric": METRICS[0] if category in PERCEPTION else METRICS[1],
            "question_id": sample.extra["question_id"], "category": category,
            "score": 1.0 if read_yes_no(generated(prediction)) == sample.references else 0.0}


def _total(scores: list[dict[str, Any]]) -> float:
    """Sum over categories of the mean over images of acc + acc+ (categories and images in first-seen order, so
    the floating-point sums are lmms-eval's to the last bit)."""
    by_category: dict[str, dict[str, list[float]]] = {}
    for s in scores:
        by_category.setdefault(s["category"], {}).setdefault(s["question_id"], []).append(s["score"])
    total = 0.0
    for category, pairs in by_category.items():
        category_total = 0.0
        for question_id, pair in pairs.items():
            if len(pair) != 2:
                raise TaskDataError(f"mme: {category} {question_id!r} has {len(pair)} scored answers; MME scores "
                                    "pairs (both questions about an image), so none of a pair may be skipped")
            category_total += (sum(pair) == 2) * 100.0 + sum(pair) / len(pair) * 100.0
        total += category_total / len(pairs)
    return total


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    return {metric: _total([s for s in scores if s["metric"] == metric]) for metric in METRICS}


TASK = Task(
    name="mme",
    hub_dataset="lmms-lab-encoder/MME",
    hub_config=None,
    split="test",
    metrics=METRICS,
    samples=_samples,
    score=_score,
    aggregate=_aggregate,
    max_new_tokens=16,
    description="MME: yes/no question pairs in 14 categories; perception (max 2000) and cognition (max 800) scores, "
                "acc + acc+ per category",
)
