"""Exact-match evaluation on LLaVA-format question answering data, reported per question type.

Every gpt turn of every record is one question: the model sees the conversation up to it (earlier answers as the
data gives them) with the images those turns show (each `<image>` takes the record's next image, so a question
asked before the second `<image>` sees only the first image) and answers greedily; the answer counts when it equals
the reference after normalisation (case, surrounding white space and final punctuation ignored). Types come from
the record's "types" (one per gpt turn) or "type"; otherwise every question is of type "all".

A question whose image does not decode, or whose record has a different number of `<image>` than images, is
skipped with the reason (the record, the file, why) and counted apart: accuracy is over the questions answered.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import Record, read_records
from ..errors import counted
from ..outputs import output_file
from ..image import ImageError
from ..prompt import IMAGE_TOKEN


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!?;:").split())


@dataclass
class Question:
    record_id: str
    type: str
    messages: list[dict[str, Any]]
    images: list[Path]  # the images of the turns up to the question, in order
    answer: str


@dataclass
class Skipped:
    record_id: str
    type: str
    image: str | None  # the file at fault, when one is
    reason: str


def questions_of(records: list[Record]) -> list[Question | Skipped]:
    """Every question of the records in order; those of a record whose <image> count differs from its images come
    as Skipped."""
    out: list[Question | Skipped] = []
    for record in records:
        placeholders = sum(text.count(IMAGE_TOKEN) for role, text in record.turns if role == "user")
        in_answers = any(IMAGE_TOKEN in text for role, text in record.turns if role == "assistant")
        shown = 0  # the <image> placeholders in the user turns so far: they take the record's images in order
        turn = 0
        for i, (role, text) in enumerate(record.turns):
            if role == "user":
                shown += text.count(IMAGE_TOKEN)
            if role != "assistant":
                continue
            kind = record.types[turn] if turn < len(record.types) else "all"
            turn += 1
            if in_answers:  # (an earlier answer is part of the next question's prompt, where it would take an image)
                out.append(Skipped(record.id, kind, None, "<image> in the text of an answer (a gpt turn)"))
            elif placeholders != len(record.images):
                out.append(Skipped(record.id, kind, None,
                                   f"{placeholders} <image> in its turns but {counted(len(record.images), 'image')}"))
            else:
                out.append(Question(record.id, kind, record.messages(upto=i), record.images[:shown], text))
    return out


@dataclass
class EvalResult:
    by_type: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # type -> [right, n]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # one per question not asked

    @property
    def correct(self) -> int:
        return sum(right for right, _ in self.by_type.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.by_type.values())

    @property
    def accuracy(self) -> float | None:
        """Over the questions answered; None when none was."""
        return self.correct / self.total if self.total else None

    def skipped_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self.skipped:
            counts[s.type] += 1
        return counts

    def skipped_records(self) -> list[dict[str, Any]]:
        """One entry per (record, file, reason), with how many of its questions were skipped."""
        grouped: dict[tuple, int] = {}
        for s in self.skipped:
            key = (s.record_id, s.image, s.reason)
            grouped[key] = grouped.get(key, 0) + 1
        return [{"id": rid, "image": image, "reason": reason, "questions": n}
                for (rid, image, reason), n in grouped.items()]

    def table(self) -> str:
        skipped = self.skipped_by_type()
        extra = bool(skipped)  # the skipped column only when something was skipped
        lines = ["| type | questions | correct | accuracy |" + (" skipped |" if extra else ""),
                 "| --- | ---: | ---: | ---: |" + (" ---: |" if extra else "")]
        for kind in sorted(set(self.by_type) | set(skipped)):
            right, n = self.by_type.get(kind, (0, 0))
            accuracy = f"{right / n:.1%}" if n else "-"
            lines.append(f"| {kind} | {n} | {right} | {accuracy} |" + (f" {skipped.get(kind, 0)} |" if extra else ""))
        accuracy = f"{self.accuracy:.1%}" if self.accuracy is not None else "-"
        lines.append(f"| **all** | {self.total} | {self.correct} | {accuracy} |"
                     + (f" {len(self.skipped)} |" if extra else ""))
        if extra:
            lines.append(f"\n{len(self.skipped)} question(s) skipped:")
            for s in self.skipped_records():
                lines.append(f"- record {s['id']}" + (f", image {s['image']}" if s["image"] else "")
                             + f": {s['reason']} ({s['questions']} question(s))")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        skipped = self.skipped_by_type()
        by_type = {}
        for kind in sorted(set(self.by_type) | set(skipped)):
            right, n = self.by_type.get(kind, (0, 0))
            by_type[kind] = {"correct": right, "total": n, "accuracy": right / n if n else None,
                             "skipped": skipped.get(kind, 0)}
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "skipped": len(self.skipped),
                "by_type": by_type, "skipped_records": self.skipped_records()}


def evaluate(pipe, data: str | Path | list[Record], image_folder: str | Path | None = None, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 16, progress: bool = False) -> EvalResult:
    """`data`: a LLaVA-format file, or its records as `read_records` gives them."""
    records = data if isinstance(data, list) else read_records(data, image_folder)
    items = questions_of(records)[:limit]
    questions = [q for q in items if isinstance(q, Question)]
    result = EvalResult(skipped=[s for s in items if isinstance(s, Skipped)])
    failed: dict[Path, str] = {}  # images that did not decode, and why: kept for the run, so each is tried once
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), desc="evaluating", leave=False)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        decoded = {}  # decoded images, for this batch only (a record's questions often share them)
        ready = []
        for q in chunk:
            for path in q.images:
                if path not in decoded and path not in failed:
                    try:
                        decoded[path] = pipe.processor.load_image(path)
                    except ImageError as e:
                        failed[path] = str(e).removeprefix(f"{path}: ")
                if path in failed:
                    result.skipped.append(Skipped(q.record_id, q.type, str(path), failed[path]))
                    break
            else:
                ready.append(q)
        answers = pipe.generate([q.messages for q in ready], [[decoded[p] for p in q.images] for q in ready],
                                max_new_tokens=max_new_tokens) if ready else []
        for q, a in zip(ready, answers):
            right = normalize_answer(a.text) == normalize_answer(q.answer)
            result.by_type[q.type][0] += int(right)
            result.by_type[q.type][1] += 1
            result.predictions.append({"id": q.record_id, "type": q.type, "prediction": a.text, "answer": q.answer,
                                       "correct": right})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return result


def write_predictions(result: EvalResult, path: Path) -> None:
    output_file(path).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions))
