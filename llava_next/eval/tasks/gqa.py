"""GQA (testdev-balanced): compositional questions about real images, one short answer each, scored by exact match.

lmms-eval's `gqa` task reads the questions from the config `testdev_balanced_instructions` and the pictures from
`testdev_balanced_images`, joined on the question's `imageId` (its process_docs step): `attach_images` does that join
here, so `samples` takes question rows that carry an `image` field. The prompt is the question followed by the
short-answer instruction; the answer counts when it equals the reference ignoring case and ASCII punctuation.
"""

from __future__ import annotations

import string
from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, TaskDataError, generated
from .yesno_common import SHORT_ANSWER, build_samples, mean_aggregate, row_image, value_of

IMAGES_CONFIG = "testdev_balanced_images"  # the config whose rows {"id", "image"} hold the pictures

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def attach_images(questions: Iterable[dict[str, Any]], images: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The question rows, each with an "image" field: the image row whose "id" is the question's "imageId" (None
    when there is none, which `samples` reports as a skip)."""
    by_id = {row["id"]: row["image"] for row in images}
    for row in questions:
        yield {**row, "image": by_id.get(row.get("imageId"))}


def _samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    def build(row: dict[str, Any], sample_id: str, where: str) -> Sample:
        if "image" not in row:
            raise TaskDataError(f"{where}: the field 'image' is missing: GQA's question rows name their picture by "
                                f"'imageId'; join them with the config {IMAGES_CONFIG!r} (gqa.attach_images)")
        question = value_of(row, "question", str, where)
        answer = value_of(row, "answer", str, where)
        if row["image"] is None:
            raise RowError(f"no image for imageId {row.get('imageId')!r} in {IMAGES_CONFIG}")
        return Sample(id=sample_id, images=[row_image(row, "image", where)], prompt=f"{question}{SHORT_ANSWER}",
                      references=answer)

    return build_samples(rows, "gqa", "id", build)


def _exact_match_form(text: str) -> str:
    """The text as lmms-eval's exact_match (ignore_case, ignore_punctuation) compares it. That metric works on numpy
    fixed-width string arrays, which (1) cannot hold trailing NUL characters and (2) keep the width of the input,
    so a lower-casing that lengthens a string (İ -> i + combining dot) is cut back to the original length."""
    return text.lower()[:len(text)].translate(_NO_PUNCTUATION).rstrip("\x00")


def _score(sample: Sample, prediction: str) -> dict[str, Any]:
    hit = _exact_match_form(generated(prediction)) == _exact_match_form(sample.references)
    return {"exact_match": 1.0 if hit else 0.0}


TASK = Task(
    name="gqa",
    hub_dataset="lmms-lab-encoder/GQA",
    hub_config="testdev_balanced_instructions",
    split="testdev",
    metrics=("exact_match",),
    samples=_samples,
    score=_score,
    aggregate=mean_aggregate("exact_match"),
    max_new_tokens=16,
    description="GQA testdev-balanced: compositional questions on real images, exact match (case, punctuation "
                "ignored)",
    companion=(IMAGES_CONFIG, attach_images),
)
