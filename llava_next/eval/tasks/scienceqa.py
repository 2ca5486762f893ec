"""ScienceQA-IMG (test): school science multiple choice questions with a picture, answered by the option's letter.

The prompt is "Context: <hint>\\n" (only when the hint is not empty), the question, the options one per line as
"A. ...", and the instruction to answer with the letter. An answer counts when, stripped, it is the right letter in
either case ("b" is right for B), or starts with the right capital letter and a dot ("B. 42" is right; "B" followed
by anything but a dot is not, nor is "(B)"), as LLaVA's own ScienceQA scoring and lmms-eval read it.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, generated
from .yesno_common import build_samples, mean_aggregate, row_image, value_of

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def _letter(index: int) -> str:
    return chr(ord("A") + index)


def _samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    def build(row: dict[str, Any], sample_id: str, where: str) -> Sample:
        hint = value_of(row, "hint", str, where)
        question = value_of(row, "question", str, where)
        choices = value_of(row, "choices", (list, tuple), where)
        if not all(isinstance(c, str) for c in choices):
            raise RowError("the field 'choices' should be a list of strings")
        answer = value_of(row, "answer", Integral, where)  # int8 in the dataset: numpy's integers count too
        if isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise RowError(f"the answer {answer!r} is not the index of one of the {len(choices)} choices")
        context = f"Context: {hint}\n" if hint else ""
        options = "\n".join(f"{_letter(i)}. {choice}" for i, choice in enumerate(choices))
        # a row without a picture is asked as text alone, as lmms-eval does (ScienceQA-IMG rows all have one)
        images = [] if value_of(row, "image", object, where) is None else [row_image(row, "image", where)]
        return Sample(id=sample_id, images=images, prompt=f"{context}{question}\n{options}{POST_PROMPT}",
                      references=_letter(int(answer)))

    # the dataset has no id column: a question is known by its position in the split, as lmms-eval's doc_id
    return build_samples(rows, "scienceqa_img", None, build)


def _score(sample: Sample, prediction: str) -> dict[str, Any]:
    answer = generated(prediction)
    target = sample.references.lower()
    if answer.lower() == target:
        hit = True
    elif len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":  # "B. the option's text"
        hit = answer[0].lower() == target
    else:
        hit = False
    return {"exact_match": 1.0 if hit else 0.0}


TASK = Task(
    name="scienceqa_img",
    hub_dataset="lmms-lab-encoder/ScienceQA",
    hub_config="ScienceQA-IMG",
    split="test",
    metrics=("exact_match",),
    samples=_samples,
    score=_score,
    aggregate=mean_aggregate("exact_match"),
    max_new_tokens=16,
    description="ScienceQA-IMG test: science multiple choice with a picture, accuracy of the answer letter",
)
