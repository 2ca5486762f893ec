"""TextVQA validation (lmms-eval `textvqa_val`): questions that need reading the text in the image, 10 annotators'
answers each, scored by VQA accuracy with EvalAI's answer processing (see vqa_accuracy.py). 5,000 questions.

Rows (lmms-lab's textvqa schema): question_id, question, image, answers (10 strings); ocr_tokens is not used, since
the task's default prompt leaves the OCR tokens out (its `ocr` option is false), nor are the other fields.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Sample, Task, generated
from .vqa_accuracy import answer_list, evalai_answer, mean_over_samples, question_samples, vqa_accuracy

METRICS = ("exact_match",)  # the headline first
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _prompt(question: str) -> str:
    # lmms-eval capitalises the question the Python way: first letter up, every other letter down ("What is the
    # BRAND?" is asked as "What is the brand?").
    return f"{PRE_PROMPT}{question.capitalize()}{POST_PROMPT}"


def samples(rows):
    return question_samples(rows, "textvqa_val", id_field="question_id", fields=("answers",), prompt=_prompt,
                            references=answer_list, extra=lambda row: {"question_id": row["question_id"]})


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    answer = evalai_answer(generated(prediction))
    accuracy = vqa_accuracy(answer, [evalai_answer(reference) for reference in sample.references])
    # "submission" is the record lmms-eval writes for the evaluation server: the normalised answer.
    return {"exact_match": accuracy, "submission": {"question_id": sample.extra["question_id"], "answer": answer}}


TASK = Task(
    name="textvqa_val",
    hub_dataset="lmms-lab-encoder/textvqa",
    hub_config=None,
    split="validation",
    metrics=METRICS,
    samples=samples, score=score, aggregate=partial(mean_over_samples, metrics=METRICS),
    # The task sets no max_new_tokens (only `until: ["ASSISTANT:"]`, which lmms-eval's llava and llava_hf models
    # ignore): they generate up to their default, 1024 tokens.
    max_new_tokens=1024,
    description="TextVQA val: questions that need reading text in the image, VQA accuracy (EvalAI processing, 0-1)",
)
