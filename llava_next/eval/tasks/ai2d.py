"""AI2D (ai2d): science diagrams with 2-4 options, scored as lmms-eval's "flexible-extract" exact match.

The prompt lists the options as "A. text" lines under the question. The answer is scored in three steps, in
lmms-eval's order: its filter keeps just the letter when the answer opens with "X." (any capital letter) and the
whole answer otherwise; the answer is stripped; then exact match ignoring case and punctuation against the letter of
the right option. So "B. cat" scores as "B" and "(B)" as "b", while "B cat" or "The answer is B." is wrong.
"""

from __future__ import annotations

import re
import string
from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, rgb_image
from .choices import lettered_options, option_letters, read_fields, skip_bad_rows

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
OPENING_LETTER = re.compile(r"^\s*([A-Z])\.")  # the filter: a capital letter and a period opening the answer
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII punctuation only, as the metric removes


def samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    return skip_bad_rows("ai2d", rows, _sample, None)  # the dataset has no id column: a question is its row number


def _sample(row: dict[str, Any], position: int, where: str) -> Sample:
    f = read_fields(row, where, {"question": str, "options": (list, tuple), "answer": str, "image": object})
    options = list(f["options"])
    if not all(isinstance(o, str) for o in options):
        raise RowError("the field 'options' should be a list of strings")
    try:  # the answer is the option's number as text; Python indexing, as lmms-eval's doc_to_target does
        letter = option_letters(len(options))[int(f["answer"])]
    except (ValueError, IndexError):
        raise RowError(f"the answer {f['answer']!r} is not the number of one of the {len(options)} options") from None
    return Sample(id=str(position), images=[rgb_image(row["image"], "image")],
                  prompt=f"{f['question']}\n{lettered_options(options)}{POST_PROMPT}", references=letter)


def normalized(text: str) -> str:
    """The metric's view of a string: lowercased, ASCII punctuation removed, trailing NUL characters dropped (the
    metric compares numpy string arrays, which cannot hold them)."""
    return text.lower().translate(NO_PUNCTUATION).rstrip("\x00")


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    opening = OPENING_LETTER.match(prediction)
    answer = (opening.group(1) if opening else prediction).strip()
    return {"answer": answer, "exact_match": float(normalized(answer) == normalized(sample.references))}


def aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    return {"exact_match": sum(s["exact_match"] for s in scores) / len(scores) if scores else float("nan")}


TASK = Task(
    name="ai2d",
    hub_dataset="lmms-lab-encoder/ai2d",
    hub_config=None,
    split="test",
    metrics=("exact_match",),
    samples=samples,
    score=score,
    aggregate=aggregate,
    max_new_tokens=16,
    description="AI2D science diagrams: option letter, exact match after lmms-eval's letter filter (fraction)",
)
