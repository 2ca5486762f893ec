"""VQAv2 validation (lmms-eval `vqav2_val`): open questions about COCO images, each with 10 annotators' answers,
scored by VQA accuracy (see vqa_accuracy.py). 214,354 questions: the whole validation split, as lmms-eval runs it.

Rows (lmms-lab's VQAv2 schema): question_id, question, image, answers = 10 records {answer, answer_confidence,
answer_id}; question_type, answer_type, multiple_choice_answer and image_id are not used.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Sample, Task, TaskDataError, field_of, generated
from .vqa_accuracy import mean_over_samples, question_samples, vqa_accuracy, vqa_answer

METRICS = ("exact_match",)  # the headline first
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _annotations(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    answers = field_of(row, "answers", where, (list, tuple))
    if not answers:
        raise TaskDataError(f"{where}: the field 'answers' is empty: nothing to score against")
    for record in answers:
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
            raise TaskDataError(f"{where}: each of 'answers' should be a record with a string 'answer', got "
                                f"{record!r:.80}")
    return [dict(record) for record in answers]


def samples(rows):
    return question_samples(rows, "vqav2_val", id_field="question_id", fields=("answers",),
                            prompt=lambda question: f"{PRE_PROMPT}{question}{POST_PROMPT}", references=_annotations)


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    # Leaving an annotator out removes every annotation record equal to theirs, compared after normalising the
    # answer (lmms-eval compares the whole records, so answer_confidence and answer_id take part).
    annotations = [{**record, "answer": vqa_answer(record["answer"])} for record in sample.references]
    answers = [record["answer"] for record in annotations]
    return {"exact_match": vqa_accuracy(vqa_answer(generated(prediction)), answers, annotations)}


TASK = Task(
    name="vqav2_val",
    hub_dataset="lmms-lab-encoder/VQAv2",
    hub_config=None,
    split="validation",
    metrics=METRICS,
    samples=samples, score=score, aggregate=partial(mean_over_samples, metrics=METRICS),
    max_new_tokens=16,
    description="VQAv2 val: open questions on COCO images, VQA accuracy over 10 annotators (0-1)",
)
