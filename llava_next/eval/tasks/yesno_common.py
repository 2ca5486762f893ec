"""What the short-answer tasks (gqa, pope, mme, scienceqa_img) share: reading a row's fields and image the way the
task contract asks (a field absent from the data is a schema error; a bad value in one row skips that row), the
pre-scoring clean-up lmms-eval applies to every generation, and the mean of a per-sample value.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from .base import RowError, Sample, Skip, field_of, rgb_image

# lmms-eval's default post-prompt (lmms_eval_specific_kwargs.default) of gqa, pope and mme.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def value_of(row: dict[str, Any], name: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """row[name]: absent from the row -> TaskDataError (the file has another schema); of the wrong type -> RowError."""
    value = field_of(row, name, where)
    if not isinstance(value, kinds):
        kind = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise RowError(f"the field {name!r} should be {kind}, got {type(value).__name__}")
    return value


def row_image(row: dict[str, Any], name: str, where: str) -> Image.Image:
    """The row's image field (absent: TaskDataError) as lmms-eval's doc_to_visual gives it."""
    return rgb_image(field_of(row, name, where), f"{where}: field {name!r}")


def build_samples(rows: Iterable[dict[str, Any]], task: str, id_field: str | None,
                  build: Callable[[dict[str, Any], str, str], Sample]) -> Iterator[Sample | Skip]:
    """build(row, id, where) for each row in order, a Skip where it raises RowError.

    The id is the row's `id_field` (or its position when the dataset has none). Ids are made unique: where a value
    repeats (MME asks two questions about each image under one question_id) the later rows get "#2", "#3", ... so
    that a runner can key outputs and resumption on Sample.id; the metric reads the dataset's own id from `extra`.
    """
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        where = f"{task} row {index}"
        base = str(index) if id_field is None else str(field_of(row, id_field, where))
        seen[base] = seen.get(base, 0) + 1
        sample_id = base if seen[base] == 1 else f"{base}#{seen[base]}"
        try:
            yield build(row, sample_id, where)
        except RowError as e:
            yield Skip(sample_id, str(e))


def mean_aggregate(key: str) -> Callable[[list[dict[str, Any]]], dict[str, float]]:
    """An aggregate: lmms-eval's "mean" (sum / count, in order) of the per-sample value `key`, under that name and
    on lmms-eval's scale (a fraction, not a percentage); 0.0 when nothing was scored."""
    def aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
        return {key: sum(s[key] for s in scores) / len(scores) if scores else 0.0}
    return aggregate
