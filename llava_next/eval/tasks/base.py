"""What a standard benchmark is, for the runner: how its published dataset's rows become questions, how a question
is prompted (exactly as lmms-eval's task prompts LLaVA models), how an answer is scored, and how scores add up.

One module per benchmark in this package defines a `Task`; `tasks/__init__.py` lists them by name. Nothing here
loads a model: the runner (`eval/runner.py`) renders the question with the checkpoint's chat template, generates
with the task's settings, and calls `score` and `aggregate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from ...errors import LlavaError
from ...image import ImageError, decode_image


class TaskDataError(LlavaError, ValueError):
    """The data does not have what the task needs (a field, a split, an image): says which and where."""


@dataclass
class Sample:
    """One question of a benchmark."""

    id: str  # the sample's id as the dataset names it (question_id, index, ...)
    images: list[Image.Image]  # in the order the prompt shows them (before the text, the LLaVA convention)
    prompt: str  # the user text exactly as lmms-eval builds it for LLaVA (pre-prompt + question + post-prompt)
    references: Any  # what the metric compares with (a list of answers, a letter, ...), JSON-serialisable
    extra: dict[str, Any] = field(default_factory=dict)  # fields the metric needs (category, question type, ...)


@dataclass
class Task:
    name: str  # the lmms-eval task name (vqav2_val, textvqa_val, ...)
    hub_dataset: str  # where lmms-eval reads it: lmms-lab/VQAv2, ...
    hub_config: str | None  # the dataset configuration, if any
    split: str  # the split lmms-eval evaluates
    metrics: tuple[str, ...]  # the names `aggregate` returns, the headline first
    samples: Callable[[Iterable[dict[str, Any]]], Iterator[Sample | "Skip"]]  # dataset rows -> samples (or skips)
    score: Callable[[Sample, str], dict[str, Any]]  # (sample, raw model output) -> per-sample values
    aggregate: Callable[[list[dict[str, Any]]], dict[str, float]]  # all per-sample values -> metric values
    max_new_tokens: int = 16  # lmms-eval's generation_kwargs for the task (greedy: temperature 0)
    description: str = ""  # one line for the README table and --help
    # A dataset configuration whose rows the questions need (GQA keeps its images apart), and how to join them:
    # (config name, join(question rows, companion rows) -> rows). The runner reads it from the same place.
    companion: tuple[str, Callable[[Iterable[dict[str, Any]], Iterable[dict[str, Any]]], Iterable[dict[str, Any]]]] | None = None


@dataclass
class Skip:
    """A row that cannot be a question (a missing or undecodable image, a wrong field type): counted and reported."""

    id: str
    reason: str


def image_of(value: Any, where: str) -> Image.Image:
    """A dataset image cell -> a PIL image: a PIL image already (the `datasets` library decodes Image features), or
    a parquet cell {"bytes": ..., "path": ...}, or raw bytes. Anything else is a TaskDataError naming `where`."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        try:  # the package's decoding: size limits, truncated data refused, EXIF orientation applied
            return decode_image(bytes(value), name=where)
        except ImageError as e:
            raise TaskDataError(f"the image does not decode: {e}") from None
    raise TaskDataError(f"{where}: expected an image, got {type(value).__name__}")


class RowError(Exception):
    """This one row cannot be a question (a field of the wrong type, no image, an image that does not decode): the
    task makes it a Skip with this reason. (A field missing from the data entirely is a TaskDataError instead.)"""


def rgb_image(value: Any, where: str) -> Image.Image:
    """A dataset image cell as lmms-eval's doc_to_visual gives it, `.convert("RGB")` (an alpha channel dropped, not
    composited), or a RowError saying why it is not one."""
    if value is None:
        raise RowError(f"{where}: expected an image, got None (the cell holds no image)")
    try:
        return image_of(value, where).convert("RGB")
    except TaskDataError as e:
        raise RowError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a truncated file can fail late, inside convert
        raise RowError(f"{where}: the image does not decode ({type(e).__name__}: {e})") from None


def generated(prediction: str | None) -> str:
    """The model's text as lmms-eval scores it: every generated answer is stripped of surrounding white space (None
    becoming "") before a task's process_results sees it."""
    return "" if prediction is None else prediction.strip()


def field_of(row: dict[str, Any], name: str, where: str, kinds: type | tuple[type, ...] = object) -> Any:
    """row[name], or a TaskDataError that names the missing or mistyped field."""
    if name not in row:
        raise TaskDataError(f"{where}: the field {name!r} is missing (the task needs it; fields present: "
                            f"{', '.join(sorted(row))})")
    value = row[name]
    if not isinstance(value, kinds):
        raise TaskDataError(f"{where}: the field {name!r} should be {getattr(kinds, '__name__', kinds)}, "
                            f"got {type(value).__name__}")
    return value
