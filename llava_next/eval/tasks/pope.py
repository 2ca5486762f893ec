"""POPE: "Is there a <object> in the image?" about COCO images, half of them yes, in three ways of picking the absent
objects (random, popular, adversarial). lmms-eval's `pope` task scores the 9,000 questions of all three categories
together; so does this.

An answer counts only when, lower-cased and stripped, it is exactly "yes" or "no" and equals the reference ("Yes."
is wrong: lmms-eval does not remove punctuation here). Precision, recall and F1 are those of the answer "yes".
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, generated
from .yesno_common import SHORT_ANSWER, build_samples, row_image, value_of


def _samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    def build(row: dict[str, Any], sample_id: str, where: str) -> Sample:
        question_id = value_of(row, "question_id", str, where)
        question = value_of(row, "question", str, where)
        answer = value_of(row, "answer", str, where).lower().strip()
        category = value_of(row, "category", str, where)
        if answer not in ("yes", "no"):  # lmms-eval asserts this and stops the whole run
            raise RowError(f"the answer is {row['answer']!r}, not yes or no")
        return Sample(id=sample_id, images=[row_image(row, "image", where)],
                      prompt=f"{question.strip()}{SHORT_ANSWER}", references=answer,
                      extra={"question_id": question_id, "category": category})

    return build_samples(rows, "pope", "question_id", build)


def _score(sample: Sample, prediction: str) -> dict[str, Any]:
    answer = generated(prediction).lower()  # stripped already: lower-casing adds no white space
    return {"question_id": sample.extra["question_id"], "category": sample.extra["category"],
            "score": 1.0 if answer == sample.references else 0.0, "prediction": answer,
            "ground_truth": sample.references}


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole > 0 else 0.0


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    said_yes = [s["prediction"] == "yes" for s in scores]
    is_yes = [s["ground_truth"] == "yes" for s in scores]
    said_no = [s["prediction"] == "no" for s in scores]
    true_pos = sum(p and g for p, g in zip(said_yes, is_yes))
    false_pos = sum(p and not g for p, g in zip(said_yes, is_yes))
    # a false negative is an explicit "no" to a yes-question: an answer that is neither yes nor no counts in no
    # denominator of recall (lmms-eval's definition, kept)
    false_neg = sum(p and g for p, g in zip(said_no, is_yes))
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "pope_f1_score": f1,
        "pope_accuracy": _ratio(sum(s["score"] for s in scores), len(scores)),
        "pope_precision": precision,
        "pope_recall": recall,
        # lmms-eval's "yes ratio" is the share of questions whose REFERENCE is yes (0.5 on POPE by construction),
        # not the share of answers that say yes; kept under its name so that the numbers match
        "pope_yes_ratio": _ratio(sum(is_yes), len(scores)),
    }


TASK = Task(
    name="pope",
    hub_dataset="lmms-lab-encoder/POPE",
    hub_config=None,
    split="test",
    metrics=("pope_f1_score", "pope_accuracy", "pope_precision", "pope_recall", "pope_yes_ratio"),
    samples=_samples,
    score=_score,
    aggregate=_aggregate,
    max_new_tokens=128,
    description="POPE (random, popular, adversarial together): object hallucination yes/no questions, F1 of 'yes', "
                "accuracy, precision, recall",
)
