"""What the multiple-choice benchmarks (MMBench, AI2D, MMMU) share: reading a row's fields, the lettered option
list of the prompt, and lmms-eval's general extractor of an answer letter from free text.

Each rule below is lmms-eval 0.7.3's behaviour, restated; the comments say why each odd-looking step is there (it is
there because lmms-eval does it, and a different rule would give different scores).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .base import RowError, Skip, TaskDataError


def read_fields(row: dict[str, Any], where: str, kinds: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The named fields of a row. A field missing from the row is a TaskDataError (the data has the wrong schema:
    every row would fail); a field of the wrong type is a RowError (this row alone is bad)."""
    values = {}
    for name, kind in kinds.items():
        if name not in row:
            raise TaskDataError(f"{where}: the field {name!r} is missing (the task needs it; fields present: "
                                f"{', '.join(sorted(map(str, row)))})")
        value = row[name]
        # bool is an int to Python, never to a dataset's integer column
        if not isinstance(value, kind) or (isinstance(value, bool) and int in _as_tuple(kind)):
            raise RowError(f"the field {name!r} should be {_kind_name(kind)}, got {type(value).__name__}")
        values[name] = value
    return values


def skip_bad_rows(task: str, rows: Iterable[dict[str, Any]], make, id_field: str | None):
    """Each row through make(row, index, where) -> Sample; a row that raises RowError becomes a Skip with the reason,
    named by its id field when it has a usable one, else by its position."""
    for index, row in enumerate(rows):
        try:
            yield make(row, index, f"{task}, row {index}")
        except RowError as e:
            ident = row.get(id_field) if id_field else None
            yield Skip(str(ident) if isinstance(ident, (str, int)) else str(index), str(e))


def is_missing(value: Any) -> bool:
    """pandas' isna for the values a dataset cell can hold: None, or a float NaN (what pandas reads a null as)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def option_letters(count: int) -> list[str]:
    """A, B, C, ... for `count` options."""
    return [chr(ord("A") + i) for i in range(count)]


def lettered_options(options: list[Any]) -> str:
    """The option block AI2D and MMMU put in the prompt: one "A. text" line per option, no trailing newline."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


def strip_each(text: str, characters: str) -> str:
    """text.strip(c) for each c in turn, once each (so ".,A" loses the "." and keeps the ","): how lmms-eval's
    parsers trim punctuation off an answer, and the order changes the result."""
    for c in characters:
        text = text.strip(c)
    return text


# --- lmms-eval's general multiple-choice extractor (_task_utils/mcq_extract.py: extract_mcq_answer) -----------------
#
# Every way a letter can appear in the answer is a candidate with a rank; the best rank wins, and among equals the
# one furthest to the right (a model that reasons before answering ends with its answer). Two different letters can
# never tie on both (each form puts different letters at different places), so the winner is well defined.

DEFAULT_LETTERS = "ABCDEFGH"

# phrases after which the first letter named is taken as the answer (lowercase; found in the lowercased answer)
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is", "best answer is",
    "the correct option is", "correct option is", "the best option is", "best option is", "the choice is",
    "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick", "my answer is",
    "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)

# the rank of each form: a bare letter opening or closing the answer beats "the answer is X", which beats "(X)", ...
RANK_START, RANK_END, RANK_PHRASE, RANK_FALLBACK = 10, 9, 7, 0
WRAPPED_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))


def extract_letter(answer: str, letters: Iterable[str] | None = None) -> str:
    """The option letter an answer names, or "" when it names none (`letters`: the valid ones; A-H when empty)."""
    if not answer or not answer.strip():
        return ""
    letters = list(letters or []) or list(DEFAULT_LETTERS)
    # trailing or leading punctuation and quotes are not part of the answer; the spaces make "A" at either end a word
    text = " " + strip_each(answer.strip(), ",.!?;:'\"") + " "
    candidates: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for form, rank in WRAPPED_FORMS:
        for letter in letters:
            position = text.rfind(form.format(letter))
            if position != -1:
                candidates.append((rank, position, letter))
    lowered = text.lower()
    for phrase in ANSWER_PHRASES:
        start = lowered.find(phrase)
        if start != -1:
            for letter in letters:  # the first occurrence of the letter after the phrase, in the answer's own case
                position = text.find(letter, start + len(phrase))
                if position != -1:
                    candidates.append((RANK_PHRASE, position, letter))
    core = text.strip()
    for letter in letters:
        # a letter that is the first (or last) word, not the first (last) letter of a word: "A, since" yes, "Apple" no
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            candidates.append((RANK_START, 0, letter))
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            candidates.append((RANK_END, len(text) - 1, letter))
    if not candidates:  # last resort: the rightmost letter anywhere, even inside a word
        candidates = [(RANK_FALLBACK, text.rfind(letter), letter) for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in _as_tuple(kind))

