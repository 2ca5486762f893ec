"""Exact-match evaluation on LLaVA-format question answering data, reported per question type.

Every gpt turn of every record is one question: the model sees the conversation up to it (earlier answers as the
data gives them) and answers greedily; the answer counts when it equals the reference after normalisation (case,
surrounding white space and final punctuation ignored). Types come from the record's "types" (one per gpt turn)
or "type"; otherwise every question is of type "all".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import Record, read_records


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!?;:").split())


@dataclass
class Question:
    record_id: str
    type: str
    messages: list[dict[str, Any]]
    images: list[Path]
    answer: str


def questions_of(records: list[Record]) -> list[Question]:
    out = []
    for record in records:
        turn = 0
        for i, (role, text) in enumerate(record.turns):
            if role != "assistant":
                continue
            kind = record.types[turn] if turn < len(record.types) else "all"
            out.append(Question(record.id, kind, record.messages(upto=i), record.images, text))
            turn += 1
    return out


@dataclass
class EvalResult:
    by_type: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # type -> [right, n]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(right for right, _ in self.by_type.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.by_type.values())

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    def table(self) -> str:
        lines = ["| type | questions | correct | accuracy |", "| --- | ---: | ---: | ---: |"]
        for kind in sorted(self.by_type):
            right, n = self.by_type[kind]
            lines.append(f"| {kind} | {n} | {right} | {right / n:.1%} |")
        lines.append(f"| **all** | {self.total} | {self.correct} | {self.accuracy:.1%} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "by_type": {k: {"correct": r, "total": n, "accuracy": r / n} for k, (r, n) in sorted(self.by_type.items())}}


def evaluate(pipe, data: str | Path, image_folder: str | Path | None = None, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 16, progress: bool = False) -> EvalResult:
    questions = questions_of(read_records(data, image_folder))[:limit]
    result = EvalResult()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), desc="evaluating", leave=False)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        answers = pipe.generate([q.messages for q in chunk], [list(q.images) for q in chunk],
                                max_new_tokens=max_new_tokens)
        for q, a in zip(chunk, answers):
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
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions))
