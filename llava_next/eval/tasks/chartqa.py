"""ChartQA test (lmms-eval `chartqa`): questions about charts, scored by relaxed accuracy: a numeric answer within 5%
of the reference counts, anything else must match exactly (ignoring case). 2,500 questions, half written by people
("human_test"), half generated ("augmented_test"), each half also reported alone.

Rows (lmms-lab's ChartQA schema): type, question, answer, image. The rows have no id: a sample's id is its position
in the split (lmms-eval's document id).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Sample, Task, field_of, generated
from .vqa_accuracy import mean_over_samples, question_samples

METRICS = ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split")  # the headline first
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question with a single word."
TOLERANCE = 0.05


def _number(text: str) -> float | None:
    """The text as a float the way Python reads one (so " 12 ", "1e3", "1_000" and "nan" are numbers), a percentage
    as a fraction ("45%" -> 0.45); None for anything else."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, answer: str) -> bool:
    predicted, expected = _number(prediction), _number(answer)
    # A reference of 0 has no relative error: it, like every non-number, is compared as text.
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= TOLERANCE
    return prediction.lower() == answer.lower()


def samples(rows):
    return question_samples(rows, "chartqa", id_field=None, fields=("answer", "type"),
                            prompt=lambda question: f"{PRE_PROMPT}{question}{POST_PROMPT}",
                            references=lambda row, where: field_of(row, "answer", where, str),
                            extra=lambda row: {"type": row["type"]})


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    right = 1.0 if relaxed_correct(generated(prediction), sample.references) else 0.0
    split = "relaxed_human_split" if sample.extra["type"] == "human_test" else "relaxed_augmented_split"
    return {"relaxed_overall": right, split: right}


TASK = Task(
    name="chartqa",
    hub_dataset="lmms-lab-encoder/ChartQA",
    hub_config=None,
    split="test",
    metrics=METRICS,
    samples=samples, score=score, aggregate=partial(mean_over_samples, metrics=METRICS),
    max_new_tokens=16,
    description="ChartQA test: questions about charts, relaxed accuracy (5% on numbers, 0-1), human and augmented",
)
