"""DocVQA validation (lmms-eval `docvqa_val`): questions about scanned documents, scored by ANLS (average normalised
Levenshtein similarity, threshold 0.5). 5,349 questions.

Rows (lmms-lab's DocVQA schema, configuration "DocVQA"): questionId, question, image, answers (strings);
question_types, docId, ucsf_document_id, ucsf_document_page_no and data_split are not used.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Sample, Task, generated
from .vqa_accuracy import answer_list, mean_over_samples, question_samples

METRICS = ("anls",)  # the headline first
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."
THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute a character), one row of the table at a time."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, char_b in enumerate(b, 1):
        current = [j]
        for i, char_a in enumerate(a, 1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str]) -> float:
    """1 - the smallest normalised distance to an answer, or 0 when that is under THRESHOLD. As lmms-eval computes it:
    the distance is between the lower-cased texts with white space runs made single spaces, but it is divided by
    the longer of the two texts as given (upper-cased, which lengthens a few characters such as "ß")."""

    def squeeze(text: str) -> str:
        return " ".join(text.strip().lower().split())

    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(squeeze(answer), squeeze(prediction)) / length if length else 0.0)
    similarity = 1 - min(distances)
    return similarity if similarity >= THRESHOLD else 0.0


def samples(rows):
    return question_samples(rows, "docvqa_val", id_field="questionId", fields=("answers",),
                            prompt=lambda question: f"{PRE_PROMPT}{question}{POST_PROMPT}", references=answer_list)


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    return {"anls": anls(generated(prediction), sample.references)}


TASK = Task(
    name="docvqa_val",
    hub_dataset="lmms-lab-encoder/DocVQA",
    hub_config="DocVQA",
    split="validation",
    metrics=METRICS,
    samples=samples, score=score, aggregate=partial(mean_over_samples, metrics=METRICS),
    max_new_tokens=32,
    description="DocVQA val: questions about document scans, ANLS (threshold 0.5, 0-1)",
)
