"""LLaVA-format training and evaluation data: reading, and turning records into chat messages.

A file is a JSON list, or JSON lines, of records:
    {"id": ..., "image": "path" | ["path", ...] (optional), "conversations": [
        {"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}
Image paths are relative to an image folder. A record without "image" is a text-only sample. "system" turns and
the roles "user"/"assistant" are accepted too. Our synthetic data adds "types", one question type per gpt turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlavaError
from ..prompt import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(LlavaError, ValueError):
    """A data file or record that cannot be used."""


@dataclass
class Record:
    id: str
    images: list[Path]
    turns: list[tuple[str, str]]  # (role, text), roles normalised to system / user / assistant
    types: list[str] = field(default_factory=list)  # one per assistant turn, when the data says

    def messages(self, upto: int | None = None) -> list[dict[str, Any]]:
        """Chat messages in transformers' format; each <image> in a user turn becomes an image item in place."""
        out = []
        for role, text in self.turns[:upto]:
            if role != "user":
                out.append({"role": role, "content": [{"type": "text", "text": text}]})
                continue
            content = []
            pieces = text.split(IMAGE_TOKEN)
            for i, piece in enumerate(pieces):
                if i > 0:
                    content.append({"type": "image"})
                # the newline that conventionally follows <image> belongs to the template, not to the question
                piece = piece.strip("\n") if i > 0 or len(pieces) > 1 else piece
                if piece.strip():
                    content.append({"type": "text", "text": piece})
            out.append({"role": "user", "content": content})
        return out


def read_records(path: str | Path, image_folder: str | Path | None = None) -> list[Record]:
    """Every record of a LLaVA-format JSON or JSON-lines file, image paths resolved against the image folder
    (default: the file's own folder). Structural problems are errors naming the record; content problems (missing
    images, empty replies...) are for `validate` to report."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a LLaVA-format JSON or JSON-lines file")
    folder = Path(image_folder) if image_folder is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not text (not UTF-8); give a LLaVA-format JSON or JSON-lines file") from None
    try:
        raw = json.loads(text)
        if isinstance(raw, dict):
            raw = [raw]
    except json.JSONDecodeError:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {n}: neither a JSON list nor JSON lines ({e})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a list of records")
    records = []
    for n, r in enumerate(raw):
        rid = str(r.get("id", f"#{n}")) if isinstance(r, dict) else f"#{n}"
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise DataError(f"{path}: record {rid} has no 'conversations' list")
        images = r.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        turns = []
        for t in r["conversations"]:
            role = ROLES.get(t.get("from") if isinstance(t, dict) else None)
            if role is None or not isinstance(t.get("value"), str):
                raise DataError(f"{path}: record {rid} has a turn without a known 'from' and a string 'value': {t!r}")
            turns.append((role, t["value"]))
        types = r.get("types") or ([r["type"]] if "type" in r else [])
        records.append(Record(rid, [folder / p for p in images], turns, [str(x) for x in types]))
    if any(r.images for r in records) and not folder.is_dir():  # (every image would be skipped as missing)
        raise DataError(f"the image folder {folder} {'is not a directory' if folder.exists() else 'does not exist'}")
    return records
